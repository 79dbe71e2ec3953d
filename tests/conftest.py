"""Shared fixtures: everything trains the embedded tiny model on one CPU thread."""

from __future__ import annotations

import os

# Two OpenMP threads on a 2-core CI box fight with the other test processes; one is faster and stable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny model, built once per machine and cached."""
    from posttrain.tiny import tiny_model_path

    return tiny_model_path()


def quick_spec(**sections) -> dict:
    """A spec dict that trains a few steps on the tiny model; sections override the defaults."""
    spec: dict = {
        "model": {"name_or_path": "posttrain:tiny"},
        "peft": {"type": "lora"},
        "data": {"source": "posttrain:alpaca"},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2,
                     "learning_rate": 1e-3},
        "tracking": {"report_to": []},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture
def make_spec():
    """Build a quick tiny-model spec dict: make_spec(method="dpo", training={"max_steps": 2})."""
    return quick_spec


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """posttrain:smollm2 (SmolLM2-135M-Instruct), converted once per machine and cached."""
    from posttrain.embedded import smollm2_model_path

    return smollm2_model_path()
