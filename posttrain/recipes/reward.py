"""Reward modelling: a sequence-classification head trained on chosen/rejected pairs (TRL RewardTrainer).

On CPU, attention is chosen batch by batch as for SFT (``posttrain.recipes.sft.CPUAttention``: eager while
the batch's score matrices fit a share of the machine's memory, SDPA beyond); TRL already scores chosen and
rejected in one concatenated forward.
"""

from __future__ import annotations

from typing import Any

from trl import RewardConfig, RewardTrainer

from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import (
    RecipeInputs,
    record_settings,
    shared_trainer_arguments,
    training_arguments,
)
from posttrain.recipes.sft import CPUAttention, cpu_attention


class PosttrainRewardTrainer(RewardTrainer):
    """RewardTrainer whose attention kernel, where ``cpu_attention`` is set, is chosen for each batch."""

    def __init__(self, *args: Any, cpu_attention: CPUAttention | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_attention = cpu_attention

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cpu_attention is not None and "input_ids" in inputs:
            self.cpu_attention.apply(self.accelerator.unwrap_model(model), *inputs["input_ids"].shape[:2])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build_trainer(inputs: RecipeInputs) -> PosttrainRewardTrainer:
    spec = inputs.spec
    model = load_model(spec, inputs.placement, head="sequence_classification")
    model.config.pad_token_id = inputs.tokenizer.pad_token_id
    attention = cpu_attention(inputs, model)
    training = spec.training
    # Each row of a pair batch is scored twice (chosen and rejected).
    record_settings(inputs, attn_implementation=attention.describe(2 * training.per_device_train_batch_size,
                                                                   training.max_seq_length)
                    if attention is not None else model.config._attn_implementation)
    config = RewardConfig(
        **training_arguments(inputs, model.num_parameters()),
        max_length=spec.training.max_seq_length,
        center_rewards_coefficient=spec.method.center_rewards_coefficient,
    )
    return PosttrainRewardTrainer(
        model=model,
        args=config,
        peft_config=lora_config(spec, head="sequence_classification"),
        cpu_attention=attention,
        **shared_trainer_arguments(inputs),
    )
