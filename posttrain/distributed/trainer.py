"""What the worker does to a recipe's trainer under torchrun: FSDP2 sharding and sharded checkpoints.

DDP needs nothing here: the Trainer (through accelerate) wraps the model in DistributedDataParallel itself.
"""

from __future__ import annotations

import logging

from posttrain.distributed.checkpoint import use_distributed_checkpoints
from posttrain.distributed.fsdp import shard_model, sharded_parameter_count
from posttrain.job.ranks import RankInfo
from posttrain.spec import JobSpec

log = logging.getLogger("posttrain.worker")


def prepare_trainer(trainer, spec: JobSpec, info: RankInfo, device: str) -> None:
    """Shard ``trainer.model`` with FSDP2 when ``distributed.strategy=fsdp``; sharded checkpoints either way.
    (The layout was checked when the rank joined the process group.)"""
    if spec.distributed.strategy == "fsdp":
        shard_model(trainer.model, spec, info, device)
        # transformers' flag for a model that already owns its placement and gradient reduction (set for
        # models it shards at load): the Trainer then neither wraps it in DDP nor shards it again.
        trainer.is_distributed_loading_by_transformers = True
        sharded, total = sharded_parameter_count(trainer.model)
        log.info("fsdp: %d of %d parameters are DTensors on rank %d", sharded, total, info.rank)
    use_distributed_checkpoints(trainer)
    record_layout(trainer, spec, info)


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this rank holds: its shards under FSDP, the whole model under DDP."""
    from torch.distributed.tensor import DTensor

    return sum((param.to_local() if isinstance(param, DTensor) else param).nbytes for param in model.parameters())


def record_layout(trainer, spec: JobSpec, info: RankInfo) -> None:
    """Add the run's layout to every metrics.jsonl record (through the worker's metrics callback)."""
    layout = {"world_size": info.world_size, "strategy": spec.distributed.strategy,
              "parameter_bytes_per_rank": local_parameter_bytes(trainer.model)}
    for callback in trainer.callback_handler.callbacks:
        extra = getattr(callback, "extra", None)
        if isinstance(extra, dict):
            extra.update(layout)
