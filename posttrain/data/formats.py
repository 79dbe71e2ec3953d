"""Row formats and their conversion to the canonical rows TRL's trainers take.

Each ``<format>_row`` function checks one source row and returns its canonical form for a method, or raises
:class:`RowProblem` naming the field at fault. :func:`convert_rows` runs them over a whole source, adding the
file and row number to each problem, and drops bad rows in skip mode.

Canonical rows (``conversational=True``; with False, rows whose parts are plain strings stay strings):

=========  ==========================================================================================
sft        ``{"prompt": [user], "completion": [assistant]}`` (alpaca, preference: chosen),
           ``{"messages": [...]}`` (sharegpt, messages), ``{"text": str}`` (text)
dpo/reward ``{"prompt": [...], "chosen": [assistant...], "rejected": [assistant...]}``
grpo       ``{"prompt": [user], "answer": str}`` (the answer column reaches reward functions as a kwarg)
ppo        ``{"prompt": [...]}`` (prompt-only: the reward model scores the answers, no reference answer)
=========  ==========================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from posttrain.data.sources import RawRow
from posttrain.errors import DatasetError
from posttrain.rewards import final_answer
from posttrain.spec import DataFormat, MethodName

Message = dict[str, str]

# Keys a row must have for a format; "a|b" means either. Used by auto-detection and in error messages.
# Detection breaks ties in this order, so a row with prompt/chosen/rejected and an answer is a preference row.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    # prompt is optional when chosen/rejected are conversations; OpenAI's preference rows name the three
    # parts input / preferred_output / non_preferred_output.
    "preference": ("chosen|preferred_output", "rejected|non_preferred_output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt": ("prompt|question", "answer"),  # and OpenAI's reinforcement rows: messages plus any fields
    "text": ("text",),
}
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "sharegpt", "messages", "text", "preference"),
    "dpo": ("preference",),
    "reward": ("preference",),
    "grpo": ("prompt",),
    "ppo": ("prompt",),
}
METHOD_NEEDS: dict[str, str] = {
    "sft": "instruction/output, conversations, messages, text or prompt/chosen rows",
    "dpo": "prompt/chosen/rejected rows",
    "reward": "prompt/chosen/rejected rows",
    "grpo": "prompt/answer (or question/answer) rows",
    "ppo": "prompt-only rows: a prompt (or question) column, or messages ending with the user's turn",
}
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "system": "system", "tool": "tool"}
DETECTION_ROWS = 20


class RowProblem(ValueError):
    """Why one row does not fit its format; :func:`convert_rows` adds the file and row number."""


# ---------------------------------------------------------------------------------------------------
# Detection and method checks


def detect_format(rows: list[dict[str, Any]], source: str) -> str:
    """The format whose required keys most of the first rows have (ties go to the earlier format)."""
    best, best_count = None, 0
    for name in REQUIRED_KEYS:
        count = sum(_has_keys(row, REQUIRED_KEYS[name]) for row in rows)
        if count > best_count:
            best, best_count = name, count
    if best is None:
        found = sorted({key for row in rows for key in row})
        expected = "; ".join(
            f"{name}: {', '.join(key.replace('|', ' or ') for key in keys)}" for name, keys in REQUIRED_KEYS.items()
        )
        raise DatasetError(
            f"cannot tell the format from the columns {', '.join(found) or '(none)'}. Formats need: {expected}. "
            "Rename columns with data.columns or set data.format",
            source,
        )
    return best


def _has_keys(row: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    return all(any(option in row for option in key.split("|")) for key in keys)


def check_method(fmt: str, method: MethodName, source: str | None = None) -> None:
    """Raise if rows of ``fmt`` cannot train ``method``."""
    if fmt not in METHOD_FORMATS[method]:
        raise DatasetError(f"format {fmt} cannot train method {method}: needs {METHOD_NEEDS[method]}", source)


# ---------------------------------------------------------------------------------------------------
# Field checks


def text_field(values: Mapping[str, Any], field: str, where: str | None = None) -> str:
    """A non-empty string; ``where`` names the field in errors when it is nested (``messages[2].content``)."""
    value = values.get(field)
    where = where or field
    if value is None:
        raise RowProblem(f"field {where!r} is missing")
    if not isinstance(value, str):
        raise RowProblem(f"field {where!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(f"field {where!r} is empty")
    return value


def optional_text_field(values: Mapping[str, Any], field: str) -> str:
    value = values.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _decoded_list(value: Any) -> Any:
    # CSV cells cannot hold lists; a cell holding a JSON list of messages is read as one.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and all(isinstance(item, dict) for item in decoded):
            return decoded
    return value


def is_conversation(value: Any) -> bool:
    return isinstance(_decoded_list(value), list)


def conversation_field(values: Mapping[str, Any], field: str) -> list[Message]:
    """A list of {role, content} (or ShareGPT {from, value}) messages, normalised to role/content."""
    value = _decoded_list(values.get(field))
    if value is None:
        raise RowProblem(f"field {field!r} is missing")
    if not isinstance(value, list):
        raise RowProblem(f"field {field!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowProblem(f"field {field!r} is an empty conversation")
    return [_message(item, f"{field}[{index}]") for index, item in enumerate(value)]


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise RowProblem(f"field {where!r} must be a message object, got {type(item).__name__}")
    role_key = "role" if "role" in item else "from"
    content_key = "content" if "content" in item or role_key == "role" else "value"
    role = item.get(role_key)
    if role is None:
        raise RowProblem(f"field '{where}.role' is missing (a message needs role/content or from/value)")
    if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
        raise RowProblem(
            f"field '{where}.{role_key}' is {role!r}; expected one of {', '.join(ROLE_NAMES)}"
        )
    content = text_field(item, content_key, f"{where}.{content_key}")
    return {"role": ROLE_NAMES[role.lower()], "content": content}


def _with_assistant_turn(messages: list[Message], field: str) -> list[Message]:
    if not any(message["role"] == "assistant" for message in messages):
        raise RowProblem(f"field {field!r} has no assistant turn to learn from")
    return messages


def _user(text: str, system: str = "") -> list[Message]:
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return [*messages, {"role": "user", "content": text}]


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------
# Formats


def alpaca_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    instruction = text_field(values, "instruction")
    extra_input = optional_text_field(values, "input")
    output = text_field(values, "output")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    if not conversational:
        return {"prompt": prompt, "completion": output}
    return {"prompt": _user(prompt, optional_text_field(values, "system")), "completion": _assistant(output)}


def messages_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    return {"messages": _with_assistant_turn(conversation_field(values, "messages"), "messages")}


def sharegpt_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    return {"messages": _with_assistant_turn(conversation_field(values, "conversations"), "conversations")}


def text_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    return {"text": text_field(values, "text")}


def preference_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    """prompt/chosen/rejected for DPO and reward; prompt/completion (the chosen answer) for SFT."""
    if "preferred_output" in values or "non_preferred_output" in values:
        prompt, chosen, rejected = _openai_preference(values)
    elif values.get("prompt") is None:
        prompt, chosen, rejected = _implicit_prompt(values)
    else:
        parts = {field: _text_or_conversation(values, field) for field in ("prompt", "chosen", "rejected")}
        if conversational or any(isinstance(part, list) for part in parts.values()):
            # Mixed rows (a string prompt with chat answers) become chat throughout.
            parts = {
                field: part if isinstance(part, list) else (_user(part) if field == "prompt" else _assistant(part))
                for field, part in parts.items()
            }
        prompt, chosen, rejected = parts["prompt"], parts["chosen"], parts["rejected"]
    if chosen == rejected:
        raise RowProblem("fields 'chosen' and 'rejected' are identical")
    if method == "sft":
        return {"prompt": prompt, "completion": chosen}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _openai_preference(values: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """OpenAI's preference row: ``{"input": {"messages": [...]}, "preferred_output": [assistant...],
    "non_preferred_output": [assistant...]}``."""
    source = values.get("input")
    if not isinstance(source, Mapping):
        raise RowProblem("field 'input' must be an object holding 'messages' (OpenAI's preference format)")
    prompt = conversation_field(source, "messages")
    chosen = conversation_field(values, "preferred_output")
    rejected = conversation_field(values, "non_preferred_output")
    for field, messages in (("preferred_output", chosen), ("non_preferred_output", rejected)):
        if any(message["role"] != "assistant" for message in messages):
            raise RowProblem(f"field {field!r} may hold only assistant messages")
    return [{**m} for m in prompt], chosen, rejected


def _text_or_conversation(values: Mapping[str, Any], field: str) -> str | list[Message]:
    if is_conversation(values.get(field)):
        return conversation_field(values, field)
    return text_field(values, field)


def common_prefix_length(first: Sequence[Any], second: Sequence[Any]) -> int:
    """How many leading items two sequences (turns, token ids) share."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _implicit_prompt(values: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    """Split chosen/rejected conversations into their shared leading turns (the prompt) and the answers."""
    if not (is_conversation(values.get("chosen")) and is_conversation(values.get("rejected"))):
        for field in ("chosen", "rejected"):
            text_field(values, field)  # report a missing/empty answer before the missing prompt
        raise RowProblem(
            "field 'prompt' is missing (without a prompt, chosen and rejected must be conversations "
            "that share their leading turns)"
        )
    chosen = conversation_field(values, "chosen")
    rejected = conversation_field(values, "rejected")
    shared = common_prefix_length(chosen, rejected)
    if shared == 0:
        raise RowProblem("field 'prompt' is missing and chosen/rejected share no leading turns to use as one")
    if shared == len(chosen) or shared == len(rejected):
        raise RowProblem("fields 'chosen' and 'rejected' have no answer after their shared turns")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def prompt_row(values: Mapping[str, Any], method: MethodName, conversational: bool = True) -> dict[str, Any]:
    """A prompt with a reference answer for GRPO; GSM8k rows (question, answer ending in '#### N') included.
    PPO rows are the prompt alone: its reward model needs no answer, so one is neither required nor kept."""
    if method == "ppo":
        return {"prompt": _ppo_prompt(values, conversational)}
    if values.get("prompt") is None and values.get("question") is None and "messages" in values:
        return _openai_prompt_row(values)
    gsm8k_style = values.get("prompt") is None and values.get("question") is not None
    if gsm8k_style:
        prompt: str | list[Message] = text_field(values, "question")
    elif is_conversation(values.get("prompt")):
        prompt = conversation_field(values, "prompt")
    else:
        prompt = text_field(values, "prompt")
    if conversational and isinstance(prompt, str):
        prompt = _user(prompt)
    return {"prompt": prompt, "answer": _final_answer(values, require_marker=gsm8k_style)}


def _ppo_prompt(values: Mapping[str, Any], conversational: bool) -> str | list[Message]:
    if values.get("prompt") is None and values.get("question") is None and "messages" in values:
        prompt: str | list[Message] = conversation_field(values, "messages")
        if prompt[-1]["role"] == "assistant":
            raise RowProblem("field 'messages' ends with an assistant turn; a PPO prompt ends with the user's "
                             "turn (the model writes the answer)")
        return prompt
    field = "prompt" if values.get("prompt") is not None or values.get("question") is None else "question"
    prompt = conversation_field(values, field) if is_conversation(values.get(field)) else text_field(values, field)
    return _user(prompt) if conversational and isinstance(prompt, str) else prompt


def _openai_prompt_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's reinforcement row: ``messages`` (the prompt, ending with a user turn) plus any fields the
    graders read as ``{{item.<field>}}``. The whole row rides along as the JSON ``item`` column (one column
    whatever the fields' types); ``answer``, when present, also feeds the built-in rewards."""
    prompt = conversation_field(values, "messages")
    if prompt[-1]["role"] == "assistant":
        raise RowProblem("field 'messages' ends with an assistant turn; a reinforcement prompt ends with the "
                         "user's turn (the model writes the answer)")
    answer = values.get("answer")
    return {"prompt": prompt, "answer": "" if answer is None else str(answer),
            "item": json.dumps(dict(values), default=str)}


def _final_answer(values: Mapping[str, Any], require_marker: bool) -> str:
    answer = values.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return str(answer)
    answer = text_field(values, "answer")
    final = final_answer(answer)
    if final is not None:
        if not final:
            raise RowProblem("field 'answer' has nothing after '####'")
        return final
    if require_marker:
        raise RowProblem("field 'answer' does not end in '#### <final answer>' (GSM8k style)")
    return answer.strip()


ROW_CONVERTERS: dict[str, Callable[[Mapping[str, Any], MethodName, bool], dict[str, Any]]] = {
    "alpaca": alpaca_row,
    "sharegpt": sharegpt_row,
    "messages": messages_row,
    "text": text_row,
    "preference": preference_row,
    "prompt": prompt_row,
}


# ---------------------------------------------------------------------------------------------------
# Whole sources


@dataclass
class ConvertedRows:
    rows: list[dict[str, Any]]
    format: str
    skipped: int
    values: list[dict[str, Any]] | None = None  # each kept row's fields as read (convert_rows(keep_values=True))


def convert_rows(
    raw_rows: Iterable[RawRow],
    method: MethodName,
    *,
    format: DataFormat = "auto",
    columns: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    conversational: bool = True,
    limit: int | None = None,
    source: str = "",
    keep_values: bool = False,
) -> ConvertedRows:
    """Rename columns, detect or check the format, and convert every row (up to ``limit`` good ones).

    A bad row raises :class:`DatasetError` naming its file, row number and field, or with
    ``on_bad_row="skip"`` is dropped and counted. ``keep_values`` also keeps each converted row's fields as
    read (evaluation graders refer to any of them).
    """
    columns = columns or {}
    remaining = iter(raw_rows)
    first = list(islice(remaining, DETECTION_ROWS))
    if not first:
        raise DatasetError("has no rows", source)
    _check_columns_exist(first, columns, source)
    readable = [_renamed(raw, columns).values for raw in first if raw.error is None]
    if not readable and on_bad_row != "skip":
        raise DatasetError(str(first[0].error), first[0].source, first[0].row)
    if format == "auto" and method == "ppo":
        fmt = "prompt"  # prompt-only rows match no format's required keys; PPO reads nothing else
    else:
        fmt = detect_format(readable, source) if format == "auto" else format
    if format == "auto" and method == "grpo" and fmt == "messages":
        fmt = "prompt"  # messages without the answer: OpenAI's reinforcement rows, prompts for GRPO
    check_method(fmt, method, source or None)
    convert = ROW_CONVERTERS[fmt]
    rows: list[dict[str, Any]] = []
    values: list[dict[str, Any]] | None = [] if keep_values else None
    skipped = 0
    for raw in (_renamed(raw, columns) for raw in chain(first, remaining)):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if raw.error is not None:
                raise RowProblem(raw.error)
            rows.append(convert(raw.values, method, conversational))
        except RowProblem as problem:
            if on_bad_row != "skip":
                raise DatasetError(str(problem), raw.source, raw.row) from None
            skipped += 1
            continue
        if values is not None:
            values.append(raw.values)
    return ConvertedRows(rows, fmt, skipped, values)


def _renamed(raw: RawRow, columns: Mapping[str, str]) -> RawRow:
    if not columns or raw.error is not None:
        return raw
    values = {columns.get(key, key): value for key, value in raw.values.items()}
    return RawRow(raw.source, raw.row, values)


def _check_columns_exist(first: list[RawRow], columns: Mapping[str, str], source: str) -> None:
    found = {key for raw in first if raw.error is None for key in raw.values}
    missing = [old for old in columns if old not in found]
    if found and missing:
        raise DatasetError(
            f"data.columns renames {', '.join(repr(name) for name in missing)}, but the data has no such "
            f"column (columns: {', '.join(sorted(found))})",
            source,
        )
