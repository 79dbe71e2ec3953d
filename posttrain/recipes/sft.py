"""Supervised fine-tuning: prompt/completion, chat or plain-text rows through TRL's SFTTrainer.

Speed choices for ``auto`` settings, measured with bench/sft_throughput.py (see bench/README.md):

- rows of similar length are batched together (``group_by_length``), so batches carry little padding;
- padding-free batches (all rows concatenated into one, separated by ``position_ids``) only where a
  varlen attention kernel (flash attention) skips the cross-row blocks. SDPA and eager attention build a
  correct block-diagonal mask from ``position_ids`` but compute it densely over the whole concatenation,
  which was measured ~1.4x slower on CPU than length-grouped padded batches;
- fp32 weights under bf16 autocast on CPUs with native bf16 (see ``cpu_bf16_autocast``);
- eager attention on CPU for every batch whose score matrices fit a share of this machine's memory, SDPA
  for longer ones, chosen batch by batch (see ``CPUAttention``);
- on CPU, the loss projects only the trained positions (``posttrain.losses``) instead of TRL's tiled LM
  head, which on CPU scores every position (prompt and padding included) and recomputes the projection
  in its backward: on SmolLM2-135M (49K vocabulary) with LoRA that head took over half of a step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from posttrain.losses import is_plain_projection, trained_token_loss
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
# Eager attention on CPU is used for a batch while all layers' fp32 score matrices take at most this share of
# the machine's memory (eager holds ~1.5x that: the fp32 softmax and its bf16 copy), and never less than
# EAGER_ATTENTION_MIN_BYTES.
EAGER_ATTENTION_MEMORY_SHARE = 1 / 8
EAGER_ATTENTION_MIN_BYTES = 2 << 30


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
                 cpu_attention: CPUAttention | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.tokens_per_batch = tokens_per_batch
        self.cpu_attention = cpu_attention
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
        if self.cpu_attention is not None and "input_ids" in inputs:
            self.cpu_attention.apply(self.accelerator.unwrap_model(model), *inputs["input_ids"].shape[:2])
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
        self._head_checked = True
        plain = is_plain_projection(hidden, weight, logits)
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


class CPUAttention:
    """Eager or SDPA attention on CPU, chosen for each batch from its shape (``attn_implementation=auto``).

    Measured on SmolLM2-135M with LoRA under bf16 autocast (a full forward and backward, batches of 8 rows):
    eager was 12% faster than SDPA at 128-256 tokens, 5% at 512 and even at 1,024 (SDPA's flash kernel for
    CPU is slow in its backward pass, and with a padding mask). But eager keeps every layer's full score
    matrices for the backward pass, so a batch whose scores would pass ``budget_bytes`` runs with ``longer``
    (what transformers chose when loading the model: SDPA where the model supports it).
    Switching goes through transformers' ``set_attn_implementation``, only when the choice changes.
    """

    def __init__(self, heads: int, layers: int, budget_bytes: int, longer: str = "sdpa") -> None:
        self.heads, self.layers, self.budget_bytes = heads, layers, budget_bytes
        self.longer = longer  # what batches over the budget get: what transformers chose when loading

    def score_bytes(self, rows: int, length: int) -> int:
        return rows * self.heads * length * length * 4 * self.layers

    def choose(self, rows: int, length: int) -> str:
        return "eager" if self.score_bytes(rows, length) <= self.budget_bytes else self.longer

    def apply(self, model: Any, rows: int, length: int) -> None:
        wanted = self.choose(rows, length)
        if model.config._attn_implementation != wanted:
            model.set_attn_implementation(wanted)

    def describe(self, rows: int, max_length: int) -> str:
        """What the longest batch gets: ``eager``, or which lengths switch to SDPA."""
        if self.choose(rows, max_length) == "eager":
            return "eager"
        longest = int((self.budget_bytes / (rows * self.heads * 4 * self.layers)) ** 0.5)
        return f"eager up to {longest} tokens per row, {self.longer} above"


def machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def eager_attention_budget() -> int:
    memory = machine_memory_bytes()
    return max(EAGER_ATTENTION_MIN_BYTES, int((memory or 0) * EAGER_ATTENTION_MEMORY_SHARE))


def cpu_attention(inputs: RecipeInputs, model: Any) -> CPUAttention | None:
    """The per-batch attention choice for ``attn_implementation=auto`` on CPU; None elsewhere, and for models
    whose attention cannot be switched (they keep what transformers chose when loading them)."""
    if inputs.placement.device != "cpu" or inputs.spec.model.attn_implementation != "auto":
        return None
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is None or not can_switch():
        return None
    try:
        config = model.config.get_text_config()
        heads, layers = int(config.num_attention_heads), int(config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return None
    return CPUAttention(heads, layers, eager_attention_budget(), longer=model.config._attn_implementation)


def use_group_by_length(inputs: RecipeInputs, padding_free: bool) -> bool:
    setting = inputs.spec.training.group_by_length
    if setting != "auto":
        return bool(setting)
    # Packed or padding-free batches have no padding to save.
    return not inputs.spec.training.packing and not padding_free


def build_trainer(inputs: RecipeInputs) -> PosttrainSFTTrainer:
    spec = inputs.spec
    method = spec.method
    model = load_model(spec, inputs.placement)
    attention = cpu_attention(inputs, model)
    kwargs = training_arguments(inputs, model.num_parameters())
    padding_free = use_padding_free(inputs)
    group_by_length = use_group_by_length(inputs, padding_free)
    tokens_per_batch = spec.training.tokens_per_batch
    if group_by_length and tokens_per_batch is None:
        kwargs["train_sampling_strategy"] = "group_by_length"
    if tokens_per_batch is not None:
        record_settings(inputs, tokens_per_batch=tokens_per_batch)
    training = spec.training
    # A token budget holds at most tokens_per_batch / max_seq_length full-length rows (its worst case).
    rows = (training.tokens_per_batch // training.max_seq_length if training.tokens_per_batch
            else training.per_device_train_batch_size)
    attention_label = (attention.describe(max(1, rows), training.max_seq_length) if attention is not None
                       else model.config._attn_implementation)
    record_settings(inputs, padding_free=padding_free, group_by_length=group_by_length,
                    gradient_checkpointing=bool(kwargs.get("activation_checkpointing")),
                    attn_implementation=attention_label)
    fused_loss = use_fused_loss(inputs)
    log.info("sft: padding_free=%s group_by_length=%s tokens_per_batch=%s gradient_checkpointing=%s bf16=%s "
             "fused_loss=%s attention=%s", padding_free, group_by_length, tokens_per_batch, bool(kwargs.get("activation_checkpointing")), kwargs["bf16"],
             fused_loss, attention_label)
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
        cpu_attention=attention,
    )

