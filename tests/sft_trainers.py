"""An SFT trainer built the way the worker builds it (tiny model, bundled sample), for tests that call its loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.data import load_training_data
from posttrain.job.directory import JobDir
from posttrain.modeling import load_tokenizer, resolve_placement
from posttrain.recipes import RecipeInputs, build_trainer
from posttrain.spec import spec_from_dict


def build_sft_trainer(job_root: Path, peft: dict[str, Any]):
    """posttrain's SFT trainer on posttrain:tiny with ``peft``, batch 4, in training mode, on one thread."""
    torch.set_num_threads(1)
    spec = spec_from_dict({"peft": peft, "tracking": {"report_to": []},
                           "training": {"max_steps": 1, "per_device_train_batch_size": 4}})
    job_dir = JobDir(job_root).create()
    data = load_training_data(spec.data, "sft", seed=spec.training.seed)
    inputs = RecipeInputs(spec, job_dir, resolve_placement(spec.model), data, load_tokenizer(spec), [])
    trainer = build_trainer(inputs)
    trainer.model.train()
    return trainer
