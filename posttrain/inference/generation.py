"""Batched sampling from a causal LM with per-token log-probabilities, in vLLM's terms.

One call generates for many rows at once (left-padded, one shared KV cache), each row with its own
sampling parameters. Log-probabilities are taken from the raw logits (before temperature or top-p), as
vLLM reports them by default and as a trainer recomputes them, so the PPO ratio compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64; the request models bound seeds by it


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


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # character offset of the stop string in the decoded text


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
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


def _stop_offset(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(stop) for stop in stops if stop and stop in text]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
    """Generate ``params[i].n`` completions for each ``prompts[i]``, all rows in one batch."""
    rows = [_Row(prompt, p) for prompt, p in zip(prompts, params, strict=True) for _ in range(p.n)]
    device = next(model.parameters()).device
    # One generator per request, shared by its n rows: a seeded request is reproducible and its n samples differ.
    request_generators = [_generator(p.seed, device) for p in params]
    generators = [g for g, p in zip(request_generators, params, strict=True) for _ in range(p.n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(model, tokenizer)
    width = max(len(row.prompt) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want_prompt_logprobs = any(p.prompt_logprobs is not None for p in params)

    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=0 if want_prompt_logprobs else 1)
    prompt_logprobs = _prompt_logprobs(out.logits, rows, width) if want_prompt_logprobs else None
    logits = out.logits[:, -1, :]
    cache = out.past_key_values
    longest = max(r.params.max_tokens for r in rows)
    for step in range(longest):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        next_tokens = []
        for i, row in enumerate(rows):
            if row.finish_reason is not None:
                next_tokens.append(pad_id)
                continue
            token = _sample(logits[i].float(), row.params, generators[i])
            next_tokens.append(token)
            row.tokens.append(token)
            if row.params.logprobs is not None:
                row.logprobs.append(_token_logprobs(logprobs[i], token, row.params.logprobs))
            _update_finish(row, token, eos_ids, tokenizer)
        if all(row.finish_reason is not None for row in rows) or step == longest - 1:
            break
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=torch.tensor(next_tokens, device=device)[:, None], attention_mask=mask,
                    position_ids=positions, past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1, :], out.past_key_values
    return _collect(rows, prompts, params, prompt_logprobs, tokenizer)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _update_finish(row: _Row, token: int, eos_ids: set[int], tokenizer) -> None:
    if token in eos_ids and not row.params.ignore_eos:
        row.finish_reason = "stop"
    elif row.params.stop:
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        offset = _stop_offset(text, row.params.stop)
        if offset is not None:
            row.finish_reason, row.stop_at = "stop", offset
    if row.finish_reason is None and len(row.tokens) >= row.params.max_tokens:
        row.finish_reason = "length"


def _prompt_logprobs(logits: torch.Tensor, rows: list[_Row], width: int) -> list[list[dict[int, float] | None]]:
    """Per row: None for the first prompt token, then the logprob of each next prompt token (+ top-k)."""
    result = []
    for i, row in enumerate(rows):
        start = width - len(row.prompt)
        logprobs = torch.log_softmax(logits[i, start:-1].float(), dim=-1)
        entries: list[dict[int, float] | None] = [None]
        for position, token in enumerate(row.prompt[1:]):
            entries.append(_token_logprobs(logprobs[position], token, row.params.prompt_logprobs))
        result.append(entries)
    return result


def _collect(rows, prompts, params, prompt_logprobs, tokenizer) -> list[GenerationResult]:
    results, index = [], 0
    for prompt, p in zip(prompts, params, strict=True):
        completions = []
        for row in rows[index:index + p.n]:
            text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            if row.stop_at is not None:
                text = text[:row.stop_at]
            completions.append(Completion(row.tokens, text, row.finish_reason or "length", row.logprobs))
        wanted = prompt_logprobs is not None and p.prompt_logprobs is not None
        results.append(GenerationResult(prompt, completions, prompt_logprobs[index] if wanted else None))
        index += p.n
    return results
