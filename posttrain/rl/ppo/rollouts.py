"""PPO rollouts: prompts in a resumable order, answers sampled either by the actor in-process through the
online stack's batched generation (:func:`posttrain.inference.generation.generate_batch`, the inference server's own
path) or by an inference server (:class:`posttrain.rl.ppo.server_sampler.ServerSampler`), and the tensors the
update needs: ``[prompt (left-padded) | answer (right-padded)]`` sequences with a mask of real answer tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.generation_copy import GenerationCopy
from posttrain.inference.generation import Completion, SamplingParams, generate_batch
from posttrain.modeling import encode_prompt

# Token ids of each prompt + the sampling parameters -> one completion per prompt.
Sampler = Callable[[list[list[int]], SamplingParams], list[Completion]]


class PromptStream:
    """Prompt rows in a fresh seeded shuffle per pass over the data; ``position`` (prompts handed out so
    far) is all a checkpoint needs to continue with the same order."""

    def __init__(self, rows: list[Any], seed: int, position: int = 0) -> None:
        if not rows:
            raise ValueError("no prompts")
        self.rows = rows
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: list[int] = []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.rows), generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def take(self, count: int) -> list[Any]:
        taken = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.rows))
            taken.append(self.rows[self._order_of(epoch)[index]])
            self.position += 1
        return taken


@dataclass
class Rollouts:
    """One batch of sampled answers. Sequences are ``[B, context_length + R]``; ``mask`` marks real answer
    tokens ([B, R]): everything up to and including EOS, nothing after."""

    prompts: list[Any]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    context_length: int
    mask: torch.Tensor
    texts: list[str]
    ended: torch.Tensor  # bool [B]: the answer ended with EOS (not cut at response_length)
    generation_seconds: float

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def generated_tokens(self) -> int:
        return int(self.mask.sum())

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "position_ids": self.position_ids[index]}


def inprocess_sampler(model, tokenizer) -> Sampler:
    """Sampling from the actor's current weights, all prompts in one batch: on CPU from a copy with the LoRA
    deltas merged, in bf16 where the CPU has it (:class:`posttrain.generation_copy.GenerationCopy`, refreshed
    before each batch; PEFT's per-layer matmuls and fp32 weights made LoRA rollouts slower than full ones), on
    a GPU from the actor itself in eval mode (no dropout). The update recomputes every log-prob with the actor."""
    copy: list[GenerationCopy] = []

    def sample(encoded: list[list[int]], params: SamplingParams) -> list[Completion]:
        if next(model.parameters()).device.type == "cpu":
            if not copy:
                copy.append(GenerationCopy(model))
            results = generate_batch(copy[0].refresh(), tokenizer, encoded, [params] * len(encoded))
            return [result.completions[0] for result in results]
        was_training = model.training
        model.eval()
        try:
            results = generate_batch(model, tokenizer, encoded, [params] * len(encoded))
        finally:
            model.train(was_training)
        return [result.completions[0] for result in results]
    return sample


def sample_rollouts(sample: Sampler, tokenizer, prompts: list[Any], response_length: int, temperature: float,
                    max_prompt_length: int, device: str | torch.device) -> Rollouts:
    """Sample one answer per prompt with ``sample`` (in-process or an inference server)."""
    encoded = [encode_prompt(tokenizer, prompt, max_prompt_length) for prompt in prompts]
    params = SamplingParams(max_tokens=response_length, temperature=temperature)
    started = time.perf_counter()
    completions = sample(encoded, params)
    seconds = time.perf_counter() - started
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context = max(len(ids) for ids in encoded)
    width = max(max(len(c.token_ids) for c in completions), 1)
    input_ids = torch.full((len(prompts), context + width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    mask = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, (ids, completion) in enumerate(zip(encoded, completions, strict=True)):
        input_ids[row, context - len(ids):context] = torch.tensor(ids)
        attention[row, context - len(ids):context] = 1
        answer = completion.token_ids
        if answer:
            input_ids[row, context:context + len(answer)] = torch.tensor(answer)
            attention[row, context:context + len(answer)] = 1
            mask[row, :len(answer)] = 1
    # Positions count real tokens only, so a left-padded prompt sees the same positions as an unpadded one.
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    ended = torch.tensor([c.finish_reason == "stop" for c in completions])
    return Rollouts(prompts, input_ids.to(device), attention.to(device), positions.to(device), context,
                    mask.to(device), [c.text for c in completions], ended, seconds)
