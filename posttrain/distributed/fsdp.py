"""FSDP2 sharding of the model a TRL trainer was built with, and the parallel sizes of a run.

accelerate classifies a CPU run as MULTI_CPU and silently drops FSDP settings (it falls back to DDP), so
posttrain applies torch's FSDP2 ``fully_shard`` itself: to every transformer decoder layer, then to the
root, after the trainer has built the model (PEFT adapters included, so they are sharded too) and before it
trains. The trainer is then told that the model already owns its placement and gradient reduction (the
flag transformers sets for models it shards at load time), so it neither wraps it in DDP nor moves it.

Strategies, on a device mesh built by accelerate's ``ParallelismConfig``:

- full_shard: parameters, gradients and optimizer state sharded; parameters re-sharded after each forward;
- shard_grad_op: the same shards, but parameters stay gathered from forward to backward (more memory, one
  all-gather less per step);
- hybrid_shard: full_shard within a node, replicated across nodes (a 2-D replicate x shard mesh);
- no_shard: replicated on every rank (a replicate-only mesh), gradients all-reduced: DDP through FSDP2.
"""

from __future__ import annotations

import logging
from typing import Any

from posttrain.errors import UnsupportedError
from posttrain.job.ranks import RankInfo
from posttrain.modeling import torch_dtype
from posttrain.spec import DistributedSpec, JobSpec

log = logging.getLogger("posttrain.worker")


def parallelism_config(dist: DistributedSpec, world_size: int, local_world_size: int):
    """accelerate's ParallelismConfig for this run's data parallelism: replicate x shard sizes (DDP replicates
    over the whole world; FSDP shards as its sharding_strategy says)."""
    from accelerate.parallelism_config import ParallelismConfig

    if dist.strategy == "ddp":
        return ParallelismConfig(dp_replicate_size=world_size, dp_shard_size=1)
    strategy = dist.fsdp.sharding_strategy
    if strategy == "no_shard":
        replicate, shard = world_size, 1
    elif strategy == "hybrid_shard":
        shard = local_world_size if world_size % local_world_size == 0 else world_size
        replicate = world_size // shard
    else:
        replicate, shard = 1, world_size
    return ParallelismConfig(dp_replicate_size=replicate, dp_shard_size=shard)


def device_mesh(dist: DistributedSpec, info: RankInfo, device: str):
    """The FSDP mesh: 1-D (shard) for full_shard / shard_grad_op, 2-D (replicate, shard) for hybrid_shard
    and no_shard."""
    from torch.distributed.device_mesh import init_device_mesh

    config = parallelism_config(dist, info.world_size, info.local_world_size)
    replicate, shard = config.dp_replicate_size, config.dp_shard_size
    if dist.fsdp.sharding_strategy in ("hybrid_shard", "no_shard"):
        return init_device_mesh(device, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device, (shard,), mesh_dim_names=("dp_shard",))


def decoder_layers(model) -> list[Any]:
    """The transformer blocks of ``model`` (a transformers or PEFT model): the classes transformers keeps
    whole when it splits a model (``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise UnsupportedError(f"cannot find the transformer layers of {type(base).__name__} to shard with FSDP "
                               "(it names no _no_split_modules); use distributed.strategy=ddp")
    return layers


def shard_model(model, spec: JobSpec, info: RankInfo, device: str) -> int:
    """Apply FSDP2 to ``model`` in place; returns the number of sharded units (layers + root)."""
    import torch
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    dist, fsdp = spec.distributed, spec.distributed.fsdp
    mesh = device_mesh(dist, info, device)
    precision = torch_dtype(dist.mixed_precision) if dist.mixed_precision != "no" else None
    options: dict[str, Any] = {
        "mesh": mesh,
        # shard_grad_op keeps the gathered parameters from forward to backward (ZeRO-2 style).
        "reshard_after_forward": fsdp.sharding_strategy in ("full_shard", "hybrid_shard"),
        # Parameters and gradient reductions in fp32 unless mixed precision asks for lower-precision compute.
        "mp_policy": MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32)
        if precision else MixedPrecisionPolicy(),
        # Pinned host memory speeds copies to a GPU; without one there is nothing to pin (and torch refuses).
        "offload_policy": CPUOffloadPolicy(pin_memory=device == "cuda") if fsdp.cpu_offload else OffloadPolicy(),
    }
    if fsdp.activation_checkpointing:
        # transformers recomputes each decoder layer in the backward (non-reentrant, so it composes with FSDP2).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    if hasattr(model, "generate"):
        # generate() (GRPO's rollouts, evaluation) calls forward repeatedly from outside it: gather the root's
        # parameters around the whole call, as the root's forward does.
        register_fsdp_forward_method(model, "generate")
    if fsdp.sharding_strategy == "no_shard":
        log.info("fsdp: no_shard replicates the model on every rank (DDP through FSDP2); nothing is sharded")
    log.info("fsdp: %s over mesh %s, %d layers + root, mixed_precision=%s cpu_offload=%s activation_checkpointing=%s",
             fsdp.sharding_strategy, tuple(mesh.shape), len(layers), dist.mixed_precision, fsdp.cpu_offload,
             fsdp.activation_checkpointing)
    return len(layers) + 1


def sharded_parameter_count(model) -> tuple[int, int]:
    """(parameters that are DTensors, all parameters) of ``model``: what tests and logs check sharding by."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return sum(isinstance(param, DTensor) for param in params), len(params)
