"""Where the providers' jobs live: posttrain's own store, scheduler and launcher on this machine (inline)
or a posttrain job service reached with ``posttrain.client`` (remote). Both answer in the service's own
shapes (JobInfo, ArtifactList), so the Llama Stack side is written once.

Llama Stack names a job by the ``job_uuid`` its client chose; posttrain keeps that in the JobSpec's
``name`` (``llama-stack/<job_uuid>``, so a service's jobs from other doors are never taken for Llama
Stack's), so the store (or the service) stays the only record of which job is which and nothing is lost
when Llama Stack restarts.

Blocking (SQLite, HTTP, file writes): the provider calls these from a thread, never on its event loop.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from posttrain.errors import PosttrainError
from posttrain.job.directory import JobDir, atomic_write_text
from posttrain.llama_stack.config import InlineProviderConfig, RemoteProviderConfig
from posttrain.llama_stack.mapping import job_uuid_of
from posttrain.service.schemas import ArtifactList, JobInfo, SubmitJobRequest

PAGE = 500
DATASETS_FOLDER = "llama-stack-datasets"


class JobNotFound(PosttrainError):
    status_code = 404


class JobExists(PosttrainError):
    status_code = 409


class TrainingJobs(Protocol):
    def submit(self, spec: dict[str, Any], train_rows: list[dict[str, Any]],
               validation_rows: list[dict[str, Any]] | None) -> JobInfo:
        """Queue a job training on these rows; ``spec``'s data sources are filled in here."""

    def find(self, job_uuid: str) -> JobInfo | None: ...

    def jobs(self) -> list[JobInfo]: ...

    def cancel(self, job_id: str) -> None: ...

    def artifacts(self, job_id: str) -> ArtifactList: ...

    def metrics(self, job_id: str) -> list[dict[str, Any]]: ...

    def location(self, job_id: str, relative: str) -> str:
        """Where a file or folder of the job directory can be read: a path here, or a download URL."""

    def describe(self, job: JobInfo) -> dict[str, Any]:
        """What resources_allocated reports for a job."""

    def close(self) -> None: ...


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _by_name(pages: Iterator[list[JobInfo]], job_uuid: str) -> JobInfo | None:
    for page in pages:
        for job in page:
            if job_uuid_of(job.name) == job_uuid:
                return job
    return None


def check_worker_python(python: str) -> str:
    """The interpreter's absolute path (a bare name such as ``python3`` is looked up on PATH). Fails when
    the provider starts, not with every job: workers need an interpreter with torch and posttrain."""
    if os.sep not in python:
        python = shutil.which(python) or python
    if not os.access(python, os.X_OK):
        raise PosttrainError(f"worker_python {python!r} is not an executable file: point it at the python of "
                             "posttrain's own environment (the one with torch)")
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') and u.find_spec('posttrain') else 3)"
    if subprocess.run([python, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
        raise PosttrainError(f"worker_python {python!r} cannot import torch and posttrain: point it at the "
                             "python of posttrain's own environment (where `make install` put them)")
    return python


class LocalJobs:
    """Jobs run here by posttrain's scheduler (one worker process per job under ``worker_python``), with
    the SQLite store and job directories under ``data_dir``: the service without its HTTP layer."""

    def __init__(self, config: InlineProviderConfig) -> None:
        if config.launcher not in ("local", "kfp"):
            raise PosttrainError(f"launcher={config.launcher!r} is not available yet in posttrain's inline "
                                 "provider; use launcher: local or kfp")
        self.launcher_name = config.launcher
        # Imported here: the scheduler and store need SQLAlchemy and psutil, which the remote provider does not.
        from posttrain.service.assembly import ServiceCore
        from posttrain.service.settings import ServiceSettings

        worker_python = check_worker_python(config.worker_python)
        settings = ServiceSettings(
            data_dir=config.resolved_data_dir(), slots=config.slots, cancel_grace_s=config.cancel_grace_s,
            worker_command=[worker_python, "-m", "posttrain.worker"], warm_workers=config.warm_workers,
            inference_device=config.inference_device, inference_threads=config.inference_threads,
            inference_memory_mb=config.inference_memory_mb, inference_dtype=config.inference_dtype)
        self.core = ServiceCore.open(settings, extra_dirs=(settings.data_dir / DATASETS_FOLDER,))
        self.settings, self.store, self.scheduler = settings, self.core.store, self.core.scheduler
        self.core.start()  # re-adopts workers of jobs that ran while Llama Stack was down

    @property
    def datasets_dir(self) -> Path:
        return self.settings.data_dir / DATASETS_FOLDER

    def submit(self, spec: dict[str, Any], train_rows: list[dict[str, Any]],
               validation_rows: list[dict[str, Any]] | None) -> JobInfo:
        from posttrain.service.auth import LOCAL_USER
        from posttrain.service.submission import submit_job
        from posttrain.service.views import job_info

        # The JobSpec says how its worker starts (launcher: kfp runs the job as a Kubeflow pipeline).
        spec.setdefault("distributed", {})["launcher"] = self.launcher_name
        folder = self.datasets_dir / secrets.token_hex(8)
        folder.mkdir(parents=True)
        try:
            atomic_write_text(folder / "train.jsonl", jsonl(train_rows))
            spec["data"]["source"] = str(folder / "train.jsonl")
            if validation_rows is not None:
                atomic_write_text(folder / "validation.jsonl", jsonl(validation_rows))
                spec["data"]["validation"]["source"] = str(folder / "validation.jsonl")
            # The rows were checked by the mapping; the preflight would import torch, which is not here.
            record = submit_job(SubmitJobRequest(spec=spec), self.store, self.settings, LOCAL_USER,
                                check_data_and_model=False)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.scheduler.wake()
        return job_info(record)

    def _pages(self) -> Iterator[list[JobInfo]]:
        from posttrain.service.views import job_info

        offset = 0
        while True:
            records, total = self.store.list_jobs(limit=PAGE, offset=offset)
            yield [job_info(record, live=False) for record in records]
            offset += PAGE
            if offset >= total:
                return

    def find(self, job_uuid: str) -> JobInfo | None:
        from posttrain.service.views import job_info

        job = _by_name(self._pages(), job_uuid)
        record = self.store.get_job(job.id) if job else None
        return job_info(record) if record else None

    def jobs(self) -> list[JobInfo]:
        """The jobs made through Llama Stack (not the service's other jobs)."""
        return [job for page in self._pages() for job in page if job_uuid_of(job.name)]

    def _record(self, job_id: str) -> Any:
        record = self.store.get_job(job_id)
        if record is None:
            raise JobNotFound(f"posttrain job {job_id} is no longer in the store")
        return record

    def cancel(self, job_id: str) -> None:
        from posttrain.service.lifecycle import cancel_job

        cancel_job(self.store, self.scheduler, self.settings, self._record(job_id))

    def artifacts(self, job_id: str) -> ArtifactList:
        from posttrain.service.views import artifact_list

        return artifact_list(self._record(job_id))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return JobDir(self._record(job_id).job_dir).read_metrics()

    def location(self, job_id: str, relative: str) -> str:
        return str(Path(self._record(job_id).job_dir) / relative)

    def describe(self, job: JobInfo) -> dict[str, Any]:
        spec = json.loads(self._record(job.id).spec_json)
        return {"posttrain_job_id": job.id, "attempt": job.attempt, "launcher": self.launcher_name, "device": spec["model"]["device"],
                "worker_python": self.settings.worker_command[0], "job_dir": self.location(job.id, "")}

    def close(self) -> None:
        self.core.close()


class RemoteJobs:
    """Jobs sent to a posttrain job service; its store and job directories are the truth."""

    def __init__(self, config: RemoteProviderConfig) -> None:
        from posttrain.client import Client

        self.url = config.url.rstrip("/")
        self.api_key, self.timeout_s = config.resolved_api_key(), config.timeout_s
        self.client = Client(self.url, api_key=self.api_key, timeout=self.timeout_s)

    def submit(self, spec: dict[str, Any], train_rows: list[dict[str, Any]],
               validation_rows: list[dict[str, Any]] | None) -> JobInfo:
        with tempfile.TemporaryDirectory(prefix="posttrain-llama-stack-") as folder:
            train = Path(folder) / "train.jsonl"
            train.write_text(jsonl(train_rows))
            spec["data"]["source"] = self.client.upload(train).source
            if validation_rows is not None:
                validation = Path(folder) / "validation.jsonl"
                validation.write_text(jsonl(validation_rows))
                spec["data"]["validation"]["source"] = self.client.upload(validation).source
        spec.pop("output", None)  # the service places each job in its own directory
        return self.client.submit(spec)

    def _pages(self) -> Iterator[list[JobInfo]]:
        offset = 0
        while True:
            page = self.client.list_jobs(limit=PAGE, offset=offset)
            yield page.jobs
            offset += PAGE
            if offset >= page.total:
                return

    def find(self, job_uuid: str) -> JobInfo | None:
        job = _by_name(self._pages(), job_uuid)
        return self.client.get_job(job.id) if job else None

    def jobs(self) -> list[JobInfo]:
        """The jobs made through Llama Stack (not the service's other jobs)."""
        return [job for page in self._pages() for job in page if job_uuid_of(job.name)]

    def cancel(self, job_id: str) -> None:
        self.client.cancel(job_id)

    def artifacts(self, job_id: str) -> ArtifactList:
        return self.client.artifacts(job_id)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self.client.metrics(job_id)

    def location(self, job_id: str, relative: str) -> str:
        return f"{self.url}/v1/jobs/{job_id}/artifacts/{relative}"

    def describe(self, job: JobInfo) -> dict[str, Any]:
        return {"posttrain_job_id": job.id, "service": self.url, "attempt": job.attempt}

    def close(self) -> None:
        self.client.close()
