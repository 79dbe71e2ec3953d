"""Where raw rows come from: local files and folders, ``datasets.save_to_disk`` folders, hub ids and the
samples bundled with the package.

Every row keeps the file it came from and its 1-based number in that file, so that a bad row can be named
in an error. In JSON lines files the row number is the line number; in CSV files row 1 is the first row
after the header.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DatasetError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BUNDLED_PREFIX = "posttrain:"
# Suffixes that make a string a local path even when it does not exist (never a hub id).
_LOCAL_SUFFIXES = (*FILE_SUFFIXES, ".tsv", ".txt", ".arrow", ".gz", ".zip")


@dataclass(frozen=True)
class RawRow:
    """One row as read, before any format is applied."""

    source: str  # the file (or dataset label) the row came from, as the user would recognise it
    row: int  # 1-based position in that source
    values: dict[str, Any]
    # Why the row could not be read (a malformed JSON line), or None. Unreadable rows are still yielded so
    # that on_bad_row=skip can drop and count them like any other bad row.
    error: str | None = None


def read_rows(source: str, split: str = "train") -> Iterator[RawRow]:
    """Rows of ``source``: a local file or folder, a save_to_disk folder, ``posttrain:<sample>`` or a hub id.

    Paths are resolved (and a missing one reported) before the first row is read; rows are then read lazily,
    so a caller that needs only the first rows does not pay for the rest.
    """
    if source.startswith(BUNDLED_PREFIX):
        return read_file(_bundled_sample(source[len(BUNDLED_PREFIX):]), label=source)
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path, label=source)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path, split, label=source)
        return _read_folder(path, label=source)
    if is_local_path(source):
        raise DatasetError(f"dataset path {source} does not exist")
    return _read_hub_dataset(source, split)


def written_as_path(value: str) -> bool:
    """Whether ``value`` is written as a path (absolute, ``./``, ``../`` or ``~``), whatever else it could be."""
    return value.startswith(("/", "./", "../", "~", ".\\", "..\\"))


def looks_like_local_path(source: str) -> bool:
    """True for strings that can only mean a local path, so a missing one is not tried on the hub."""
    return (
        written_as_path(source)
        or Path(source).suffix.lower() in _LOCAL_SUFFIXES
        or source.count("/") > 1  # hub ids are "name" or "owner/name"
    )


def is_local_path(value: str) -> bool:
    """The one rule for "this names a file or folder on this machine" (data sources, model and reference
    model names, the service's path checks): it exists, or it can only be a path. Everything else is a
    hub id (or a ``posttrain:``/``upload:`` reference, which never exists as a path)."""
    return looks_like_local_path(value) or Path(value).expanduser().exists()


def read_file(path: Path, label: str | None = None) -> Iterator[RawRow]:
    """Rows of one .json (a list of objects or JSON lines), .jsonl, .csv or .parquet file."""
    label = label or str(path)
    readers = {".jsonl": _read_json_lines, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is not None:
        return _with_read_errors_named(reader(path, label), label)
    raise DatasetError(
        f"cannot read {path.suffix or 'extension-less'} files; use one of {', '.join(FILE_SUFFIXES)}", label
    )


# ---------------------------------------------------------------------------------------------------
# Files


def _with_read_errors_named(rows: Iterator[RawRow], label: str) -> Iterator[RawRow]:
    """Turn decoding and I/O failures met while reading lazily into errors that name the file."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8", label) from None
    except OSError as exc:
        raise DatasetError(f"cannot read the file: {exc.strerror or exc}", label) from None


def _read_json_lines(path: Path, label: str, text: str | None = None) -> Iterator[RawRow]:
    # Line by line from the file, so a caller that takes the first rows reads only those.
    if text is not None:
        yield from _json_line_rows(iter(text.splitlines()), label)
        return
    with path.open(encoding="utf-8", newline=None) as handle:
        yield from _json_line_rows(handle, label)


def _json_line_rows(lines: Iterable[str], label: str) -> Iterator[RawRow]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(label, lineno, {}, f"not valid JSON: {exc.msg} (line {lineno}, column {exc.colno})")
            continue
        except RecursionError:
            yield RawRow(label, lineno, {}, "not usable JSON: nested too deeply")
            continue
        yield _object_row(value, label, lineno)


def _read_json(path: Path, label: str) -> Iterator[RawRow]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except RecursionError:
        raise DatasetError("not usable JSON: nested too deeply", label) from None
    except json.JSONDecodeError as exc:
        # "Extra data" after a first complete value means the file is JSON lines with a .json name.
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_json_lines(path, label, text)
            return
        raise DatasetError(
            f"not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})", label
        ) from None
    if isinstance(value, dict):
        # A single object is a one-line JSON lines file.
        value = [value]
    if not isinstance(value, list):
        raise DatasetError(f"expected a list of objects or JSON lines, got a JSON {type(value).__name__}", label)
    for index, item in enumerate(value, start=1):
        yield _object_row(item, label, index)


def _object_row(value: Any, label: str, row: int) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(label, row, {}, f"expected a JSON object with named fields, got {type(value).__name__}")
    return RawRow(label, row, value)


def _read_csv(path: Path, label: str) -> Iterator[RawRow]:
    index = 0
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None:
                return
            for index, record in enumerate(reader, start=1):
                if None in record:  # more cells than header columns
                    yield RawRow(label, index, {}, f"has more cells than the header's {len(reader.fieldnames)} columns")
                    continue
                yield RawRow(label, index, dict(record))
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): the rest cannot be read
            raise DatasetError(f"not readable CSV ({exc})", label, index + 1) from None


def _read_parquet(path: Path, label: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DatasetError(f"not a readable parquet file ({exc})", label) from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield RawRow(label, index, record)


# ---------------------------------------------------------------------------------------------------
# Folders, saved datasets, bundled samples and the hub


def _read_folder(path: Path, label: str) -> Iterator[RawRow]:
    # Only the folder's own files: sub-folders often hold other splits (train/, validation/).
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))[:10]
        raise DatasetError(
            f"folder has no {', '.join(FILE_SUFFIXES)} files and is not a datasets.save_to_disk folder"
            + (f" (found: {', '.join(found)})" if found else " (it is empty)"),
            label,
        )
    return _chain(read_file(file, label=str(Path(label) / file.name)) for file in files)


def _chain(iterators: Iterable[Iterator[RawRow]]) -> Iterator[RawRow]:
    for iterator in iterators:
        yield from iterator


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_saved_dataset(path: Path, split: str, label: str) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError... for a damaged folder
        raise DatasetError(f"cannot load the saved dataset ({exc})", label) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"has no split {split!r} (splits: {', '.join(loaded)})", label)
        return _dataset_rows(loaded[split], f"{label}[{split}]")
    return _dataset_rows(loaded, label)


def _dataset_rows(dataset: Any, label: str) -> Iterator[RawRow]:
    # Batched reads: row-by-row access to an Arrow-backed Dataset is much slower.
    for start in range(0, len(dataset), 1024):
        batch = dataset[start:start + 1024]
        columns = list(batch)
        for offset in range(len(batch[columns[0]]) if columns else 0):
            yield RawRow(label, start + offset + 1, {name: batch[name][offset] for name in columns})


def _read_hub_dataset(name: str, split: str) -> Iterator[RawRow]:
    """``owner/name`` or ``owner/name:config`` (hub ids never contain ':'), e.g. ``openai/gsm8k:main``."""
    import datasets

    repo, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as exc:  # network, auth, unknown id or split: all mean "cannot use this source"
        raise DatasetError(
            f"cannot load hub dataset {name!r} (split {split!r}): {exc}. A local path must exist; "
            "a hub id must be reachable from this machine"
        ) from None
    return _dataset_rows(dataset, f"{name}[{split}]")


def _bundled_sample(name: str) -> Path:
    # Imported on use: the samples belong to tiny.py (the embedded model trains its tokenizer on them).
    from posttrain.tiny import sample_path

    path = sample_path(BUNDLED_PREFIX + name)
    if not path.is_file():
        raise DatasetError(f"bundled sample {BUNDLED_PREFIX}{name} is missing from the installation ({path})")
    return path
