"""The local paths a JobSpec names, and binding a spec to its job directory.

A job directory stands on its own: the spec.json in it is read again from anywhere (a resume from another
working directory, ``posttrain train DIR/spec.json``, a worker the service starts in the job directory).
So every writer binds a spec to its job directory with :func:`bind_job_dir` before writing it: output.dir
and every local path become absolute. Hub ids and ``posttrain:`` names are not local paths
(:func:`posttrain.data.sources.is_local_path` is the rule) and stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.sources import is_local_path
from posttrain.spec import JobSpec


def path_fields(spec: JobSpec) -> dict[str, str | None]:
    """The spec's fields that may name files or folders to read, by dotted key (the one list)."""
    fields = {"data.source": spec.data.source, "data.validation.source": spec.data.validation.source,
              "eval.data": spec.eval.data, "eval.regression": spec.eval.regression,
              "model.name_or_path": spec.model.name_or_path}
    if spec.method.name == "dpo":
        fields["method.reference_model"] = spec.method.reference_model
    if spec.method.name == "ppo":
        fields["method.reward_model"] = spec.method.reward_model
        fields["method.critic_model"] = spec.method.critic_model
    return fields


def set_path_field(spec: JobSpec, key: str, value: str | None) -> None:
    section, _, name = key.rpartition(".")
    owner = spec
    for part in section.split("."):
        owner = getattr(owner, part)
    setattr(owner, name, value)


def absolute(path: str | Path, base: Path | None = None) -> str:
    """``path`` with ``~`` expanded, made absolute against ``base`` (default: the working directory)."""
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else ((base or Path.cwd()) / path).resolve())


def bind_job_dir(spec: JobSpec, job_dir: str | Path) -> JobSpec:
    """A copy of ``spec`` for ``job_dir``: output.dir is the job directory, absolute; relative local paths
    (data, validation data, models) are made absolute against the working directory, where they were
    meant; a relative ``method.sync_dir`` is a folder in the job directory. Binding a bound spec changes
    nothing."""
    spec = spec.model_copy(deep=True)
    root = absolute(job_dir)
    spec.output.dir = root
    for key, value in path_fields(spec).items():
        if value and is_local_path(value):
            set_path_field(spec, key, absolute(value))
    sync_dir = getattr(spec.method, "sync_dir", None)
    if sync_dir:
        spec.method.sync_dir = absolute(sync_dir, Path(root))
    return spec
