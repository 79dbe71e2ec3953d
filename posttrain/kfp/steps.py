"""What the pipeline's components run: posttrain's data loader, the worker and the job directory.

The components (components.py) only unpack KFP artifacts and call these functions, so every step runs
the same code as ``posttrain train``: ``prepare_dataset`` reads and checks the rows with the data loader
the worker uses, ``train_job`` is ``run_worker`` on a job directory, ``export_model`` checks that
``final/`` loads and copies it into the Model artifact.

When the pipeline runs on this machine for a job directory (``posttrain kfp run --local``, a service job),
a step that fails records why in that directory's status.json, as the worker does for its own failures.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, PosttrainError
from posttrain.job.directory import JobDir, atomic_write_text
from posttrain.spec import JobSpec, spec_from_dict

log = logging.getLogger("posttrain.kfp")

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"


class StepFailed(PosttrainError):
    """A pipeline step that could not do its job; its message is recorded in the job directory."""


def parse_spec(spec_json: str) -> JobSpec:
    try:
        data = json.loads(spec_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"spec_json is not JSON: {exc}") from None
    return spec_from_dict(data)


def _record_failure(job_dir: str, step: str, message: str) -> None:
    if job_dir:
        JobDir(job_dir).create().update_status(state="failed", error=f"{step}: {message}")


def _jsonable(value: Any) -> Any:
    """Values of parquet/saved-dataset rows that JSON does not know (numpy arrays, dates) as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_rows(source: str, split: str, path: Path) -> int:
    """The source's readable rows, unchanged, as JSON lines (the train step applies the same format,
    columns and limits to them as to the original)."""
    from posttrain.data import read_rows

    count = 0
    lines = []
    for row in read_rows(source, split):
        if row.error is None:  # an unreadable line: the check already failed on it or counted it as skipped
            lines.append(json.dumps(row.values, ensure_ascii=False, default=_jsonable) + "\n")
            count += 1
    atomic_write_text(path, "".join(lines))
    return count


def uploaded_spec(spec: JobSpec, uploaded_dir: str) -> JobSpec:
    """The spec of a remote run whose local data files were uploaded: their names are relative to the
    imported Dataset artifact's folder."""
    data = spec.data.model_copy(deep=True)
    data.source = str(Path(uploaded_dir) / data.source)
    if data.validation.source is not None:
        data.validation.source = str(Path(uploaded_dir) / data.validation.source)
    return spec.model_copy(update={"data": data})


def prepare_dataset(spec_json: str, out_dir: str, *, uploaded_dir: str | None = None,
                    job_dir: str = "") -> dict[str, Any]:
    """Check every row of the spec's data as training would, and write the rows to ``out_dir``
    (train.jsonl, validation.jsonl when the spec names a validation source). Returns the Dataset's
    metadata: row counts, format, skipped rows."""
    from posttrain.data import load_training_data

    try:
        spec = parse_spec(spec_json)
        if uploaded_dir:
            spec = uploaded_spec(spec, uploaded_dir)
        prepared = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = _write_rows(spec.data.source, spec.data.split, out / TRAIN_FILE)
        if spec.data.validation.source is not None:
            _write_rows(spec.data.validation.source, spec.data.validation.split, out / VALIDATION_FILE)
    except PosttrainError as exc:
        _record_failure(job_dir, "prepare-data", exc.message)
        raise
    metadata = {"source": spec.data.source, "format": prepared.format, "rows": written,
                "train_rows": len(prepared.train), "skipped": prepared.skipped,
                "validation_rows": len(prepared.eval) if prepared.eval is not None else 0}
    log.info("prepared data: %s", metadata)
    return metadata


def dataset_spec(spec: JobSpec, dataset_dir: str) -> JobSpec:
    """The spec the train step runs: its data read from the prepared Dataset, one process (the pipeline
    is the launcher here, so the worker must not start another one)."""
    data = spec.data.model_copy(deep=True)
    data.source = str(Path(dataset_dir) / TRAIN_FILE)
    if data.validation.source is not None:
        data.validation.source = str(Path(dataset_dir) / VALIDATION_FILE)
    distributed = spec.distributed.model_copy(update={"launcher": "local"})
    return spec.model_copy(update={"data": data, "distributed": distributed})


def train_job(spec_json: str, dataset_dir: str, job_dir: str, *, resume: bool = False,
              log_file: bool = True) -> int:
    """Run the worker on ``job_dir`` with the prepared data; returns the worker's exit code (0: the job
    succeeded and final/ is written). The job directory gets status, metrics, checkpoints and final/
    exactly as from ``posttrain train``."""
    from posttrain.worker import run_worker

    # Raises, recording nothing, only when job_dir holds another run (never overwrite that run's status).
    job_spec = parse_spec(spec_json)
    result = run_worker(dataset_spec(job_spec, dataset_dir), job_dir, resume=resume, log_to_file=log_file,
                        recorded_spec=job_spec)
    if result.state == "succeeded" and (Path(job_dir) / "final").is_dir():
        return 0
    if result.state == "succeeded":
        _record_failure(job_dir, "train", "the job wrote no final/ (output.save_final=false): nothing to export")
        return 1
    return result.exit_code


def final_kind(final: Path) -> str:
    if (final / "adapter_config.json").is_file():
        return "adapter"
    if (final / "config.json").is_file():
        return "model"
    raise StepFailed(f"{final} holds neither adapter_config.json nor config.json")


def export_model(job_dir: str, model_dir: str, *, record_in: str = "") -> dict[str, Any]:
    """Check that ``job_dir``/final loads (its config and tokenizer) and copy it to ``model_dir``.
    Returns the Model's metadata: adapter or full model, its base, method, steps and final loss."""
    from transformers import AutoConfig, AutoTokenizer

    jd = JobDir(job_dir)
    try:
        final = jd.final_dir
        if not final.is_dir():
            raise StepFailed(f"{final} does not exist: the train step wrote no model")
        kind = final_kind(final)
        if kind == "adapter":
            from peft import PeftConfig

            base = PeftConfig.from_pretrained(str(final)).base_model_name_or_path
        else:
            AutoConfig.from_pretrained(str(final))
            base = None
        AutoTokenizer.from_pretrained(str(final))
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(final, model_dir)
    except (PosttrainError, OSError, ValueError) as exc:
        message = exc.message if isinstance(exc, PosttrainError) else f"{type(exc).__name__}: {exc}"
        _record_failure(record_in, "export", message)
        raise StepFailed(f"export: {message}") from None
    spec = jd.read_spec_dict() if jd.spec_path.exists() else {}
    status = jd.read_status()
    losses = [record["loss"] for record in jd.read_metrics() if "loss" in record]
    metadata = {"kind": kind, "base_model": base or spec.get("model", {}).get("name_or_path"),
                "method": spec.get("method", {}).get("name"), "step": status.step if status else None,
                "final_loss": losses[-1] if losses else None}
    log.info("exported %s to %s: %s", final, model_dir, metadata)
    return metadata

