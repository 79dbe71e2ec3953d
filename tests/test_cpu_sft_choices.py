"""SFT's per-machine speed choices on CPU keep the loss exact: the attention kernel picked batch by batch, and
the check that lets the trained-positions loss replace the model's head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sft_trainers import build_sft_trainer

from posttrain.losses import is_plain_projection
from posttrain.recipes.sft import CPUAttention, eager_attention_budget


def test_eager_attention_within_the_budget_and_the_loaded_kernel_beyond_it():
    choice = CPUAttention(heads=9, layers=30, budget_bytes=2 << 30, longer="sdpa")

    # SmolLM2 at batch 8: 8 x 9 x 480^2 x 4 bytes x 30 layers = 1.99 GB fits; 8 x 512 tokens (2.26 GB) does not.
    assert choice.choose(8, 480) == "eager"
    assert choice.choose(8, 512) == "sdpa"
    assert choice.choose(1, 512) == "eager"
    assert choice.describe(8, 480) == "eager"
    assert choice.describe(8, 512) == "eager up to 498 tokens per row, sdpa above"
    assert eager_attention_budget() >= 2 << 30


@pytest.fixture(scope="module")
def tiny_sft_trainer(tmp_path_factory):
    return build_sft_trainer(tmp_path_factory.mktemp("job"), {"type": "lora", "r": 4})


def test_sft_switches_attention_by_batch_length_with_the_same_loss(tiny_sft_trainer):
    trainer = tiny_sft_trainer
    assert trainer.cpu_attention is not None, "attn_implementation=auto on CPU chooses per batch"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    rows, length = batch["input_ids"].shape
    base = trainer.accelerator.unwrap_model(trainer.model)
    default_budget = trainer.cpu_attention.budget_bytes

    def loss_with_budget(budget: int) -> tuple[float, str]:
        trainer.cpu_attention.budget_bytes = budget
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        return loss, base.config._attn_implementation

    try:
        eager_loss, eager_kernel = loss_with_budget(trainer.cpu_attention.score_bytes(rows, length))
        sdpa_loss, sdpa_kernel = loss_with_budget(trainer.cpu_attention.score_bytes(rows, length) - 1)
    finally:
        trainer.cpu_attention.budget_bytes = default_budget

    assert (eager_kernel, sdpa_kernel) == ("eager", "sdpa")
    assert eager_loss == pytest.approx(sdpa_loss, rel=1e-4)


def test_plain_head_check_accepts_smollm2_under_bf16_autocast_and_refuses_a_scaled_head(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    ids = tokenizer("The capital of France is Paris. The capital of Greece is", return_tensors="pt").input_ids
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        hidden, weight = outputs.hidden_states[-1], model.get_output_embeddings().weight
        logits = outputs.logits
        assert logits.abs().max() > 10, "real logits, large enough that bf16 rounding exceeds 0.05"
        assert is_plain_projection(hidden, weight, logits)
        assert not is_plain_projection(hidden, weight, logits * 1.05)
        assert not is_plain_projection(hidden, weight, 30 * torch.tanh(logits / 30))
