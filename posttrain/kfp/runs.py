"""Running a JobSpec's pipeline: here with kfp.local, or on a Kubeflow Pipelines host.

Local (``run_local``): ``kfp.local`` with ``SubprocessRunner(use_venv=False)``, so every step runs in this
Python environment, offline (a venv, or ``packages_to_install``, would need a package index). The train
step writes the job directory itself; KFP's own artifacts go under ``<job dir>/kfp/``.

Remote (``submit_remote``): local data files are uploaded to the S3-compatible bucket (``s3_bucket`` or
KFP_S3_BUCKET) and imported as the pipeline's Dataset; the pipeline root, where KFP writes every artifact
(the Model included), is ``s3://<bucket>/posttrain/<run id>``. The pipeline is compiled to IR YAML and
submitted with ``kfp.Client``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError, PosttrainError
from posttrain.job.directory import JobDir
from posttrain.job_paths import bind_job_dir
from posttrain.kfp.pipeline import build_pipeline, compile_pipeline, require_kfp
from posttrain.spec import JobSpec

log = logging.getLogger("posttrain.kfp")

S3_PREFIX = "posttrain"


@dataclass
class LocalRun:
    state: str  # the job's state as recorded in its directory (succeeded when every step did)
    job_dir: Path
    model_dir: Path | None  # the Model artifact (a copy of final/), when the export step ran
    error: str | None = None


@dataclass
class RemoteRun:
    run_id: str
    host: str
    pipeline_root: str | None
    uploaded: list[str]  # S3 URIs of the uploaded data files
    url: str


def is_local_file(source: str | None) -> bool:
    """A data file or model folder on this machine (to make absolute, or to upload for a cluster run)."""
    from posttrain.data.sources import is_local_path

    return bool(source) and is_local_path(source) and Path(source).expanduser().exists()


# -- local ----------------------------------------------------------------------------------------------

def run_local(spec: JobSpec, job_dir: str | Path, *, resume: bool = False, log_file: bool = True,
              stop_requested: Callable[[], bool] = lambda: False) -> LocalRun:
    """Run the pipeline here, on ``job_dir``, and wait for it. Never raises for a failed step: the job
    directory's status says what happened. ``stop_requested``: whether the caller was told to cancel (a
    step that dies of that signal outside training then means cancelled, not failed)."""
    require_kfp()
    from kfp import local

    from posttrain.job.resume import check_fresh_job_dir

    jd = JobDir(Path(job_dir).resolve())
    if not resume:
        check_fresh_job_dir(jd)
    jd.create()
    spec = bind_job_dir(spec, jd.root)  # the steps run in other working directories
    kfp_root = jd.root / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root / "outputs"),
               workspace_root=str(kfp_root / "workspace"), raise_on_error=False)
    jd.update_status(state="running", pid=os.getpid(), error=None, finished_at=None)
    pipeline = build_pipeline(spec, local=True)
    task = None
    interrupted = False
    try:
        task = pipeline(job_dir=str(jd.root), resume=resume, log_file=log_file)
    except KeyboardInterrupt:  # Ctrl-C reached the steps too; kfp waited for the running one to stop
        interrupted = True
    except Exception as exc:  # kfp's own errors (raise_on_error=False still raises for some)
        log.error("the pipeline did not run: %s", exc)
        _record_unfinished(jd, f"kfp: {exc}")
    model_dir = _model_dir(task)
    if model_dir is None:
        finish_unfinished(jd, cancelled=interrupted or stop_requested())
    status = jd.read_status()
    state = status.state if status else "failed"
    return LocalRun(state=state, job_dir=jd.root, model_dir=model_dir, error=status.error if status else None)


def run_local_job(spec: JobSpec, job_dir: str | Path, *, resume: bool = False):
    """``run_local`` reported as the worker reports a run (``posttrain train`` with distributed.launcher=kfp
    prints the same summary as for any run)."""
    import time

    from posttrain.job.result import JobResult

    started = time.perf_counter()
    run = run_local(spec, job_dir, resume=resume)
    jd = JobDir(run.job_dir)
    status = jd.read_status()
    losses = [record["loss"] for record in jd.read_metrics() if "loss" in record]
    return JobResult(state=run.state, job_dir=run.job_dir, step=status.step if status else 0,
                     total_steps=status.total_steps if status else None, final_loss=losses[-1] if losses else None,
                     runtime_s=time.perf_counter() - started, error=run.error,
                     final_dir=jd.final_dir if run.state == "succeeded" else None,
                     input_error=bool(run.error and run.error.startswith("prepare-data:")))


def _model_dir(task: object) -> Path | None:
    try:
        model = task.output  # type: ignore[union-attr]
        path = Path(model.path)
    except Exception:  # no task, or a failed run without outputs
        return None
    return path if path.is_dir() else None


def _record_unfinished(jd: JobDir, error: str) -> None:
    """A run that ended without a terminal state of its own (a step died before recording one)."""
    status = jd.read_status()
    if status is None or status.state in ("running", "queued", "succeeded"):
        jd.update_status(state="failed", error=error)


def finish_unfinished(jd: JobDir, *, cancelled: bool) -> None:
    """The state of a pipeline that produced no Model: what its steps recorded (failed, cancelled, paused),
    else cancelled when it was told to stop (a step outside training died of the signal), else failed."""
    status = jd.read_status()
    if status is not None and status.state in ("running", "queued", "succeeded"):
        if cancelled:
            jd.update_status(state="cancelled", error=None)
        else:
            _record_unfinished(jd, "a pipeline step failed (see worker.log)")


# -- remote ---------------------------------------------------------------------------------------------

def remote_settings(spec: JobSpec, host: str | None, bucket: str | None) -> tuple[str, str | None]:
    options = spec.distributed.kfp
    host = host or options.host or os.environ.get("KFP_HOST")
    if not host:
        raise ConfigError("no Kubeflow Pipelines host: pass --host URL, set distributed.kfp.host or KFP_HOST "
                          "(or run here with --local)", "distributed.kfp.host")
    return host, bucket or options.s3_bucket or os.environ.get("KFP_S3_BUCKET") or None


def local_data_files(spec: JobSpec) -> dict[str, Path]:
    """The spec's local data, by the name it gets in the uploaded folder."""
    files = {}
    if is_local_file(spec.data.source):
        files["train" + "".join(Path(spec.data.source).suffixes)] = Path(spec.data.source).expanduser()
    if is_local_file(spec.data.validation.source):
        source = spec.data.validation.source or ""
        files["validation" + "".join(Path(source).suffixes)] = Path(source).expanduser()
    return files


def s3_client(endpoint_url: str | None):
    try:
        import boto3
    except ImportError:
        raise PosttrainError("boto3 is not installed (it uploads data to S3): pip install 'posttrain[kfp]'") from None
    from botocore.config import Config

    if endpoint_url is None:
        return boto3.client("s3")
    # S3-compatible stores (MinIO, Ceph) are addressed by path, and not all accept the streamed checksums
    # newer boto3 sends by default: checksums only where the API requires them.
    config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def upload(client, bucket: str, prefix: str, name: str, path: Path) -> list[str]:
    """Upload a file or a folder's files under ``prefix/name``; returns their S3 URIs."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    uris = []
    for file in files:
        key = f"{prefix}/{name}" if file == path else f"{prefix}/{name}/{file.relative_to(path).as_posix()}"
        try:
            client.upload_file(str(file), bucket, key)
        except Exception as exc:  # botocore's errors: no such bucket, denied, endpoint down
            raise PosttrainError(f"could not upload {file} to s3://{bucket}/{key}: {exc}") from None
        uris.append(f"s3://{bucket}/{key}")
    return uris


def submit_remote(spec: JobSpec, *, host: str | None = None, bucket: str | None = None,
                  run_name: str | None = None, client_factory=None) -> RemoteRun:
    """Upload the spec's local data, compile its pipeline and submit it to a KFP host.

    ``client_factory(host, namespace)`` builds the kfp.Client (tests give the same one a fake host)."""
    require_kfp()
    options = spec.distributed.kfp
    host, bucket = remote_settings(spec, host, bucket)
    if is_local_file(spec.model.name_or_path):
        raise ConfigError(f"{spec.model.name_or_path} is a folder on this machine, which a cluster step cannot "
                          "read: use a hub id or a path inside the components' image", "model.name_or_path")
    files = local_data_files(spec)
    if files and not bucket:
        raise ConfigError(f"the data ({', '.join(str(p) for p in files.values())}) is on this machine: a remote "
                          "run needs an S3 bucket to upload it to (--s3-bucket, distributed.kfp.s3_bucket or "
                          "KFP_S3_BUCKET)", "distributed.kfp.s3_bucket")
    import kfp

    make_client = client_factory or (lambda h, ns: kfp.Client(host=h, namespace=ns or "kubeflow"))
    try:
        kfp_client = make_client(host, options.namespace)  # asks the host's health: nothing is uploaded for a dead host
    except Exception as exc:
        raise PosttrainError(f"could not reach the KFP host {host}: {exc}") from None
    run_id = uuid.uuid4().hex[:12]
    prefix = f"{S3_PREFIX}/{run_id}"
    pipeline_root = f"s3://{bucket}/{prefix}" if bucket else None
    uploaded: list[str] = []
    data_uri = None
    if files:
        s3 = s3_client(options.s3_endpoint_url)
        for name, path in files.items():
            uploaded += upload(s3, bucket or "", f"{prefix}/data", name, path)
        data_uri = f"s3://{bucket}/{prefix}/data"
        spec = spec.model_copy(deep=True)
        names = iter(files)
        if is_local_file(spec.data.source):
            spec.data.source = next(names)  # relative to the imported folder (steps.uploaded_spec)
        if is_local_file(spec.data.validation.source):
            spec.data.validation.source = next(names)
    with tempfile.TemporaryDirectory(prefix="posttrain-kfp-") as folder:
        package = compile_pipeline(spec, Path(folder) / "pipeline.yaml", uploaded_data_uri=data_uri)
        try:
            result = kfp_client.create_run_from_pipeline_package(
                str(package), arguments={}, run_name=run_name or f"{spec.name or spec.method.name}-{run_id}",
                experiment_name=options.experiment, namespace=options.namespace, pipeline_root=pipeline_root,
            )
        except Exception as exc:  # the API's errors: its ApiException carries the HTTP status and body
            status = getattr(exc, "status", None)
            detail = f"HTTP {status}: {getattr(exc, 'body', '')}" if status else str(exc)
            raise PosttrainError(f"the KFP host {host} did not accept the run: {detail}") from None
    return RemoteRun(run_id=result.run_id, host=host, pipeline_root=pipeline_root, uploaded=uploaded,
                     url=f"{host.rstrip('/')}/#/runs/details/{result.run_id}")
