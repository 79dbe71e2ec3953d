"""Where a run starts: fresh (its directory must not hold another run) or from its newest complete checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.job.directory import JobDir
from posttrain.job.ranks import is_main_process

log = logging.getLogger("posttrain.worker")


def check_fresh_job_dir(job_dir: JobDir) -> None:
    if job_dir.checkpoints(complete_only=False) or job_dir.final_dir.exists():
        raise ConfigError(
            f"{job_dir.root} already holds a run (checkpoints or final/); use --resume to continue it, "
            "or choose another output.dir"
        )


def starting_point(job_dir: JobDir, resume: bool, wait_for_ranks: Callable[[], None] = lambda: None) -> Path | None:
    """The checkpoint a run continues from (None: the start). Rank 0 first removes the checkpoints a crash
    left incomplete, then every rank takes the newest complete one (``wait_for_ranks``: a barrier of a
    distributed run, so no rank looks before rank 0 has tidied); metrics logged after its step are dropped,
    since the run logs them again."""
    main = is_main_process()
    checkpoint = None
    if resume:
        if main:
            for path in job_dir.remove_incomplete_checkpoints():
                log.warning("removed incomplete checkpoint %s", path.name)
        wait_for_ranks()
        checkpoint = job_dir.latest_checkpoint()
        log.info("resuming from %s", checkpoint if checkpoint else "the start (no complete checkpoint yet)")
    if main:
        job_dir.truncate_metrics(job_dir.checkpoint_step(checkpoint) if checkpoint else 0)
    return checkpoint
