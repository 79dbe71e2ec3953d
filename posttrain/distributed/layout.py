"""Which distributed layouts a run can have here, checked when the ranks start, before anything is loaded."""

from __future__ import annotations

from posttrain.errors import ConfigError, UnsupportedError
from posttrain.spec import DistributedSpec, JobSpec


def check_parallel_sizes(dist: DistributedSpec, world_size: int, device: str) -> int:
    """The data-parallel size of this run; a clear error for sizes that do not fit it or this machine."""
    tp, cp = dist.tensor_parallel_size, dist.context_parallel_size
    if tp > 1 or cp > 1:
        why = ("their collectives and kernels are not implemented for gloo on CPU" if device != "cuda" else
               "accelerate 1.15 applies them only inside its own FSDP2 plugin, and posttrain shards with FSDP2 "
               "itself (accelerate ignores FSDP on CPU), so the two are not combined yet")
        raise UnsupportedError(
            f"distributed.tensor_parallel_size={tp} / context_parallel_size={cp}: tensor and context parallelism "
            f"are not supported here ({why}); use data parallelism (strategy=ddp) or FSDP (strategy=fsdp)")
    if dist.data_parallel_size is not None and dist.data_parallel_size != world_size:
        raise ConfigError(
            f"data_parallel_size {dist.data_parallel_size} does not match the world size {world_size} "
            "(nnodes x nproc_per_node, every process a data-parallel replica or shard); leave it unset or make "
            "them match", "distributed.data_parallel_size")
    data = world_size
    return data


def check_fsdp_support(spec: JobSpec, device: str) -> None:
    if spec.quantization.load_in_4bit:
        if device != "cuda":
            raise UnsupportedError("QLoRA (4-bit weights) with FSDP cannot run on CPU: bitsandbytes' 4-bit weights are "
                                   "not shardable there; use peft.type=lora with strategy=fsdp, or strategy=ddp")
        raise UnsupportedError("QLoRA (4-bit weights) with posttrain's FSDP2 sharding is not supported; use "
                               "peft.type=lora with strategy=fsdp, or QLoRA with strategy=ddp")
