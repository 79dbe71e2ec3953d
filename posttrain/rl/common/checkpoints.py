"""Checkpoints of the online trainer, in the job directory's own layout.

``checkpoints/checkpoint-N/`` holds ``model/`` (the LoRA adapter, or the full model, + tokenizer, loadable
by PEFT / transformers), ``optimizer.pt``, ``scheduler.pt`` and ``trainer_state.json`` (step and the
random generators' states in ``rng.pt``). The job directory's marker file goes in last: a checkpoint
without it (a crash mid-save) is never resumed from and is removed by ``--resume``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.job.directory import JobDir, atomic_write_json
from posttrain.job.final import save_final
from posttrain.job.result import JobResult
from posttrain.job.resume import starting_point
from posttrain.job.signals import StopRequest

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int
    rewards: list[float]  # reward_mean of every step so far, for the summary

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "rewards": self.rewards}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(jd: JobDir, state: TrainerState, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, keep: int | None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step> completely, mark it, then drop the oldest complete ones beyond ``keep``.
    ``extra(path)`` writes a trainer's own files (PPO: the critic) before the marker goes in."""
    path = jd.checkpoint_dir(state.step)
    if path.exists():
        shutil.rmtree(path)  # an unmarked leftover of a crash at this very step
    path.mkdir(parents=True)
    model.save_pretrained(path / MODEL_DIR)
    tokenizer.save_pretrained(path / MODEL_DIR)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save(rng_state(), path / "rng.pt")
    atomic_write_json(path / STATE_FILE, state.to_json())
    if extra is not None:
        extra(path)
    jd.mark_checkpoint_complete(path, state.step)
    log.info("saved checkpoint %s", path)
    jd.rotate_checkpoints(keep)
    return path


def resume_point(jd: JobDir, resume: bool) -> tuple[Path | None, TrainerState]:
    """The checkpoint a run continues from (None: the start, see :func:`posttrain.job.resume.starting_point`)
    and the trainer state saved with it."""
    checkpoint = starting_point(jd, resume)
    return checkpoint, read_state(checkpoint) if checkpoint else TrainerState(step=0, rewards=[])


def read_state(checkpoint: Path) -> TrainerState:
    data = json.loads((checkpoint / STATE_FILE).read_text())
    return TrainerState(step=int(data["step"]), rewards=[float(r) for r in data.get("rewards", [])])


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Optimizer, schedule and random generators as they were when ``checkpoint`` was saved."""
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    # numpy's and python's RNG states are plain tuples/arrays, but not all of torch's allow-listed types.
    restore_rng(torch.load(checkpoint / "rng.pt", weights_only=False))


def finish_run(spec: Any, jd: JobDir, state: TrainerState, result: JobResult, stop: StopRequest, saved_at: int,
               checkpoint_now: Callable[[], None], model: Any, tokenizer: Any, reward_name: str) -> JobResult:
    """The end of an RL trainer's loop: a stop before the last step ends the run (a pause checkpoints its step
    first); otherwise ``final/`` is written and the run succeeds."""
    training = spec.training
    result.step, result.total_steps = state.step, training.max_steps
    if stop.is_set() and state.step < training.max_steps:
        if stop.pausing and saved_at != state.step:
            checkpoint_now()
        result.state, result.cancelled_by = stop.outcome, stop.signal_name
        return result
    if spec.output.save_final:
        result.final_dir = save_final(model.save_pretrained, tokenizer, jd)
    result.metrics = {f"{reward_name}_first": state.rewards[0] if state.rewards else None,
                      f"{reward_name}_last": state.rewards[-1] if state.rewards else None}
    jd.update_status(step=state.step, total_steps=training.max_steps)
    result.state = "succeeded"
    return result
