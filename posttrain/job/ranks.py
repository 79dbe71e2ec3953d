"""Which process of a run writes the job directory: rank 0 (the only process of a plain run)."""

from __future__ import annotations

import os
import sys
from typing import Any

from posttrain.job.directory import JobDir


def is_main_process() -> bool:
    """Rank 0 writes the job directory; other ranks of a distributed run (torchrun sets RANK) only train."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group can have been set up
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def record_status(job_dir: JobDir, **changes: Any) -> None:
    """Update status.json, on rank 0 only."""
    if is_main_process():
        job_dir.update_status(**changes)
