"""Scored rollouts from the trajectory API -> padded training tensors.

A group (atroposlib's ``ScoredData``) holds a few sequences sampled for one prompt:

- ``tokens[i]``: prompt + completion token ids;
- ``masks[i]``: the same length, ``-100`` where nothing is trained (the prompt), the token id elsewhere;
- ``scores[i]``: the reward; advantages are the group's z-scored scores (score - mean) / std, unless the
  group carries ``advantages`` (one per token of each sequence), which are used as they are;
- ``overrides[i]`` (optional): ``{"set_advantage_to_zero": true}`` trains nothing on that sequence,
  ``{"temperature": t}`` names its sampling temperature;
- ``inference_logprobs[i]`` (optional): the sampling policy's log-prob of each token, aligned with
  ``tokens`` (placeholder values at prompt positions): the old policy of the PPO ratio;
- ``generation_params`` / ``group_overrides`` (optional): the group's temperature.

Position t of a sequence is predicted from positions < t, so everything per token is shifted by one:
the model reads ``tokens[:-1]`` and is scored on ``tokens[1:]`` where ``masks[1:] != -100``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE = -100
STD_FLOOR = 1e-8  # groups whose scores are all equal get advantage 0, not a division by zero


class BadGroup(ValueError):
    """A group whose fields do not fit together (lengths, types); the trainer skips it with a warning."""


@dataclass
class RolloutBatch:
    """One optimizer step's sequences, padded to one length; per-token tensors are already shifted."""

    input_ids: torch.Tensor          # [B, T] tokens[:-1], padded with pad_id
    attention_mask: torch.Tensor     # [B, T] 1 on real tokens
    targets: torch.Tensor            # [B, T] tokens[1:]
    trained: torch.Tensor            # [B, T] bool: masks[1:] != -100 (never on padding)
    advantages: torch.Tensor         # [B, T] float, per token
    old_logprobs: torch.Tensor | None  # [B, T] sampling policy's log-probs (None: on-policy, ratio 1)
    has_old_logprobs: torch.Tensor   # [B] bool: which sequences carried inference_logprobs
    temperatures: torch.Tensor       # [B] sampling temperature of each sequence
    scores: torch.Tensor             # [B] raw scores (for reward_mean)

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained_tokens(self) -> int:
        return int(self.trained.sum())

    def rows(self, start: int, stop: int) -> RolloutBatch:
        """Sequences ``start:stop`` (a micro-batch), trimmed to their own longest length."""
        length = int(self.attention_mask[start:stop].sum(dim=1).max().clamp_min(1))

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop, :length]

        return RolloutBatch(cut(self.input_ids), cut(self.attention_mask), cut(self.targets), cut(self.trained),
                            cut(self.advantages), cut(self.old_logprobs), self.has_old_logprobs[start:stop],
                            self.temperatures[start:stop], self.scores[start:stop])


def group_advantages(scores: list[float]) -> list[float]:
    """The group's scores, z-scored: (score - mean) / std (population std, floored)."""
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / max(std, STD_FLOOR) for s in scores]


def _temperature(group: dict[str, Any], index: int) -> float:
    """Sampling temperature of a sequence: its override, else the group's generation params or overrides.

    Only called on checked groups: every temperature present is a finite number.
    """
    overrides = group.get("overrides") or []
    own = overrides[index] if index < len(overrides) else None
    for source in (own, group.get("generation_params"), group.get("group_overrides")):
        if isinstance(source, dict) and source.get("temperature") is not None:
            value = float(source["temperature"])
            return value if value > 0 else 1.0
    return 1.0


def _is_number(value: Any) -> bool:
    """A finite int or float (bools and strings are not numbers here: they would coerce silently)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(values: Any, what: str) -> None:
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise BadGroup(f"{what} must be a list of finite numbers")


def _check_tokens(values: Any, what: str, vocab_size: int | None, allow_ignore: bool = False) -> None:
    if not isinstance(values, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise BadGroup(f"{what} must be a list of integer token ids")
    if vocab_size is not None:
        bad = [t for t in values if not (0 <= t < vocab_size or (allow_ignore and t == IGNORE))]
        if bad:
            raise BadGroup(f"{what}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def _check_temperature(source: Any, what: str) -> None:
    if source is None:
        return
    if not isinstance(source, dict):
        raise BadGroup(f"{what} must be an object")
    temperature = source.get("temperature")
    if temperature is not None and not _is_number(temperature):
        raise BadGroup(f"{what}.temperature must be a finite number, got {temperature!r}")


def _check_group(group: dict[str, Any], vocab_size: int | None = None) -> int:
    """The group's sequence count, after checking every field's shape, type, finiteness and token range:
    whatever the environment sent, a bad group is a BadGroup (skipped), never a crash or a NaN weight."""
    if not isinstance(group, dict):
        raise BadGroup("a group must be an object")
    tokens, masks, scores = group.get("tokens"), group.get("masks"), group.get("scores")
    if not isinstance(tokens, list) or not isinstance(masks, list) or not isinstance(scores, list):
        raise BadGroup("tokens, masks and scores must be lists")
    count = len(tokens)
    if count == 0 or len(masks) != count or len(scores) != count:
        raise BadGroup(f"{count} token sequences, {len(masks)} masks and {len(scores)} scores")
    _check_numbers(scores, "scores")
    for name in ("advantages", "inference_logprobs", "overrides"):
        value = group.get(name)
        if value is not None and not isinstance(value, list):
            raise BadGroup(f"{name} must be a list (one entry per sequence)")
        if value is not None and len(value) != count:
            raise BadGroup(f"{name} has {len(value)} entries for {count} sequences")
    for name in ("generation_params", "group_overrides"):
        _check_temperature(group.get(name), name)
    for i in range(count):
        _check_tokens(tokens[i], f"sequence {i}: tokens", vocab_size)
        _check_tokens(masks[i], f"sequence {i}: masks", vocab_size, allow_ignore=True)
        length = len(tokens[i])
        if length < 2:
            raise BadGroup(f"sequence {i} has {length} tokens (needs a prompt and a completion)")
        if len(masks[i]) != length:
            raise BadGroup(f"sequence {i}: {length} tokens but {len(masks[i])} mask entries")
        for name in ("advantages", "inference_logprobs"):
            value = group.get(name)
            if value is not None:
                _check_numbers(value[i], f"sequence {i}: {name}")
                if len(value[i]) != length:
                    raise BadGroup(f"sequence {i}: {length} tokens but {len(value[i])} {name}")
        if group.get("overrides") is not None:
            _check_temperature(group["overrides"][i], f"overrides[{i}]")
    return count


def build_batch(groups: list[dict[str, Any]], pad_id: int, max_tokens: int | None = None,
                vocab_size: int | None = None) -> RolloutBatch:
    """Pad every sequence of ``groups`` into one :class:`RolloutBatch`.

    Sequences longer than ``max_tokens`` are cut (the API was told this limit at registration). Groups
    that do not fit together, carry non-numbers or non-finite values, or token ids outside
    ``0..vocab_size-1`` raise :class:`BadGroup` naming the group.
    """
    sequences: list[dict[str, Any]] = []
    for number, group in enumerate(groups):
        try:
            count = _check_group(group, vocab_size)
        except BadGroup as exc:
            raise BadGroup(f"group {number}: {exc}") from None
        given = group.get("advantages")
        derived = group_advantages([float(s) for s in group["scores"]])
        overrides = group.get("overrides") or [None] * count
        logprobs = group.get("inference_logprobs")
        for i in range(count):
            tokens = list(group["tokens"][i])
            length = len(tokens)
            adv = [float(a) for a in given[i]] if given is not None else [derived[i]] * length
            if isinstance(overrides[i], dict) and overrides[i].get("set_advantage_to_zero"):
                adv = [0.0] * length
            sequences.append({
                "tokens": tokens, "masks": list(group["masks"][i]), "advantages": adv,
                "logprobs": [float(x) for x in logprobs[i]] if logprobs is not None else None,
                "temperature": _temperature(group, i), "score": float(group["scores"][i]),
            })
    if max_tokens is not None:
        cut = [s for s in sequences if len(s["tokens"]) > max_tokens]
        if cut:
            log.warning("%d sequences longer than %d tokens were cut to that length", len(cut), max_tokens)
        for s in cut:
            for key in ("tokens", "masks", "advantages", "logprobs"):
                if s[key] is not None:
                    s[key] = s[key][:max_tokens]
    width = max(len(s["tokens"]) for s in sequences) - 1
    count = len(sequences)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    attention = torch.zeros((count, width), dtype=torch.long)
    targets = torch.zeros((count, width), dtype=torch.long)
    trained = torch.zeros((count, width), dtype=torch.bool)
    advantages = torch.zeros((count, width), dtype=torch.float32)
    old = torch.zeros((count, width), dtype=torch.float32)
    has_old = torch.zeros(count, dtype=torch.bool)
    for row, s in enumerate(sequences):
        n = len(s["tokens"]) - 1
        input_ids[row, :n] = torch.tensor(s["tokens"][:-1])
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(s["tokens"][1:])
        trained[row, :n] = torch.tensor(s["masks"][1:]) != IGNORE
        advantages[row, :n] = torch.tensor(s["advantages"][1:])
        if s["logprobs"] is not None:
            old[row, :n] = torch.tensor(s["logprobs"][1:])
            has_old[row] = True
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, targets=targets, trained=trained, advantages=advantages,
        old_logprobs=old if bool(has_old.any()) else None, has_old_logprobs=has_old,
        temperatures=torch.tensor([s["temperature"] for s in sequences], dtype=torch.float32),
        scores=torch.tensor([s["score"] for s in sequences], dtype=torch.float32),
    )
