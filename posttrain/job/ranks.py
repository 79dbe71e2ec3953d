"""Which process of a run this is, and which one writes the job directory.

Rank 0 writes the job directory (the only process of a plain run). On a multi-node torchrun run, the first
rank of a node that holds no rank 0 keeps that node's own status.json when the node has a job directory of
its own (see :func:`posttrain.worker.run`): which node it was, and where rank 0 wrote the results.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from posttrain.job.directory import JobDir


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int = 0  # torchrun's GROUP_RANK: the node that holds rank 0 is node 0

    @property
    def leads_a_node_without_rank0(self) -> bool:
        """The first rank of a node that holds no rank 0: it speaks for that node's job directory."""
        return self.local_rank == 0 and self.rank != 0


def torchrun_rank() -> RankInfo | None:
    """This process's place in a torchrun run, from the variables torchrun sets; None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return RankInfo(rank, int(os.environ["LOCAL_RANK"]), world_size, local_world_size,
                        int(os.environ.get("GROUP_RANK", rank // local_world_size)))
    except (KeyError, ValueError):
        return None


def launcher_pid() -> int:
    """The process that stands for the job: torchrun's agent (the ranks' parent) under torchrun, else this
    one. Status records it, so whoever stops the job signals torchrun, which reaches every rank."""
    return os.getppid() if torchrun_rank() is not None else os.getpid()


def is_main_process() -> bool:
    """Rank 0 writes the job directory; other ranks of a distributed run (torchrun sets RANK) only train."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group can have been set up
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def keeps_status(job_dir: JobDir) -> bool:
    """Rank 0 keeps status.json; so does the first rank of a node without rank 0 whose job directory is its
    own (its status.json names that node)."""
    if is_main_process():
        return True
    info = torchrun_rank()
    if info is None or not info.leads_a_node_without_rank0:
        return False
    status = job_dir.read_status()
    return status is not None and status.node_rank == info.node_rank


def record_status(job_dir: JobDir, **changes: Any) -> None:
    """Update status.json, on the rank that keeps it."""
    if keeps_status(job_dir):
        job_dir.update_status(**changes)
