"""Reward modelling: a sequence-classification head trained on chosen/rejected pairs (TRL RewardTrainer)."""

from __future__ import annotations

from trl import RewardConfig, RewardTrainer
from trl.data_utils import is_conversational

from posttrain.modeling import ensure_chat_template, load_model, lora_config
from posttrain.recipes.common import RecipeInputs, training_arguments


def build_trainer(inputs: RecipeInputs) -> RewardTrainer:
    spec = inputs.spec
    if is_conversational(inputs.data.train[0]):
        ensure_chat_template(inputs.tokenizer)
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
        train_dataset=inputs.data.train,
        eval_dataset=inputs.data.eval,
        processing_class=inputs.tokenizer,
        peft_config=lora_config(spec, head="sequence_classification"),
        callbacks=inputs.callbacks,
    )
