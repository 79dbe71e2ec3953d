"""The process group of a worker started by torchrun: ranks, backend, device, and agreeing on when to stop.

Nothing here imports torch at module level: :func:`torchrun_rank` is read before logging is set up.
"""

from __future__ import annotations

import logging
import os
from typing import TypeVar

from posttrain.errors import UnsupportedError
from posttrain.job.ranks import RankInfo, torchrun_rank
from posttrain.spec import DistributedSpec, JobSpec

log = logging.getLogger("posttrain.worker")
T = TypeVar("T")

# The stop codes ranks agree on (the highest wins: a cancel replaces a pause, as on one process).
NO_STOP, PAUSE, CANCEL = 0, 1, 2


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this worker group after a failure (max_restarts): it then resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_backend(dist_spec: DistributedSpec, device: str) -> str:
    if dist_spec.backend != "auto":
        if dist_spec.backend == "nccl" and device != "cuda":
            raise UnsupportedError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
        return dist_spec.backend
    return "nccl" if device == "cuda" else "gloo"


def init_process_group(spec: JobSpec, device: str) -> RankInfo | None:
    """Join the run's process group (gloo on CPU, NCCL on CUDA), each rank on its own GPU; None outside
    torchrun. Layouts this run cannot have are refused first, before anything is loaded."""
    info = torchrun_rank()
    if info is None:
        return None
    from posttrain.distributed.layout import check_fsdp_support, check_parallel_sizes

    dist_spec = spec.distributed
    check_parallel_sizes(dist_spec, info.world_size, device)
    if dist_spec.strategy == "fsdp":
        check_fsdp_support(spec, device)
    if device == "mps":
        raise UnsupportedError("torchrun runs need CUDA or CPU processes; MPS has no collective backend")
    if dist_spec.mixed_precision == "fp16" and device != "cuda":
        raise UnsupportedError("distributed.mixed_precision=fp16 cannot train on the CPU; use bf16 or no")
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return info
    backend = collective_backend(dist_spec, device)
    if device == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise UnsupportedError(f"local rank {info.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                                   "lower distributed.nproc_per_node (auto: one per GPU)")
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, device_id=torch.device("cuda", info.local_rank))
    else:
        dist.init_process_group(backend)
    log.info("rank %d/%d (local %d) joined the %s process group on %s", info.rank, info.world_size,
             info.local_rank, backend, f"cuda:{info.local_rank}" if device == "cuda" else "cpu")
    return info


def collective_device(device: str):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def agree_on_stop(local_code: int, device: str) -> int:
    """Every rank's stop request, combined: the highest code any rank holds. Called by every rank at each
    step boundary, so all ranks stop (or pause, saving one checkpoint together) after the same step even
    when a signal reached them at different moments."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([local_code], dtype=torch.int32, device=collective_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def from_rank0(value: T) -> T:
    """``value`` as rank 0 holds it, on every rank (a collective: every rank calls it at the same point)."""
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def leave_process_group() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
