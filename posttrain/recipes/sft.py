"""Supervised fine-tuning: prompt/completion, chat or plain-text rows through TRL's SFTTrainer."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from posttrain.modeling import ensure_chat_template, load_model, lora_config
from posttrain.recipes.common import RecipeInputs, training_arguments


def use_padding_free(inputs: RecipeInputs) -> bool:
    setting = inputs.spec.training.padding_free
    if setting != "auto":
        return bool(setting)
    return False


def build_trainer(inputs: RecipeInputs) -> SFTTrainer:
    spec = inputs.spec
    method = spec.method
    if is_conversational(inputs.data.train[0]):
        ensure_chat_template(inputs.tokenizer)
    model = load_model(spec, inputs.placement)
    kwargs = training_arguments(inputs, model.num_parameters())
    group_by_length = spec.training.group_by_length
    if group_by_length is True or (group_by_length == "auto" and not spec.training.packing):
        kwargs["train_sampling_strategy"] = "group_by_length"
    padding_free = use_padding_free(inputs)
    config = SFTConfig(
        **kwargs,
        max_length=None if padding_free and not spec.training.packing else spec.training.max_seq_length,
        packing=spec.training.packing,
        padding_free=padding_free,
        completion_only_loss=method.completion_only_loss if "completion" in inputs.data.train.column_names else None,
        assistant_only_loss=method.assistant_only_loss,
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=inputs.data.train,
        eval_dataset=inputs.data.eval,
        processing_class=inputs.tokenizer,
        peft_config=lora_config(spec),
        callbacks=inputs.callbacks,
    )
