"""Batched sampling from a causal LM with per-token log-probabilities, in vLLM's terms.

:class:`DecodeBatch` is the engine's running batch: rows join it (their prompts prefilled, their first
token sampled) and leave it (on EOS, a stop string or max_tokens) between decode steps, so a request
never waits for another one to finish; each row has its own sampling parameters and, on a PEFT model,
its own LoRA adapter (PEFT's per-row ``adapter_names``), so one forward serves several adapters.
:func:`generate_batch` runs a fixed list of prompts through one such batch until all are done: what RL
rollouts and evaluation call in-process on a live model.

Log-probabilities are taken from the raw logits (before temperature or top-p), as vLLM reports them by
default and as a trainer recomputes them, so the PPO ratio compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from posttrain.inference.decode_step import LlamaDecodeStep
from posttrain.inference.detokenize import CompletionText
from posttrain.inference.kv_window import KVWindow
from posttrain.inference.row_lora import RowLora

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64; the request models bound seeds by it
BASE_ADAPTER = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class SamplingParams:
    """The sampling fields of vLLM's ``SamplingParams`` that the server honours."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k cut, as in vLLM
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: the sampled one plus the top k
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    # Per generated token: {token id: logprob}, the sampled token first, then the top-k if asked for.
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    completions: list[Completion]
    # vLLM's shape: None for the first prompt token, then {token id: logprob} per position.
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with ``n`` > 1 has n of them, sharing its generator)."""

    prompt: list[int]
    params: SamplingParams
    text: CompletionText
    generator: torch.Generator | None = None
    adapter: str | None = None  # the PEFT adapter of this row in a mixed batch (None: BASE_ADAPTER)
    owner: Any = None  # the engine's request this completion belongs to
    index: int = 0  # which of the request's completions
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    row: int = -1  # row in the batch's KV window while generating
    prompt_logprobs: list[dict[int, float] | None] | None = None
    cancelled: bool = False  # set from another thread: the row leaves at the next step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> Completion:
        return Completion(self.tokens, self.text.final(), self.finish_reason or "length", self.logprobs)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_logprobs(logprobs: torch.Tensor, token: int, top: int | None) -> dict[int, float]:
    entry = {token: float(logprobs[token])}
    if top:
        values, ids = torch.topk(logprobs, top)
        for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
            entry.setdefault(token_id, value)
    return entry


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int | None) -> list[dict[int, float] | None]:
    """None for the first prompt token, then the logprob of each next prompt token (+ top-k); ``logits``
    are the prompt's own positions, left padding removed."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    entries: list[dict[int, float] | None] = [None]
    for position, token in enumerate(prompt[1:]):
        entries.append(_token_logprobs(logprobs[position], token, top))
    return entries


class DecodeBatch:
    """The running batch of one model: :meth:`add` prefills new sequences and samples their first token,
    :meth:`step` gives every running sequence its next token; finished sequences leave at once.

    ``mixed_adapters``: the model is a PEFT model whose rows each name their adapter (``Sequence.adapter``).
    Not thread-safe: one thread drives a batch (the engine's, or generate_batch's caller).
    """

    def __init__(self, model, tokenizer, mixed_adapters: bool = False, row_lora: RowLora | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mixed_adapters = mixed_adapters
        self.row_lora = row_lora  # applies the rows' adapters when set (else PEFT's adapter_names do)
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.window = KVWindow(self.device)
        self.sequences: list[Sequence] = []  # running, in the order they joined (sampling order)
        self.most_adapters = 0  # most different adapters (the base counted as one) in one decode step
        self._decode_step: LlamaDecodeStep | None = None
        self._decode_step_for: tuple[int, int | None] | None = None  # (model, adapters' version) it was built for

    def __len__(self) -> int:
        return len(self.sequences)

    # -- joining ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, groups: list[list[Sequence]]) -> list[Sequence]:
        """Prefill each group's prompt once (a group: one request's completions, sharing a prompt), sample
        every sequence's first token and let the unfinished ones join. Returns all the given sequences."""
        prompts = [group[0].prompt for group in groups]
        want_prompt_logprobs = any(group[0].params.prompt_logprobs is not None for group in groups)
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device,
                            dtype=torch.bool)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        visible = causal[None] & real[:, None, :]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        cache = DynamicCache()
        with self._adapters([group[0] for group in groups]) as adapter_kwargs:
            # The last position as an index tensor, not logits_to_keep=1: transformers would slice the hidden
            # states to a non-contiguous [rows, 1, hidden] view, which torch multiplies by the LM head through
            # a batched matmul that first copies the head once per row (gigabytes for a batch of prompts).
            keep = 0 if want_prompt_logprobs else torch.tensor([width - 1], device=self.device)
            out = self.model(input_ids=input_ids, attention_mask=mask[:, None], position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=keep, **adapter_kwargs)
        last = out.logits[:, -1, :].float()
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        joined: list[Sequence] = []
        for g, group in enumerate(groups):
            if group[0].params.prompt_logprobs is not None:
                own = out.logits[g, width - len(prompts[g]):]
                group[0].prompt_logprobs = _prompt_logprobs(own, prompts[g], group[0].params.prompt_logprobs)
            self._take_tokens(last[g:g + 1].expand(len(group), -1), group)
            for sequence in group:
                if sequence.finished:
                    continue
                sequence.row = self._free_row()
                self.window.place(sequence.row, [(k[g], v[g]) for k, v in layers], len(sequence.prompt))
                self.sequences.append(sequence)
                joined.append(sequence)
        self.window.trim([s.row for s in self.sequences])
        return [sequence for group in groups for sequence in group]

    def _free_row(self) -> int:
        used = {s.row for s in self.sequences}
        return next(row for row in range(len(used) + 1) if row not in used)

    # -- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One token for every running sequence (cancelled ones leave first); returns those that got one."""
        self._drop([s for s in self.sequences if s.cancelled])
        if not self.sequences:
            return []
        window = self.window
        rows = window.rows
        active = [s.row for s in self.sequences]
        tokens = [self.pad_id] * rows
        positions = [0] * rows
        for sequence in self.sequences:
            tokens[sequence.row] = sequence.tokens[-1]
            positions[sequence.row] = len(sequence.prompt) + len(sequence.tokens) - 1
        mask = window.step_mask(self.dtype, active)
        if self.mixed_adapters:
            self.most_adapters = max(self.most_adapters, len({s.adapter for s in self.sequences}))
        token_ids = torch.tensor(tokens, device=self.device)
        position_ids = torch.tensor(positions, device=self.device)
        decode_step = self._fast_step()
        with self._adapters(self._row_sequences(rows)) as adapter_kwargs:
            if decode_step is not None:
                logits = decode_step.logits(token_ids, position_ids, window, mask,
                                            self.row_lora if self.mixed_adapters else None)
            else:
                out = self.model(input_ids=token_ids[:, None], attention_mask=mask, position_ids=position_ids[:, None],
                                 past_key_values=window, use_cache=True, logits_to_keep=1, **adapter_kwargs)
                logits = out.logits[:, -1, :]
        window.advance(active)
        logits = logits.float()
        stepped = list(self.sequences)
        self._take_tokens(logits[[s.row for s in stepped]], stepped)
        self._drop([s for s in stepped if s.finished])
        return stepped

    def _fast_step(self) -> LlamaDecodeStep | None:
        """The model's own decode step where it has one (see decode_step.py), rebuilt when its adapters change."""
        lora = self.row_lora if self.mixed_adapters else None
        key = (id(self.model), lora.version if lora is not None else None)
        if key != self._decode_step_for:
            supported = LlamaDecodeStep.supports(self.model, lora is not None)
            self._decode_step = LlamaDecodeStep(self.model, lora is not None) if supported else None
            self._decode_step_for = key
        return self._decode_step

    def _row_sequences(self, rows: int) -> list[Sequence | None]:
        by_row: list[Sequence | None] = [None] * rows
        for sequence in self.sequences:
            by_row[sequence.row] = sequence
        return by_row

    @contextmanager
    def _adapters(self, rows: list[Sequence | None]) -> Iterator[dict[str, Any]]:
        """Around a forward over ``rows``: each row's adapter applied, by RowLora or by PEFT's adapter_names
        (the extra arguments of the forward)."""
        if not self.mixed_adapters:
            yield {}
        elif self.row_lora is not None:
            with self.row_lora.rows([s.adapter if s is not None else None for s in rows]):
                yield {}
        else:
            yield {"adapter_names": [(s.adapter if s is not None and s.adapter else BASE_ADAPTER) for s in rows]}

    def _take_tokens(self, logits: torch.Tensor, sequences: list[Sequence]) -> None:
        """Sample one token per sequence from its row of ``logits`` (in the order given, so the n
        completions of a seeded request draw from their shared generator in a fixed order)."""
        greedy = [i for i, s in enumerate(sequences) if s.params.temperature <= 0]
        chosen: dict[int, int] = {}
        if greedy:
            chosen.update(zip(greedy, torch.argmax(logits[greedy], dim=-1).tolist(), strict=True))
        wants_logprobs = [i for i, s in enumerate(sequences) if s.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[wants_logprobs], dim=-1) if wants_logprobs else None
        for i, sequence in enumerate(sequences):
            token = chosen[i] if i in chosen else _sample(logits[i], sequence.params, sequence.generator)
            sequence.tokens.append(token)
            if logprobs is not None and sequence.params.logprobs is not None:
                entry = logprobs[wants_logprobs.index(i)]
                sequence.logprobs.append(_token_logprobs(entry, token, sequence.params.logprobs))
            sequence.text.push(token)
            self._check_finish(sequence, token)

    def _check_finish(self, sequence: Sequence, token: int) -> None:
        if (token in self.eos_ids and not sequence.params.ignore_eos) or sequence.text.stopped_at is not None:
            sequence.finish_reason = "stop"
        elif len(sequence.tokens) >= sequence.params.max_tokens:
            sequence.finish_reason = "length"

    def _drop(self, leaving: list[Sequence]) -> None:
        if not leaving:
            return
        gone = set(map(id, leaving))
        self.sequences = [s for s in self.sequences if id(s) not in gone]
        for sequence in leaving:
            self.window.free(sequence.row)
            sequence.row = -1
        self._close_holes()
        self.window.trim([s.row for s in self.sequences])

    def _close_holes(self) -> None:
        """Move the last rows into holes when a quarter of the rows a forward runs over are holes."""
        if not self.sequences:
            return
        rows = max(s.row for s in self.sequences) + 1
        if rows - len(self.sequences) <= rows // 4:
            return
        used = {s.row for s in self.sequences}
        holes = [row for row in range(rows) if row not in used]
        for sequence in sorted(self.sequences, key=lambda s: s.row, reverse=True):
            if not holes or holes[0] > sequence.row:
                break
            target = holes.pop(0)
            self.window.move(sequence.row, target)
            sequence.row = target


def new_sequences(tokenizer, prompt: list[int], params: SamplingParams, device: torch.device | str,
                  adapter: str | None = None, owner: Any = None) -> list[Sequence]:
    """A request's ``params.n`` sequences, sharing one generator: a seeded request is reproducible and its
    n samples still differ."""
    generator = seeded_generator(params.seed, device)
    return [Sequence(prompt, params, CompletionText(tokenizer, params.stop), generator=generator, adapter=adapter,
                     owner=owner, index=index) for index in range(params.n)]


def generate_batch(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
    """Generate ``params[i].n`` completions for each ``prompts[i]``, all in one batch, until every one is done."""
    batch = DecodeBatch(model, tokenizer)
    groups = [new_sequences(tokenizer, prompt, p, batch.device) for prompt, p in zip(prompts, params, strict=True)]
    batch.add(groups)
    while batch.sequences:
        batch.step()
    return [GenerationResult(prompt, [s.completion() for s in group],
                             group[0].prompt_logprobs if p.prompt_logprobs is not None else None)
            for prompt, p, group in zip(prompts, params, groups, strict=True)]
