"""Held-out rows for evaluation, in any format posttrain reads, as one shape: :class:`EvalRow`.

    rows = load_eval_rows("held_out.jsonl").rows          # or eval_rows(prepared.eval) for a split
    sample = sample_rows(rows, max_samples=32, seed=42)

Each row keeps what every kind of metric needs: the prompt the model answers, the reference reply
(teacher-forced loss), a pair's rejected reply (preference metrics), and ``item``, the row's fields as
read with ``answer`` set to its reference answer, which graders read as ``{{item.<field>}}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Literal

from posttrain.data.formats import DETECTION_ROWS, convert_rows, detect_format
from posttrain.data.sources import read_rows
from posttrain.errors import DatasetError

Message = dict[str, str]
Text = str | list[Message]
RowKind = Literal["reply", "pair", "prompt", "text"]
# Which method's canonical rows a format converts to for evaluation (keeping what the format has).
FORMAT_METHODS = {"preference": "dpo", "prompt": "grpo"}


@dataclass
class EvalRow:
    """One held-out row. ``kind``: reply (prompt + reference reply), pair (prompt + chosen + rejected),
    prompt (a prompt and a reference answer, no reply to score), text (plain text: loss only)."""

    kind: RowKind
    prompt: Text | None
    reply: Text | None = None  # the reference reply (a pair's chosen one)
    rejected: Text | None = None
    answer: str = ""  # the reference answer graders compare with: the reply's text, or the row's answer
    item: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalRows:
    rows: list[EvalRow]
    format: str
    skipped: int
    source: str


def text_of(value: Text | None) -> str:
    """The text of a reply: a string, or the contents of a list of messages."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "".join(str(message.get("content", "")) for message in value)


def eval_row(canonical: Mapping[str, Any], values: Mapping[str, Any] | None = None) -> EvalRow:
    """An EvalRow from a canonical row (:mod:`posttrain.data.formats`) and, when known, its fields as read."""
    fields = dict(values or {})
    if "item" in canonical and isinstance(canonical["item"], str):  # OpenAI reinforcement rows carry their row
        parsed = json.loads(canonical["item"])
        fields = {**parsed, **fields} if isinstance(parsed, dict) else fields
    if "chosen" in canonical:
        row = EvalRow("pair", canonical["prompt"], canonical["chosen"], canonical["rejected"],
                      text_of(canonical["chosen"]))
    elif "completion" in canonical:
        row = EvalRow("reply", canonical["prompt"], canonical["completion"], answer=text_of(canonical["completion"]))
    elif "messages" in canonical:
        messages = canonical["messages"]
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        row = EvalRow("reply", messages[:last], messages[last:last + 1], answer=str(messages[last]["content"]))
    elif "text" in canonical:
        row = EvalRow("text", None, canonical["text"], answer=canonical["text"])
    else:
        row = EvalRow("prompt", canonical["prompt"], answer=str(canonical.get("answer", "")))
    row.item = {**fields, "answer": row.answer}
    return row


def eval_rows(canonical_rows: Any) -> list[EvalRow]:
    """EvalRows from canonical rows (a list, or the datasets.Dataset the training data holds out)."""
    return [eval_row(row) for row in canonical_rows]


def load_eval_rows(source: str, split: str = "validation", *, format: str = "auto",
                   columns: Mapping[str, str] | None = None, on_bad_row: str = "error",
                   conversational: bool = True) -> EvalRows:
    """Every row of ``source`` (a file, folder, hub id or ``posttrain:`` sample) as an EvalRow. The format is
    detected from the columns unless given; rows keep their own shape (a preference row stays a pair)."""
    raw = read_rows(source, split)
    first = list(islice(raw, DETECTION_ROWS))
    if not first:
        raise DatasetError("has no rows", source)
    fmt = format
    if fmt == "auto":
        readable = [row.values for row in first if row.error is None]
        fmt = detect_format(readable, source) if readable else "text"
        if fmt == "messages" and _prompts_only(readable):
            fmt = "prompt"  # messages ending with the user's turn: prompts to answer (OpenAI reinforcement rows)
    method = FORMAT_METHODS.get(fmt, "sft")
    converted = convert_rows(chain(first, raw), method, format=fmt, columns=columns,  # type: ignore[arg-type]
                             on_bad_row=on_bad_row, conversational=conversational, source=source, keep_values=True)
    if not converted.rows:
        raise DatasetError(f"no usable rows: all {converted.skipped} rows were bad and skipped", source)
    values = converted.values or [{}] * len(converted.rows)
    rows = [eval_row(row, value) for row, value in zip(converted.rows, values, strict=True)]
    return EvalRows(rows, converted.format, converted.skipped, source)


def _prompts_only(rows: list[dict[str, Any]]) -> bool:
    messages = [row.get("messages") for row in rows if isinstance(row.get("messages"), list) and row["messages"]]
    return bool(messages) and all(isinstance(m[-1], dict) and m[-1].get("role") != "assistant" for m in messages)


def sample_indices(count: int, max_samples: int | None, seed: int) -> list[int]:
    """The positions of at most ``max_samples`` of ``count`` rows, chosen with ``seed``, in file order."""
    if max_samples is None or count <= max_samples:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), max_samples))


def sample_rows(rows: list[EvalRow], max_samples: int | None, seed: int) -> list[EvalRow]:
    return [rows[index] for index in sample_indices(len(rows), max_samples, seed)]
