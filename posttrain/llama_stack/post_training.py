"""The ``PostTraining`` implementation both providers share: Llama Stack requests in, posttrain jobs out.

Requests become JobSpecs (``mapping``), dataset rows are read through Llama Stack's datasetio, and jobs
go to a :class:`~posttrain.llama_stack.jobs.TrainingJobs` (here or on a posttrain service). Every
blocking call runs in a thread so that the server's event loop never waits on training bookkeeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any

from llama_stack_api import (
    CancelTrainingJobRequest,
    Checkpoint,
    DatasetIO,
    GetTrainingJobArtifactsRequest,
    GetTrainingJobStatusRequest,
    IterRowsRequest,
    JobStatus,
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    PostTrainingMetric,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
)

from posttrain.llama_stack.config import TrainingDefaults
from posttrain.llama_stack.jobs import JobExists, JobNotFound, TrainingJobs
from posttrain.llama_stack.mapping import (
    FINAL_FOLDER,
    Method,
    RequestError,
    checkpoint_identifier,
    job_spec,
    job_status,
    job_uuid_of,
    posttrain_rows,
    split_validation,
    training_metrics,
)
from posttrain.service.schemas import JobInfo

PLACEHOLDER_SOURCE = "llama-stack-rows"  # replaced by the file the rows are written to


def _time(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


class PosttrainPostTraining:
    def __init__(self, jobs: TrainingJobs, defaults: TrainingDefaults, datasetio: DatasetIO) -> None:
        self.jobs = jobs
        self.defaults = defaults
        self.datasetio = datasetio
        self._submitting = asyncio.Lock()  # one job_uuid check-and-submit at a time

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.jobs.close)

    # -- training ------------------------------------------------------------------------------------
    async def supervised_fine_tune(self, request: SupervisedFineTuneRequest) -> PostTrainingJob:
        return await self._submit("sft", request.model_dump(mode="json"))

    async def preference_optimize(self, request: PreferenceOptimizeRequest) -> PostTrainingJob:
        return await self._submit("dpo", request.model_dump(mode="json"))

    async def _submit(self, method: Method, request: dict[str, Any]) -> PostTrainingJob:
        training = request.get("training_config") or {}
        data = training.get("data_config") or {}
        if not data.get("dataset_id"):
            raise RequestError("training_config.data_config.dataset_id is missing: register a dataset and name it")
        rows = posttrain_rows(await self._rows(data["dataset_id"], "dataset_id"), method, data["dataset_id"],
                              data.get("data_format"))
        if data.get("validation_dataset_id"):
            validation = posttrain_rows(await self._rows(data["validation_dataset_id"], "validation_dataset_id"),
                                        method, data["validation_dataset_id"], data.get("data_format"))
        else:
            rows, validation = split_validation(rows, self.defaults, training)
        spec = job_spec(method, request, self.defaults, data_source=PLACEHOLDER_SOURCE,
                        validation_source=PLACEHOLDER_SOURCE)
        job_uuid = request["job_uuid"]
        async with self._submitting:
            if await asyncio.to_thread(self.jobs.find, job_uuid) is not None:
                raise JobExists(f"job_uuid {job_uuid!r} is already taken by another job; choose a new one")
            await asyncio.to_thread(self.jobs.submit, spec, rows, validation)
        return PostTrainingJob(job_uuid=job_uuid)

    async def _rows(self, dataset_id: str, field: str) -> list[dict[str, Any]]:
        try:
            page = await self.datasetio.iterrows(IterRowsRequest(dataset_id=dataset_id, limit=-1))
        except Exception as exc:  # the router's own error type varies: name the field it came from
            raise RequestError(f"training_config.data_config.{field}={dataset_id!r}: {exc}") from None
        return list(page.data)

    # -- jobs ----------------------------------------------------------------------------------------
    async def get_training_jobs(self) -> ListPostTrainingJobsResponse:
        jobs = await asyncio.to_thread(self.jobs.jobs)
        uuids = (job_uuid_of(job.name) for job in jobs)
        return ListPostTrainingJobsResponse(data=[PostTrainingJob(job_uuid=uuid) for uuid in uuids if uuid])

    async def _job(self, job_uuid: str) -> JobInfo:
        job = await asyncio.to_thread(self.jobs.find, job_uuid)
        if job is None:
            raise JobNotFound(f"no post-training job with job_uuid {job_uuid!r}")
        return job

    async def get_training_job_status(self, request: GetTrainingJobStatusRequest) -> PostTrainingJobStatusResponse:
        job = await self._job(request.job_uuid)
        checkpoints, resources = await asyncio.to_thread(self._details, job)
        return PostTrainingJobStatusResponse(
            job_uuid=request.job_uuid, status=JobStatus(job_status(job.state)), scheduled_at=_time(job.created_at),
            started_at=_time(job.started_at or job.launched_at), completed_at=_time(job.finished_at),
            resources_allocated=resources, checkpoints=checkpoints)

    async def cancel_training_job(self, request: CancelTrainingJobRequest) -> None:
        job = await self._job(request.job_uuid)
        await asyncio.to_thread(self.jobs.cancel, job.id)

    async def get_training_job_artifacts(self, request: GetTrainingJobArtifactsRequest) -> PostTrainingJobArtifactsResponse:
        job = await self._job(request.job_uuid)
        checkpoints, _ = await asyncio.to_thread(self._details, job)
        return PostTrainingJobArtifactsResponse(job_uuid=request.job_uuid, checkpoints=checkpoints)

    def _details(self, job: JobInfo) -> tuple[list[Checkpoint], dict[str, Any]]:
        """The job's complete checkpoints and its final adapter or model, each with its training metrics."""
        artifacts = self.jobs.artifacts(job.id)
        records = self.jobs.metrics(job.id)
        found = [(name, f"checkpoints/{name}", int(name.rpartition("-")[2])) for name in artifacts.checkpoints]
        if artifacts.final:
            found.append((FINAL_FOLDER, FINAL_FOLDER, job.step))
        checkpoints = []
        for name, relative, step in found:
            upto = [record for record in records if int(record.get("step", 0)) <= step]
            epoch = max(1, math.ceil(float(upto[-1].get("epoch", 1)))) if upto else 1
            metrics = training_metrics(upto, epoch)
            checkpoints.append(Checkpoint(
                identifier=checkpoint_identifier(job_uuid_of(job.name) or job.id, name),
                created_at=_time(job.finished_at or job.updated_at), epoch=epoch,
                post_training_job_id=job_uuid_of(job.name) or job.id, path=self.jobs.location(job.id, relative),
                training_metrics=PostTrainingMetric(**metrics) if metrics else None))
        return checkpoints, self.jobs.describe(job)
