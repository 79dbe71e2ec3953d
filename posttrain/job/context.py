"""What the worker hands a method's ``run(context) -> JobResult``: one typed object, the same for every method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posttrain.job.directory import JobDir
from posttrain.job.ranks import RankInfo
from posttrain.job.result import JobResult
from posttrain.job.signals import StopRequest
from posttrain.spec import JobSpec

if TYPE_CHECKING:  # the library layer's type, named here for readers; the job contract imports no torch
    from posttrain.modeling import Placement


@dataclass
class RunContext:
    """One run of one method: its spec (output.dir is ``job_dir``), where and how it runs, and what it
    reports. ``run`` fills in ``result`` and returns it; it never records the final state itself (the
    worker does, once, whatever happened)."""

    spec: JobSpec
    job_dir: JobDir
    resume: bool
    stop: StopRequest
    result: JobResult
    placement: Placement
    threads: int
    rank_info: RankInfo | None = None  # set under torchrun
    # transformers.TrainerCallback objects added after posttrain's own (TRL methods only): Python API users
    # and the benchmark, which times every variant with the same callback.
    extra_callbacks: Sequence[Any] = field(default_factory=tuple)
