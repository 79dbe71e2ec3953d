"""Direct Preference Optimization on prompt/chosen/rejected rows through TRL's DPOTrainer.

Reference model: with ``use_reference_model`` a frozen reference is kept in memory (the model named
by ``reference_model``, or a copy of the base for a full fine-tune). With LoRA and no explicit
reference the base with the adapter disabled is the reference: same numbers, no second copy. Without
``use_reference_model`` a full fine-tune computes the reference log-probs once before training.

Speed choices (measured with bench/sft_throughput.py --suite real, see bench/README.md):

- TRL runs chosen and rejected through one concatenated forward already;
- the reference is frozen, so its log-probs are computed once before training and cached with the rows
  (TRL's ``precompute_ref_log_probs``) whenever the run visits every row at least once; a shorter run
  computes them batch by batch, for the rows it trains on only;
- on CPU, log-probabilities are projected through the LM head for the completion tokens only (the same
  loss work as SFT: ``posttrain.recipes.common.use_selected_log_probs``), where TRL's fused head scores
  every position, prompt and padding included, and projects them again in its backward.
"""

from __future__ import annotations

import math
import os
from typing import Any

from trl import DPOConfig, DPOTrainer

from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import (
    RecipeInputs,
    record_settings,
    shared_trainer_arguments,
    training_arguments,
    use_selected_log_probs,
)

# The per-token fields TRL's DPO trainer reads from its fused head besides the log-probs (metrics only).
DPO_HEAD_EXTRAS = ("entropy", "mean_logits", "is_top1")


class PosttrainDPOTrainer(DPOTrainer):
    """DPOTrainer whose LM head, where ``selected_head`` is set, scores the completion tokens only."""

    def __init__(self, *args: Any, selected_head: bool = False, **kwargs: Any) -> None:
        # Set before TRL's __init__: it computes the cached reference log-probs itself, through
        # compute_ref_log_probs below.
        self.selected_head = selected_head
        self.selected_head_applied = False
        super().__init__(*args, **kwargs)
        self._apply_selected_head()

    def _apply_selected_head(self) -> None:
        if not self.selected_head or self.selected_head_applied:
            return
        self.selected_head_applied = use_selected_log_probs(self.model, extras=DPO_HEAD_EXTRAS)
        if self.ref_model is not None:
            use_selected_log_probs(self.ref_model)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        self._apply_selected_head()
        return super().compute_ref_log_probs(model, inputs)


def covers_every_row(inputs: RecipeInputs) -> bool:
    """Whether the run trains on every row at least once (an epoch or more), so reference log-probs computed
    for the whole dataset up front are never wasted."""
    training = inputs.spec.training
    if training.max_steps <= 0:
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows_per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * world
    return training.max_steps >= math.ceil(len(inputs.data.train) / rows_per_step)


def build_trainer(inputs: RecipeInputs) -> PosttrainDPOTrainer:
    spec = inputs.spec
    method = spec.method
    model = load_model(spec, inputs.placement)
    ref_model = None
    if method.use_reference_model and method.reference_model:
        ref_model = load_model(spec, inputs.placement, name=method.reference_model)
    # The reference never trains: cache its log-probs when every row is visited. A full fine-tune that keeps
    # no reference model must compute them up front (nothing else holds the base's weights).
    no_reference_copy = not method.use_reference_model and spec.peft.type == "none"
    precompute = no_reference_copy or covers_every_row(inputs)
    selected_head = inputs.placement.device == "cpu"
    record_settings(inputs, precompute_ref_log_probs=precompute, selected_log_probs=selected_head)
    config = DPOConfig(
        **training_arguments(inputs, model.num_parameters()),
        beta=method.beta,
        loss_type=[method.loss_type],
        label_smoothing=method.label_smoothing,
        max_length=spec.training.max_seq_length,
        precompute_ref_log_probs=precompute,
    )
    return PosttrainDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        peft_config=lora_config(spec),
        selected_head=selected_head,
        **shared_trainer_arguments(inputs),
    )
