"""Weights over torch.distributed (``broadcast`` mode), the pattern of vLLM's weight-transfer API.

The trainer is rank 0 and hosts a TCPStore; the server joins as rank 1 when asked over HTTP (init), and
for every update the trainer sends one HTTP request and then broadcasts each tensor, in the order the
server published at init. The group is a standalone ``ProcessGroupGloo`` (NCCL on GPUs would be the
same calls), not the default group, so a trainer that already runs under torchrun keeps its own group.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

GROUP_PREFIX = "posttrain-weights"


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float,
               store: dist.TCPStore | None = None) -> tuple[dist.ProcessGroupGloo, dist.TCPStore]:
    """Create (rank 0, ``store`` given) or join the weight group; blocks until every rank is in."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    group = dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, store), rank, world_size, timeout)
    return group, store


def master_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's TCPStore; ``port`` 0 picks a free one (read it back from ``store.port``)."""
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def broadcast_tensors(group: dist.ProcessGroupGloo, tensors: list[torch.Tensor]) -> None:
    """Broadcast from rank 0 into the same-shaped tensors on every other rank (in place), in order."""
    for tensor in tensors:
        group.broadcast(tensor, 0).wait()
