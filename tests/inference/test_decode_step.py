"""The engine's own Llama decode step computes what transformers' forward computes: bit for bit in float32
(base model, and LoRA adapters mixed per row), the same greedy tokens in bfloat16. Real tiny model, real
PEFT adapters; the reference is the same batch stepped through transformers' forward."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.inference import row_lora
from posttrain.inference.adapters import AdapterSlots
from posttrain.inference.decode_step import LlamaDecodeStep
from posttrain.inference.generation import DecodeBatch, SamplingParams, new_sequences
from posttrain.inference.model_source import ModelSource
from posttrain.inference.pool import load_model

MODEL = "posttrain:tiny"
# Rows of different lengths, one that leaves early (a hole the others step over).
PROMPTS = [([1, 17, 42, 99, 7], 12), ([1, 5], 3), ([1, 300, 301, 302, 303, 304, 305, 306], 12), ([1, 44, 45], 12)]


def batch_logits(model, tokenizer, steps: int, own_step: bool, monkeypatch, slots=None, lora=None,
                 prompts=PROMPTS) -> list[torch.Tensor]:
    """Each step's logits of the running rows, stepping a batch of ``prompts`` (the i-th on adapter slots[i])."""
    with monkeypatch.context() as patch:
        if not own_step:
            patch.setattr(LlamaDecodeStep, "supports", staticmethod(lambda model, lora: False))
        batch = DecodeBatch(model, tokenizer, mixed_adapters=lora is not None, row_lora=lora)
        seen: list[torch.Tensor] = []
        take = batch._take_tokens
        patch.setattr(batch, "_take_tokens", lambda logits, sequences: (seen.append(logits.clone()),
                                                                        take(logits, sequences)))
        groups = [new_sequences(tokenizer, prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                                "cpu", slots[i] if slots else None) for i, (prompt, tokens) in enumerate(prompts)]
        batch.add(groups)
        for _ in range(steps):
            batch.step()
        assert (batch._decode_step is not None) == own_step
        return seen[len(prompts):]  # the prefill (one call per prompt) is transformers' forward either way


def test_float32_steps_are_bit_identical_to_transformers(monkeypatch):
    model, tokenizer = load_model(ModelSource(MODEL), "cpu", torch.float32)
    assert LlamaDecodeStep.supports(model, lora=False)

    own = batch_logits(model, tokenizer, 8, True, monkeypatch)
    reference = batch_logits(model, tokenizer, 8, False, monkeypatch)

    assert len(own) == 8
    for mine, theirs in zip(own, reference, strict=True):
        assert torch.equal(mine, theirs)


def test_mixed_adapters_in_the_own_step_match_transformers_with_row_lora(monkeypatch, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import resolve_model_path

    folders = []
    for seed, modules in ((1, ["q_proj", "v_proj"]), (2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=modules,
                                                     init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / f"adapter-{seed}")
        folders.append(tmp_path / f"adapter-{seed}")
    model, tokenizer = load_model(ModelSource(MODEL), "cpu", torch.float32)
    slots = AdapterSlots(model)
    for index, folder in enumerate(folders):
        slots.load(f"a{index}", folder, json.loads((folder / "adapter_config.json").read_text()))
    lora = row_lora.RowLora(slots.model)
    lora.rebuild(sorted(slots.slot_of.values()), slots.version)
    rows = [slots.slot_of["a0"], None, slots.slot_of["a1"], slots.slot_of["a0"]]
    assert LlamaDecodeStep.supports(slots.model, lora=True)
    assert not LlamaDecodeStep.supports(slots.model, lora=False)  # PEFT's own layers: transformers' forward

    own = batch_logits(slots.model, tokenizer, 8, True, monkeypatch, rows, lora)
    reference = batch_logits(slots.model, tokenizer, 8, False, monkeypatch, rows, lora)

    for mine, theirs in zip(own, reference, strict=True):
        # The adapters' A products of q, k and v (and gate, up) are one matrix product here: equal up to rounding.
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("rows", [1, 4])
def test_bfloat16_steps_pick_the_same_tokens_as_transformers(monkeypatch, rows):
    model, tokenizer = load_model(ModelSource(MODEL), "cpu", torch.bfloat16)
    own = batch_logits(model, tokenizer, 6, True, monkeypatch, prompts=PROMPTS[:rows])
    reference = batch_logits(model, tokenizer, 6, False, monkeypatch, prompts=PROMPTS[:rows])
    for mine, theirs in zip(own, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0.05, atol=0.05)
