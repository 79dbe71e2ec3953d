"""Training data: read a source, check every row, convert it to the rows TRL's trainers take.

    prepared = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
    trainer = SFTTrainer(..., train_dataset=prepared.train, eval_dataset=prepared.eval)

Sources live in :mod:`posttrain.data.sources`, formats and canonical rows in :mod:`posttrain.data.formats`.
Chat templates are not applied here: the rows stay conversational and the trainer's tokenizer renders them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.data.formats import ConvertedRows, convert_rows
from posttrain.data.sources import RawRow, read_rows
from posttrain.errors import ConfigError, DatasetError
from posttrain.spec import DataSpec, MethodName

if TYPE_CHECKING:
    import datasets

__all__ = [
    "ConvertedRows",
    "PreparedData",
    "RawRow",
    "convert_rows",
    "load_held_out",
    "load_training_data",
    "read_rows",
    "split_rows",
    "to_dataset",
]


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: str  # the declared format, or the one detected from the columns
    skipped: int  # bad rows dropped by on_bad_row=skip (training and validation sources together)
    source: str


def load_training_data(
    spec: DataSpec, method: MethodName, seed: int = 42, *, conversational: bool = True,
    validation_limit: int | None = None,
) -> PreparedData:
    """Read ``spec.source``, check and convert every row for ``method``, and hold out validation rows.

    ``max_samples`` caps the good rows taken from the source (in file order); a ``validation.split_ratio``
    is then held out of those, chosen with ``seed``. ``conversational=False`` keeps plain-string prompts
    and answers as strings, for models without a chat template. ``validation_limit`` caps the rows read
    from a separate validation source (a bounded check reads only a sample).
    """
    validation = spec.validation
    if validation.split_ratio is not None and validation.source is not None:
        raise ConfigError("set either split_ratio or source, not both", "data.validation")
    train = _prepared_rows(spec, spec.source, spec.split, method, conversational, spec.max_samples)
    train_rows, eval_rows, skipped = train.rows, None, train.skipped
    if validation.split_ratio is not None:
        train_rows, eval_rows = split_rows(train.rows, validation.split_ratio, seed, spec.source)
    elif validation.source is not None:
        held_out = _prepared_rows(spec, validation.source, validation.split, method, conversational,
                                  validation_limit)
        eval_rows, skipped = held_out.rows, skipped + held_out.skipped
    return PreparedData(
        train=to_dataset(train_rows, spec.source),
        eval=to_dataset(eval_rows, validation.source or spec.source) if eval_rows is not None else None,
        format=train.format,
        skipped=skipped,
        source=spec.source,
    )


def load_held_out(spec: DataSpec, source: str, split: str, method: MethodName, *,
                  conversational: bool = True) -> datasets.Dataset:
    """Held-out rows of another source, checked and converted for ``method`` as the training rows are."""
    return to_dataset(_prepared_rows(spec, source, split, method, conversational, None).rows, source)


def _prepared_rows(
    spec: DataSpec, source: str, split: str, method: MethodName, conversational: bool, limit: int | None
) -> ConvertedRows:
    converted = convert_rows(
        read_rows(source, split),
        method,
        format=spec.format,
        columns=spec.columns,
        on_bad_row=spec.on_bad_row,
        conversational=conversational,
        limit=limit,
        source=source,
    )
    if not converted.rows:
        raise DatasetError(f"no usable rows: all {converted.skipped} rows were bad and skipped", source)
    return converted


def split_rows(
    rows: list[dict[str, Any]], ratio: float, seed: int, source: str = ""
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``ratio`` of the rows (at least one), chosen with ``seed``; both parts keep file order."""
    held_out = max(1, round(len(rows) * ratio))
    if held_out >= len(rows):
        raise DatasetError(
            f"data.validation.split_ratio={ratio} leaves no training rows out of {len(rows)}", source
        )
    eval_indices = set(random.Random(seed).sample(range(len(rows)), held_out))
    train = [row for index, row in enumerate(rows) if index not in eval_indices]
    evaluation = [row for index, row in enumerate(rows) if index in eval_indices]
    return train, evaluation


def to_dataset(rows: list[dict[str, Any]], source: str = "") -> datasets.Dataset:
    """An in-memory Dataset (no cache files written) from canonical rows."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        # Rows of one format all have the same shape, except preference rows mixing plain-text and chat
        # fields when conversational=False.
        raise DatasetError(
            f"rows do not share one shape ({exc}); use chat lists or plain strings throughout", source
        ) from None
