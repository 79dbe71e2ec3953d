"""The four models of PPO besides their optimizers: actor (the policy), reference, reward model, critic.

- Actor and reference come from the online trainer (:func:`posttrain.rl.grpo.trainer.build_policy`): with LoRA
  the reference is the actor with its adapter disabled, otherwise a frozen copy of the base.
- The reward model is any sequence-classification model with one label: a posttrain ``reward`` job's
  ``final/`` (a full model, or a LoRA adapter merged here into its base) or a hub/local folder. Frozen.
- The critic starts from ``method.critic_model`` (default: the reward model) and is trained in full or with
  LoRA (peft.type). Its per-token values are the classification head applied to every position: a forward
  hook on the head reads them, so any ``*ForSequenceClassification`` (and its PEFT wrapper) works unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.modeling import Placement, is_adapter_dir, load_model, lora_config, resolve_model_path
from posttrain.spec import JobSpec

log = logging.getLogger("posttrain.worker")

HEAD_NAMES = ("score", "classifier")
CRITIC_DIR = "critic"


def _load_tokenizer(path: str, fallback: str | None = None):
    from transformers import AutoTokenizer

    for source in (path, fallback):
        if source is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    raise ModelError(f"cannot load a tokenizer for {path!r}")


def load_sequence_classifier(spec: JobSpec, placement: Placement, name: str, what: str, with_tokenizer: bool = True):
    """A one-label sequence-classification model and (``with_tokenizer``) its tokenizer from ``name``: a full
    model, or a LoRA adapter (merged into the base its adapter_config.json names)."""
    path = resolve_model_path(name)
    base_path = None
    if Path(path).is_dir() and is_adapter_dir(Path(path)):
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        base_name = config.get("base_model_name_or_path")
        if not base_name:
            raise ModelError(f"{what} {name!r}: adapter_config.json names no base model")
        if config.get("task_type") not in (None, "SEQ_CLS"):
            raise ModelError(f"{what} {name!r} is a {config.get('task_type')} adapter; a reward model or critic "
                             "is a sequence-classification (SEQ_CLS) adapter, e.g. a posttrain reward job's final/")
        from peft import PeftModel

        base_path = resolve_model_path(base_name)
        base = load_model(spec, placement, head="sequence_classification", name=base_path)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = load_model(spec, placement, head="sequence_classification", name=path)
    tokenizer = _load_tokenizer(path, base_path) if with_tokenizer else None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(placement.device), tokenizer


def find_head(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (outermost module named score/classifier: with PEFT, its wrapper)."""
    candidates = [(name.count("."), name, module) for name, module in model.named_modules()
                  if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not candidates:
        raise ModelError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; "
                         "the critic must be a *ForSequenceClassification model")
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


@dataclass
class RewardModel:
    model: Any
    tokenizer: Any

    @torch.no_grad()
    def score(self, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
        """One score per rendered prompt + answer (the head at the last non-padding token)."""
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=max_length, add_special_tokens=False)
            logits = self.model(input_ids=encoded["input_ids"].to(device),
                                attention_mask=encoded["attention_mask"].to(device)).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)


def load_reward_model(spec: JobSpec, placement: Placement) -> RewardModel:
    model, tokenizer = load_sequence_classifier(spec, placement, spec.method.reward_model, "method.reward_model")
    model.eval().requires_grad_(False)
    return RewardModel(model, tokenizer)


def build_critic(spec: JobSpec, placement: Placement, checkpoint: Path | None, tokenizer):
    """The value model to train: from the checkpoint's critic/ when resuming, otherwise from critic_model
    (default: the reward model), with a fresh LoRA adapter (head trained in full) when peft.type=lora."""
    method = spec.method
    name = method.critic_model or method.reward_model
    saved = checkpoint / CRITIC_DIR if checkpoint is not None else None
    if saved is not None and spec.peft.type == "none":
        model, _ = load_sequence_classifier(spec, placement, str(saved), "checkpoint critic", with_tokenizer=False)
    else:
        # The critic reads the actor's tokens: its own tokenizer is never used.
        model, _ = load_sequence_classifier(spec, placement, name, "method.critic_model", with_tokenizer=False)
        if spec.peft.type != "none":
            from peft import PeftModel, get_peft_model

            if saved is not None:
                model = PeftModel.from_pretrained(model, saved, is_trainable=True)
            else:
                model = get_peft_model(model, lora_config(spec, head="sequence_classification"))
    if spec.peft.type == "none":
        model.requires_grad_(True)  # a model merged from an adapter comes back frozen
    vocab_size = len(tokenizer)
    embeddings = model.get_input_embeddings().weight.shape[0]
    if embeddings < vocab_size:
        raise ModelError(f"the critic ({name}) has {embeddings} token embeddings but the actor's vocabulary has "
                         f"{vocab_size}: the critic reads the actor's tokens, so it needs the same tokenizer")
    # The head's pooled output (which needs a pad token to find each row's end) is unused, but a model
    # without a pad token refuses batches of more than one row.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(placement.device)


def token_values(critic: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """The critic's value at every position, [B, T] (float32)."""
    head = find_head(critic)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    finally:
        handle.remove()
    values = captured[-1]
    if values.dim() != 3:
        raise ModelError(f"the critic's head returned shape {tuple(values.shape)}, not per-token scores [B, T, 1]")
    return values[..., 0].float()


def response_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, context_length: int, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) of every response position ([B, R], temperature-scaled as sampled) and, if asked, the
    entropy of the sampling distribution there."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, context_length - 1:-1].float() / temperature
    logprobs_all = logits.log_softmax(dim=-1)
    picked = logprobs_all.gather(-1, input_ids[:, context_length:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return picked, entropy
