"""Sharded checkpoints of torchrun runs with torch.distributed.checkpoint (DCP), and the final export.

A checkpoint folder of a torchrun run holds::

    checkpoints/checkpoint-N/
        distributed/          DCP: model + optimizer, each rank writing its own shards (.distcp + .metadata)
        scheduler.pt          learning-rate scheduler (rank 0)
        trainer_state.json    step, log history, callbacks' state (rank 0)
        rng_state_R.pth       each rank's RNG state (the data position is the step in trainer_state.json)
        posttrain-complete.json   written by rank 0 after a barrier: every rank has written its part

State dicts come from ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``/``set_state_dict``):
keys are parameter names, not shard layouts, so a checkpoint saved by N ranks loads on M ranks (DCP
reshards on load), and on one plain process without any process group. The final model is gathered with
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` (FSDP2's path; FSDP1's full-state-dict
path crashed rank 0 on CPU) and saved by rank 0 as an ordinary transformers / PEFT folder.

The trainer's own checkpoint methods write one full copy from rank 0 (which FSDP2's DTensors cannot do) and
its model loader reads that copy; :func:`use_distributed_checkpoints` swaps in the methods below. They
override private ``transformers.Trainer`` methods (``_load_from_checkpoint``, ``_save_optimizer_and_scheduler``,
``_load_optimizer_and_scheduler``), checked against transformers 5.23 by tests/test_distributed.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from posttrain.distributed.runtime import is_distributed

log = logging.getLogger("posttrain.worker")

DCP_DIR = "distributed"
SCHEDULER_FILE = "scheduler.pt"


def is_distributed_checkpoint(checkpoint: str | os.PathLike[str] | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / DCP_DIR / ".metadata").is_file()


def _plain_optimizer(optimizer):
    # accelerate wraps the torch optimizer; DCP's state-dict helpers need the optimizer itself.
    return getattr(optimizer, "optimizer", optimizer)


def save_sharded(model, optimizer, checkpoint_dir: Path) -> None:
    """Every rank writes its shards of the model and optimizer state (collective: all ranks call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, _plain_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint_dir / DCP_DIR))


def load_sharded(model, optimizer, checkpoint_dir: Path) -> None:
    """Load model and optimizer state from a DCP checkpoint written by any number of ranks (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = _plain_optimizer(optimizer)
    # get_state_dict gives the layout this run holds (its shards); DCP fills it from whatever layout was saved.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(checkpoint_dir / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0, in CPU memory (empty on the other ranks; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


class DistributedCheckpointMixin:
    """Trainer methods for DCP checkpoints and a gathered final export (mixed into the recipe's trainer)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # a checkpoint (from _save_checkpoint): model + optimizer, sharded
            save_sharded(self.model, self.optimizer, Path(output_dir or self.args.output_dir))
            return
        if not is_sharded(self.model):
            super().save_model(output_dir, _internal_call)
            return
        state = full_model_state(self.model)  # every rank takes part in the gather
        if self.args.should_save:
            self.model.save_pretrained(output_dir, state_dict=state)
            log.info("final model gathered from %d ranks into %s", torch.distributed.get_world_size(), output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The optimizer state went into the DCP checkpoint with the model; the scheduler is one small file.
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not is_distributed_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # A DCP checkpoint is loaded with the optimizer, once that exists (_load_optimizer_and_scheduler).

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not is_distributed_checkpoint(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        assert checkpoint is not None
        load_sharded(self.model, self.optimizer, Path(checkpoint))
        scheduler = Path(checkpoint) / SCHEDULER_FILE
        if scheduler.is_file():
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        ranks = torch.distributed.get_world_size() if is_distributed() else 1
        log.info("loaded the sharded checkpoint %s on %d rank(s)", Path(checkpoint).name, ranks)


def use_distributed_checkpoints(trainer) -> None:
    """Give ``trainer`` (any recipe's TRL trainer) DCP checkpoints and the gathered export, in place."""
    cls = type(trainer)
    if issubclass(cls, DistributedCheckpointMixin):
        return
    trainer.__class__ = type(f"Distributed{cls.__name__}", (DistributedCheckpointMixin, cls), {})
