"""OpenAI's fine-tuning JSONL formats, checked line by line as a file arrives (``POST /v1/files`` with a
``purpose``, what OpenAI's SDK sends).

Each line is one JSON object in one of three shapes, and one file holds one shape:

- chat (supervised): ``{"messages": [..., {"role": "assistant", ...}]}``
- prompt (reinforcement): ``{"messages": [..., {"role": "user", ...}], "<field>": ...}``; graders read the
  other fields as ``{{item.<field>}}``
- preference (DPO): ``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``

The rows are read by the same formats that train on them (``posttrain.data.formats``), so a file that
passes here also reads at training time; which method it suits is checked when a job names it.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.formats import RowProblem, conversation_field, preference_row
from posttrain.data.sources import read_file
from posttrain.errors import DatasetError

SHAPES = {
    "chat": "chat rows ('messages' ending with an assistant turn)",
    "prompt": "reinforcement prompts ('messages' ending with a user turn)",
    "preference": "preference rows ('input', 'preferred_output', 'non_preferred_output')",
}


def line_shape(values: dict) -> str:
    """The shape of one row, checked; raises RowProblem naming the field at fault."""
    if any(key in values for key in ("preferred_output", "non_preferred_output")):
        preference_row(values, "dpo")
        return "preference"
    if "messages" in values:
        messages = conversation_field(values, "messages")
        return "chat" if messages[-1]["role"] == "assistant" else "prompt"
    found = ", ".join(sorted(values)) or "none"
    raise RowProblem(f"expected 'messages' (chat or reinforcement rows) or 'input' / 'preferred_output' / "
                     f"'non_preferred_output' (preference rows); found the fields {found}")


def check_fine_tuning_file(path: Path, label: str) -> str:
    """Check every line of a JSONL file; returns its shape. A bad line raises DatasetError naming the
    file and the line number."""
    shape = None
    first_line = 0
    for raw in read_file(path, label):
        try:
            if raw.error is not None:
                raise RowProblem(raw.error)
            found = line_shape(raw.values)
        except RowProblem as problem:
            raise DatasetError(f"line {raw.row}: {problem}", label) from None
        if shape is None:
            shape, first_line = found, raw.row
        elif found != shape:
            raise DatasetError(f"line {raw.row}: {SHAPES[found]}, but line {first_line} began a file of "
                               f"{SHAPES[shape]}; one file holds one kind of row", label)
    if shape is None:
        raise DatasetError("the file holds no rows", label)
    return shape
