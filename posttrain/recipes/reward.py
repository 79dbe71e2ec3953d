"""Reward modelling: a sequence-classification head trained on chosen/rejected pairs (TRL RewardTrainer).

Each pair is scored in one row, its shared prompt computed once (``method.share_prompt``, on by default;
``posttrain.recipes.shared_prompt``), where TRL pads chosen and rejected as two rows. On CPU, attention is
chosen batch by batch as for SFT (``posttrain.recipes.sft.CPUAttention``: eager while the batch's score
matrices fit a share of the machine's memory, SDPA beyond).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardConfig, RewardTrainer

from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import (
    RecipeInputs,
    record_settings,
    shared_trainer_arguments,
    training_arguments,
)
from posttrain.recipes.sft import CPUAttention, cpu_attention
from posttrain.recipes.shared_prompt import (
    MASKABLE_ATTENTION,
    SharedPromptCollator,
    attention_bias,
    classification_head,
)


class PosttrainRewardTrainer(RewardTrainer):
    """RewardTrainer whose attention kernel, where ``cpu_attention`` is set, is chosen for each batch, and which
    scores the one-row-per-pair batches of ``SharedPromptCollator``."""

    def __init__(self, *args: Any, cpu_attention: CPUAttention | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_attention = cpu_attention

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        if self.cpu_attention is not None and "input_ids" in inputs:
            self.cpu_attention.apply(unwrapped, *inputs["input_ids"].shape[:2])
        if "pair_mask" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mask = attention_bias(inputs.pop("pair_mask"), unwrapped.config._attn_implementation, torch.float32)
        position_ids, (rows, columns) = inputs.pop("position_ids"), inputs.pop("reward_positions")
        head = classification_head(unwrapped)

        def score_pairs(input_ids, **_: Any) -> SequenceClassifierOutput:
            # The model's own forward (so DDP, compile and PEFT apply as usual); its pooled logits are for one
            # reply per row, so the rewards come from the final hidden states at each reply's last token.
            output = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                           output_hidden_states=True, use_cache=False)
            return SequenceClassifierOutput(logits=head(output.hidden_states[-1][rows, columns]))

        # TRL's loss, margin, centring and metrics, on the rewards of the packed rows.
        return super().compute_loss(score_pairs, inputs, return_outputs, num_items_in_batch)


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
    # The pair mask is a custom 4D mask, which eager and SDPA attention take; flash-attention kernels do not.
    shared = (spec.method.share_prompt and classification_head(model) is not None
              and model.config._attn_implementation in MASKABLE_ATTENTION)
    tokenizer = inputs.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record_settings(inputs, share_prompt=shared)
    return PosttrainRewardTrainer(
        model=model,
        args=config,
        data_collator=SharedPromptCollator(pad_token_id) if shared else None,
        peft_config=lora_config(spec, head="sequence_classification"),
        cpu_attention=attention,
        **shared_trainer_arguments(inputs),
    )
