"""Supervised fine-tuning: prompt/completion, chat or plain-text rows through TRL's SFTTrainer.

Speed choices for ``auto`` settings, measured with bench/sft_throughput.py (see bench/README.md):

- rows of similar length are batched together (``group_by_length``), so batches carry little padding;
- padding-free batches (all rows concatenated into one, separated by ``position_ids``) only where a
  varlen attention kernel (flash attention) skips the cross-row blocks. SDPA and eager attention build a
  correct block-diagonal mask from ``position_ids`` but compute it densely over the whole concatenation,
  which was measured ~1.4x slower on CPU than length-grouped padded batches;
- fp32 weights under bf16 autocast on CPUs with native bf16 (see ``cpu_bf16_autocast``);
- eager attention on CPU while its score matrices are small (see ``cpu_attention``);
- on CPU, the loss projects only the trained positions (``posttrain.losses``) instead of TRL's tiled LM
  head, which on CPU scores every position (prompt and padding included) and recomputes the projection
  in its backward: on SmolLM2-135M (49K vocabulary) with LoRA that head took over half of a step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from posttrain.losses import trained_token_loss
from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import (
    RecipeInputs,
    record_settings,
    shared_trainer_arguments,
    training_arguments,
)
from posttrain.token_batches import TokenBudgetBatching

log = logging.getLogger("posttrain.worker")

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
# Largest total of per-layer attention score matrices (bytes, fp32, full batch at max_seq_length) for which
# eager attention is used on CPU.
EAGER_ATTENTION_MAX_BYTES = 2 << 30


class PosttrainSFTTrainer(TokenBudgetBatching, SFTTrainer):
    """SFTTrainer whose loss, where ``fused_loss`` is set, projects only the trained positions, and whose
    training batches, where ``tokens_per_batch`` is set, are sized by a token budget
    (:mod:`posttrain.token_batches`).

    The loss is the same token-mean negative log-likelihood (divided by ``num_items_in_batch`` when the
    Trainer passes it), computed by :func:`posttrain.losses.trained_token_loss` from the model's final hidden
    states; only speed and memory change. The token-accuracy and token-count metrics are kept; the entropy
    metric is dropped (it needs a softmax over the vocabulary that the loss does not keep).
    """

    def __init__(self, *args: Any, fused_loss: bool = False, tokens_per_batch: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.tokens_per_batch = tokens_per_batch
        self._head_checked = False

    def row_lengths(self, dataset: Any) -> list[int]:
        # Prepared SFT rows are already truncated to max_length (or packed to it).
        return [len(ids) for ids in dataset["input_ids"]]

    def _fused_loss_applies(self, inputs: dict[str, Any]) -> bool:
        return (
            self.fused_loss
            and self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
            and "labels" in inputs
            and "shift_labels" not in inputs
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._fused_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        # Through the (DDP/PEFT) wrapper as usual; the model's own head projects only the last position.
        outputs = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1]
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        if not self._head_checked and not self._plain_head(hidden, weight, outputs.logits):
            self.fused_loss = False
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_sum, correct, count = trained_token_loss(hidden, weight, inputs["labels"])
        denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / denominator
        # As in SFTTrainer.compute_loss: num_items_in_batch counts every rank's tokens; DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        num_valid = self.accelerator.gather_for_metrics(count).sum()
        num_correct = self.accelerator.gather_for_metrics(correct).sum()
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:
                local_tokens = torch.tensor(inputs["input_ids"].size(1), device=inputs["input_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local_tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _plain_head(self, hidden: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether the model's logits are exactly ``last hidden state @ head.T`` (no scaling, softcap or bias),
        checked once on the last position, which the model projected itself."""
        self._head_checked = True
        with torch.no_grad():
            ours = (hidden[:, -1].float() @ weight.float().t())
            plain = ours.shape == logits[:, -1].shape and torch.allclose(ours, logits[:, -1].float(), rtol=0.05, atol=0.05)
        if not plain:
            log.warning("sft: this model's LM head is not a plain projection; using TRL's loss")
        return plain


def use_fused_loss(inputs: RecipeInputs) -> bool:
    """Where the trained-positions loss replaces TRL's tiled LM head: on CPU (measured there, see module doc),
    except under FSDP, whose sharded head weight is only whole inside the model's own forward."""
    dist = inputs.spec.distributed
    return inputs.placement.device == "cpu" and not (dist.launcher == "torchrun" and dist.strategy == "fsdp")


def use_padding_free(inputs: RecipeInputs) -> bool:
    setting = inputs.spec.training.padding_free
    if setting != "auto":
        return bool(setting)
    return inputs.placement.device == "cuda" and inputs.spec.model.attn_implementation in VARLEN_ATTENTION


def cpu_attention(inputs: RecipeInputs) -> str | None:
    """``eager`` attention for ``attn_implementation=auto`` on CPU while the attention scores stay small.

    On CPU, eager attention (plain matmuls and a softmax) trained a hidden-256 model ~15% faster than
    SDPA with a padding mask, at the same loss; but it keeps every layer's full score matrix for the
    backward pass, so it is used only while those stay under ``EAGER_ATTENTION_MAX_BYTES``.
    """
    spec = inputs.spec
    if inputs.placement.device != "cpu" or spec.model.attn_implementation != "auto":
        return None
    try:
        from transformers import AutoConfig

        from posttrain.modeling import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(spec.model.name_or_path),
                                            revision=spec.model.revision,
                                            trust_remote_code=spec.model.trust_remote_code).get_text_config()
        heads, layers = int(config.num_attention_heads), int(config.num_hidden_layers)
    except (OSError, ValueError, AttributeError, TypeError):
        return None  # load_model reports an unreadable model; an unusual config keeps transformers' choice
    training = spec.training
    # A token budget holds at most tokens_per_batch / max_seq_length full-length rows (its worst case).
    rows = (training.tokens_per_batch // training.max_seq_length if training.tokens_per_batch
            else training.per_device_train_batch_size)
    scores = rows * heads * training.max_seq_length**2 * 4 * layers
    return "eager" if scores <= EAGER_ATTENTION_MAX_BYTES else None


def use_group_by_length(inputs: RecipeInputs, padding_free: bool) -> bool:
    setting = inputs.spec.training.group_by_length
    if setting != "auto":
        return bool(setting)
    # Packed or padding-free batches have no padding to save.
    return not inputs.spec.training.packing and not padding_free


def build_trainer(inputs: RecipeInputs) -> PosttrainSFTTrainer:
    spec = inputs.spec
    method = spec.method
    attention = cpu_attention(inputs)
    if attention is not None:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"attn_implementation": attention})})
    model = load_model(spec, inputs.placement)
    kwargs = training_arguments(inputs, model.num_parameters())
    padding_free = use_padding_free(inputs)
    group_by_length = use_group_by_length(inputs, padding_free)
    tokens_per_batch = spec.training.tokens_per_batch
    if group_by_length and tokens_per_batch is None:
        kwargs["train_sampling_strategy"] = "group_by_length"
    if tokens_per_batch is not None:
        record_settings(inputs, tokens_per_batch=tokens_per_batch)
    record_settings(inputs, padding_free=padding_free, group_by_length=group_by_length,
                    gradient_checkpointing=bool(kwargs.get("activation_checkpointing")),
                    attn_implementation=model.config._attn_implementation)
    fused_loss = use_fused_loss(inputs)
    log.info("sft: padding_free=%s group_by_length=%s tokens_per_batch=%s gradient_checkpointing=%s bf16=%s "
             "fused_loss=%s attention=%s", padding_free, group_by_length, tokens_per_batch, bool(kwargs.get("activation_checkpointing")), kwargs["bf16"],
             fused_loss, model.config._attn_implementation)
    config = SFTConfig(
        **kwargs,
        max_length=None if padding_free and not spec.training.packing else spec.training.max_seq_length,
        packing=spec.training.packing,
        padding_free=padding_free,
        completion_only_loss=method.completion_only_loss if "completion" in inputs.data.train.column_names else None,
        assistant_only_loss=method.assistant_only_loss,
        dataset_num_proc=None,
    )
    return PosttrainSFTTrainer(
        model=model,
        args=config,
        peft_config=lora_config(spec),
        **shared_trainer_arguments(inputs),
        fused_loss=fused_loss,
        tokens_per_batch=tokens_per_batch,
    )

