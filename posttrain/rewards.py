"""Reward functions for GRPO: built-ins for numeric answers and format, plus user ``module:function``.

A reward function follows TRL's contract: ``f(prompts, completions, **columns) -> list[float | None]``,
where extra dataset columns (such as ``answer``) arrive as keyword lists aligned with completions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from posttrain.errors import ConfigError
from posttrain.import_paths import ImportPathError, import_object, is_import_path

RewardFunction = Callable[..., list[float | None]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LEADING_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
# GSM8k's answer convention, the one place it is written: reasoning, then '#### <final answer>'.
FINAL_ANSWER = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)


def final_answer(text: str) -> str | None:
    """What follows the '####' marker (stripped; may be empty), or None when there is no marker."""
    match = FINAL_ANSWER.search(text)
    return match.group(1) if match else None


def final_number(text: str) -> str | None:
    """The number right after '####', if the text has the marker and a number follows it."""
    final = final_answer(text)
    match = _LEADING_NUMBER.match(final) if final is not None else None
    return match.group(0) if match else None


def completion_text(completion: Any) -> str:
    """The text of a completion, whether plain or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion if isinstance(message, dict))
    return str(completion)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer: after '####' if present, else the last number in the text."""
    number = final_number(text)
    if number is not None:
        return _to_number(number)
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def numeric_match(completions: list[Any], answer: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 where the completion's final number equals the reference answer, else 0.0."""
    if answer is None:
        raise ConfigError("reward 'numeric_match' needs an 'answer' column in the data (prompt format)")
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        got, want = extract_answer(completion_text(completion)), _to_number(str(reference))
        rewards.append(1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0)
    return rewards


def answer_format(completions: list[Any], **_: Any) -> list[float]:
    """Partial credit for reasoning that ends in a '#### N' answer line, as GSM8k answers do."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        score = 0.0
        if "####" in text:
            score += 0.5
        if final_number(text) is not None:
            score += 0.5
        rewards.append(score)
    return rewards


def final_line_match(completions: list[Any], answer: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 where the completion states its answer once, on a '#### N' line whose N is the reference answer;
    0.0 for a wrong number, no marker, or several markers (a column of '####' lines earns nothing)."""
    if answer is None:
        raise ConfigError("reward 'final_line_match' needs an 'answer' column in the data (prompt format)")
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        text = completion_text(completion)
        number = final_number(text) if text.count("####") == 1 else None
        got, want = _to_number(number) if number is not None else None, _to_number(str(reference))
        rewards.append(1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0)
    return rewards


def repetition(completions: list[Any], **_: Any) -> list[float]:
    """A penalty for saying the same thing again: minus the share of repeated lines or of repeated word
    3-grams, whichever is larger (0 for none, towards -1 for a completion made of repeats). Numbers do not
    make a line new: '#### 1', '#### 2', '#### 3' are one line repeated."""
    rewards = []
    for completion in completions:
        text = _NUMBER.sub("0", completion_text(completion))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        words = text.split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        repeated_lines = 1 - len(set(lines)) / len(lines) if lines else 0.0
        repeated_grams = 1 - len(set(grams)) / len(grams) if grams else 0.0
        rewards.append(-max(repeated_lines, repeated_grams))
    return rewards


def length(completions: list[Any], **_: Any) -> list[float]:
    """Prefers shorter completions (1 / (1 + words/50)); a tie-breaker, not a goal on its own."""
    return [1.0 / (1.0 + len(completion_text(c).split()) / 50.0) for c in completions]


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "numeric_match": numeric_match,
    "answer_format": answer_format,
    "final_line_match": final_line_match,
    "repetition": repetition,
    "length": length,
}


def is_user_reward(name: str) -> bool:
    """True for a ``module:function`` reward: code from outside posttrain that the worker imports."""
    return name not in BUILTIN_REWARDS


def check_reward_name(name: str) -> None:
    """A built-in name or well-formed ``module:function``, checked without importing anything: the
    service's API process never imports user code (the worker does, in its own process)."""
    if name in BUILTIN_REWARDS:
        return
    if ":" not in name:
        raise ConfigError(
            f"unknown reward function {name!r}; built-ins are {', '.join(BUILTIN_REWARDS)}, "
            "or give 'module:function'",
            "method.reward_functions",
        )
    if not is_import_path(name):
        raise ConfigError(f"reward function {name!r} is not of the form 'package.module:function'",
                          "method.reward_functions")


def check_reward_names(names: list[str]) -> None:
    if not names:
        raise ConfigError("GRPO needs at least one reward function", "method.reward_functions")
    for name in names:
        check_reward_name(name)


def resolve_reward_function(name: str) -> RewardFunction:
    """The function itself: a built-in, or ``module:function`` imported (in the worker only)."""
    check_reward_name(name)
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    try:
        function = import_object(name)
    except ImportPathError as exc:
        raise ConfigError(f"reward {name!r}: {exc}", "method.reward_functions") from None
    if not callable(function):
        raise ConfigError(f"reward {name!r} is not a function", "method.reward_functions")
    return function


def resolve_reward_functions(names: list[str]) -> list[RewardFunction]:
    check_reward_names(names)
    return [resolve_reward_function(name) for name in names]
