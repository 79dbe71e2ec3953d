"""Reward modelling: a sequence-classification head trained on chosen/rejected pairs (TRL RewardTrainer)."""

from __future__ import annotations

from trl import RewardConfig, RewardTrainer

from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import RecipeInputs, shared_trainer_arguments, training_arguments


def build_trainer(inputs: RecipeInputs) -> RewardTrainer:
    spec = inputs.spec
    model = load_model(spec, inputs.placement, head="sequence_classification")
    model.config.pad_token_id = inputs.tokenizer.pad_token_id
    config = RewardConfig(
        **training_arguments(inputs, model.num_parameters()),
        max_length=spec.training.max_seq_length,
        center_rewards_coefficient=spec.method.center_rewards_coefficient,
    )
    return RewardTrainer(
        model=model,
        args=config,
        peft_config=lora_config(spec, head="sequence_classification"),
        **shared_trainer_arguments(inputs),
    )
