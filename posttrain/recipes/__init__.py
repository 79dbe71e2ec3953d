"""One module per training method; each maps a JobSpec to a configured TRL trainer."""

from __future__ import annotations

import importlib
from typing import Any

from posttrain.recipes.common import RecipeInputs

RECIPE_MODULES = {
    "sft": "posttrain.recipes.sft",
    "dpo": "posttrain.recipes.dpo",
    "reward": "posttrain.recipes.reward",
    "grpo": "posttrain.recipes.grpo",
}


def build_trainer(inputs: RecipeInputs) -> Any:
    module = importlib.import_module(RECIPE_MODULES[inputs.spec.method.name])
    return module.build_trainer(inputs)


__all__ = ["RECIPE_MODULES", "RecipeInputs", "build_trainer"]
