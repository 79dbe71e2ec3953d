"""posttrain:tiny and the bundled samples: built once into a cache, loaded with plain transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from posttrain.errors import DatasetError, ModelError
from posttrain.model_cache import default_cache_dir
from posttrain.tiny import (
    DEMO_SAMPLE_NAMES,
    EOT_TOKEN,
    SAMPLE_NAMES,
    build_tiny_model,
    sample_path,
    tiny_model_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("posttrain-cache")


@pytest.fixture(scope="module")
def tiny_dir(tiny_cache: Path) -> Path:
    return tiny_model_path(tiny_cache)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_an_ordinary_transformers_folder(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 192)
    assert config.tie_word_embeddings and config.max_position_embeddings == 1024
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    # Plain text starts with <|begin_of_text|> and round-trips through the byte-level BPE.
    text = "Tom has 12 apples. Ünïcödé and emoji 🙂 still work."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_masks_the_reply_and_its_end_of_turn(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert rendered.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    )

    full = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [token for token, keep in zip(full["input_ids"], full["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(masked) == "The capital of France is Paris.<|eot_id|>"

    # TRL finds where a completion starts by comparing the prompt with prompt + completion.
    prompt = tokenizer.apply_chat_template(
        CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert full["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
    assert is_chat_template_stop_token_trained(tokenizer)


def test_generate_stops_at_end_of_turn_once_learned(tiny_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.convert_tokens_to_ids(EOT_TOKEN),
        tokenizer.eos_token_id,
    }

    # Overfit one conversation: the model must learn to end its reply with <|eot_id|>.
    conversation = tokenizer.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**conversation, labels=conversation["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    prompt = tokenizer.apply_chat_template(
        CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])
    assert reply == "The capital of France is Paris.<|eot_id|>"


def test_second_call_reuses_the_cached_build(tiny_cache: Path, tiny_dir: Path) -> None:
    weights = (tiny_dir / "model.safetensors").stat()
    assert tiny_model_path(tiny_cache) == tiny_dir
    again = (tiny_dir / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    # Only the finished folder is left in the cache, no temporary build folders.
    assert [p.name for p in tiny_cache.iterdir()] == [tiny_dir.name]


def test_builds_are_reproducible(tmp_path: Path, tiny_dir: Path) -> None:
    rebuilt = build_tiny_model(tmp_path / "rebuilt")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert digest(rebuilt / name) == digest(tiny_dir / name), name


def test_bigger_variant_shares_the_tokenizer(tmp_path: Path, tiny_dir: Path) -> None:
    bigger = build_tiny_model(tmp_path / "bigger", hidden_size=256, num_layers=4)
    config = AutoModelForCausalLM.from_pretrained(bigger).config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (256, 4, 768)
    assert digest(bigger / "tokenizer.json") == digest(tiny_dir / "tokenizer.json")


def test_concurrent_builds_both_succeed_and_agree(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    go = tmp_path / "go"
    # Each process imports everything first, says it is ready, then waits for the same start signal so
    # that both builds overlap.
    child = textwrap.dedent(
        f"""
        import hashlib, sys, time
        from pathlib import Path
        import transformers, torch, tokenizers
        from posttrain.tiny import tiny_model_path
        Path(sys.argv[1]).touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        path = tiny_model_path(Path({str(cache)!r}))
        print(path, hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
        """
    )
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(flag)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [process.communicate(timeout=120) for process in processes]

    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr
    lines = [stdout.strip().splitlines()[-1] for stdout, _ in results]
    assert lines[0] == lines[1]
    assert [p.name for p in cache.iterdir()] == [Path(lines[0].split()[0]).name]


def test_cache_folder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("POSTTRAIN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "posttrain"


def test_unusable_cache_folder_is_a_model_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelError, match="a-file"):
        tiny_model_path(blocker / "cache")


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("alpaca", {"instruction", "input", "output"}),
        ("preference", {"prompt", "chosen", "rejected"}),
        ("gsm8k", {"question", "answer"}),
        ("style", {"instruction", "input", "output"}),
        ("concise", {"prompt", "chosen", "rejected"}),
        ("problems", {"prompt", "answer"}),
    ],
)
def test_bundled_samples_have_about_200_rows_of_their_format(name: str, keys: set[str]) -> None:
    path = sample_path(f"posttrain:{name}")
    assert path == sample_path(name)
    assert path.stat().st_size < 100_000
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert 150 <= len(rows) <= 250
    for row in rows:
        assert set(row) == keys
        assert all(isinstance(value, str) for value in row.values())
    if name == "alpaca":
        assert all(len(row["output"].split()) < 40 for row in rows)
        assert any(row["input"] == "" for row in rows) and any(row["input"] for row in rows)
    if name == "preference":
        assert all(row["chosen"] != row["rejected"] for row in rows)
    if name == "gsm8k":
        assert all(re.search(r"\S\n#### -?\d+$", row["answer"]) for row in rows)


def test_bundled_samples_match_their_generator(tmp_path: Path) -> None:
    script = sample_path("alpaca").parent / "make_samples.py"
    spec = importlib.util.spec_from_file_location("make_samples", script)
    assert spec is not None and spec.loader is not None
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    make_samples.write_samples(tmp_path)
    for name in SAMPLE_NAMES + DEMO_SAMPLE_NAMES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == sample_path(name).read_bytes(), name


def test_unknown_sample_names_the_bundled_ones() -> None:
    with pytest.raises(DatasetError, match=r"posttrain:nope.*posttrain:alpaca, posttrain:preference"):
        sample_path("posttrain:nope")
