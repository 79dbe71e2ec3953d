"""Where a servable model's weights are: a base model, or a LoRA adapter over one, or a full fine-tune.

One rule for every door: a job directory serves its ``final/`` (a pipeline: its last stage's), a
checkpoint folder serves itself, a folder with ``adapter_config.json`` is an adapter over the base model
its job trained (``model.name_or_path`` in the job's spec.json), any other model folder or embedded name
(``posttrain:tiny``) is served whole. The job service resolves names into a :class:`ModelSource` and hands
it to its inference worker with each request (the ``X-Posttrain-Model`` header); ``posttrain chat``
resolves a local path the same way. No torch here: the API process imports this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.data.sources import written_as_path
from posttrain.errors import ModelError
from posttrain.job.directory import JobDir

SOURCE_HEADER = "X-Posttrain-Model"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelSource:
    """``base``: an embedded name or a model folder, served whole; ``adapter``: a LoRA adapter folder over
    it; ``tokenizer``: where the tokenizer is when the weights' folder has none (a bare checkpoint)."""

    base: str
    adapter: str | None = None
    tokenizer: str | None = None

    def to_header(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_header(cls, value: str) -> ModelSource:
        try:
            data: Any = json.loads(value)
            return cls(base=str(data["base"]), adapter=data.get("adapter"), tokenizer=data.get("tokenizer"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed {SOURCE_HEADER} header: {exc}") from None


def is_model_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file()


def trained_from(job_dir: Path) -> str | None:
    """The model a job directory's run started from (``model.name_or_path`` in its spec.json)."""
    try:
        spec = json.loads(JobDir(job_dir).spec_path.read_text())
        name = spec["model"]["name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def last_stage_dir(job_dir: Path) -> Path | None:
    """A pipeline job's last stage folder (its plan in spec.json lists the stages); None for other jobs."""
    try:
        plan = json.loads(JobDir(job_dir).spec_path.read_text())
        name = plan["stages"][-1]["name"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return job_dir / name if isinstance(name, str) and name and "/" not in name else None


def final_folder(job_dir: Path) -> Path:
    """The folder a job directory serves: its final/, or a pipeline's last stage's."""
    stage = last_stage_dir(job_dir)
    return final_folder(stage) if stage is not None else JobDir(job_dir).final_dir


def folder_source(folder: Path, job_dir: Path | None = None) -> ModelSource:
    """The source of a model folder (``final/``, a checkpoint, any model folder); ``job_dir``: the run that
    wrote it, whose starting model is an adapter's base and the tokenizer of a folder without one."""
    started_from = trained_from(job_dir) if job_dir is not None else None
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    if (folder / ADAPTER_CONFIG).is_file():
        base = started_from or _adapter_base(folder)
        return ModelSource(base=base, adapter=str(folder))
    if (folder / "config.json").is_file():
        return ModelSource(base=str(folder), tokenizer=None if has_tokenizer else started_from)
    raise ModelError(f"{folder} holds no model (neither adapter_config.json nor config.json)")


def _adapter_base(folder: Path) -> str:
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ModelError(f"{folder} is a LoRA adapter without a known base model (adapter_config.json names none "
                         "and it is not inside a job directory)")
    return base


def job_of(folder: Path) -> Path | None:
    """The job directory a model folder belongs to (``<job>/final``, ``<job>/checkpoints/checkpoint-N``,
    ``<job>/<stage>/final``), if any."""
    for parent in (folder.parent, folder.parent.parent):
        if JobDir(parent).spec_path.is_file():
            return parent
    return None


def local_source(path: str) -> ModelSource:
    """A local path as ``posttrain chat`` takes it: a job directory, a model folder inside one, or any model
    folder; anything else (an embedded name, a hub id) is a base model served whole."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists() or written_as_path(path):
            raise ModelError(f"{path} is not a model folder, a job directory or a model name")
        return ModelSource(base=path)
    folder = folder.resolve()
    if JobDir(folder).spec_path.is_file() and not is_model_folder(folder):
        final = final_folder(folder)
        if not final.is_dir():
            raise ModelError(f"job directory {folder} has no final/ model yet (is the run finished?)")
        return folder_source(final, final.parent)
    return folder_source(folder, job_of(folder))
