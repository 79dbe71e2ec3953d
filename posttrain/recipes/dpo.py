"""Direct Preference Optimization on prompt/chosen/rejected rows through TRL's DPOTrainer.

Reference model: with ``use_reference_model`` a frozen reference is kept in memory (the model named
by ``reference_model``, or a copy of the base for a full fine-tune). With LoRA and no explicit
reference the base with the adapter disabled is the reference: same numbers, no second copy. Without
``use_reference_model`` a full fine-tune computes the reference log-probs once before training.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import RecipeInputs, shared_trainer_arguments, training_arguments


def build_trainer(inputs: RecipeInputs) -> DPOTrainer:
    spec = inputs.spec
    method = spec.method
    model = load_model(spec, inputs.placement)
    ref_model = None
    if method.use_reference_model and method.reference_model:
        ref_model = load_model(spec, inputs.placement, name=method.reference_model)
    config = DPOConfig(
        **training_arguments(inputs, model.num_parameters()),
        beta=method.beta,
        loss_type=[method.loss_type],
        label_smoothing=method.label_smoothing,
        max_length=spec.training.max_seq_length,
        precompute_ref_log_probs=not method.use_reference_model and spec.peft.type == "none",
    )
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        peft_config=lora_config(spec),
        **shared_trainer_arguments(inputs),
    )
