"""Measure every weight-sync mode on one model, side by side, plus the server's generation speed.

For each mode a test-side trainer loads the model, changes its weights with a real optimizer step (not
timed), and times only the sync (``WeightSync.after_update``, plus ``before_update`` for shared_vllm);
after the last sync it checks that the server's greedy output equals the trainer's, so every number is
for a sync that really happened. Used by ``posttrain rl bench-sync`` and ``bench/weight_sync.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from posttrain.inference.generation import SamplingParams, generate_batch
from posttrain.inference.process import InferenceServerProcess
from posttrain.ports import free_port
from posttrain.spec import SMOLLM2_MODEL_NAME
from posttrain.weight_sync.strategies import SyncConfig, WeightSync, make_weight_sync

PROMPT_TEXT = "Question: what is 17 times 3? Answer step by step."
TARGET_TEXT = "Question: what is 17 times 3? Answer: 17 times 3 is 51. #### 51"
# The Atropos trainer's README figures for its modes (GPU, large models), for the side-by-side table.
SEED_FIGURES = {"none": "30-60 s", "lora_only": "1-5 s", "shared_vllm": "0 ms", "broadcast": "n/a"}


def server_command(model: str, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", model, "--port", str(port),
            *flags]


def load_trainer_model(model: str, lora: bool):
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import resolve_model_path

    loaded = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        loaded = get_peft_model(loaded, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    return loaded


class Trainer:
    """The smallest real trainer: one AdamW step on a fixed text per update."""

    def __init__(self, model, tokenizer, lr: float) -> None:
        self.model = model
        self.batch = tokenizer(TARGET_TEXT, return_tensors="pt")
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr = lr

    def step(self, sync: WeightSync) -> None:
        if self.optimizer is None:  # after attach(): shared_vllm rebinds the parameters first
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        self.model.train()
        loss = self.model(**self.batch, labels=self.batch["input_ids"]).loss
        loss.backward()
        sync.before_update()
        self.optimizer.step()
        self.optimizer.zero_grad()


def greedy_ids(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"prompt": {"prompt_token_ids": prompt}, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["token_ids"][0]


def local_greedy(model, tokenizer, prompt: list[int], max_tokens: int) -> list[int]:
    model.eval()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return generate_batch(model, tokenizer, [prompt], [params])[0].completions[0].token_ids


def measure_mode(mode: str, model_name: str, tokenizer, url: str, steps: int, save_dir: Path,
                 command: list[str] | None = None, **config: Any) -> dict[str, Any]:
    prompt = tokenizer(PROMPT_TEXT).input_ids
    sync = make_weight_sync(SyncConfig(mode, server_url=url, save_dir=save_dir, server_command=command,  # type: ignore[arg-type]
                                       **config))
    model = load_trainer_model(model_name, lora=mode == "lora_only")
    try:
        model = sync.attach(model)
        trainer = Trainer(model, tokenizer, lr=1e-3 if mode == "lora_only" else 1e-4)
        before = greedy_ids(url, prompt, 12)
        seconds = []
        for step in range(1, steps + 1):
            trainer.step(sync)
            started = time.perf_counter()
            reported = sync.after_update(model, step)
            wall = time.perf_counter() - started
            # shared_vllm's before_update (the pause) is part of its sync; after_update reports both.
            seconds.append(reported if mode == "shared_vllm" else wall)
        served = greedy_ids(url, prompt, 12)
        matches = served == local_greedy(model, tokenizer, prompt, 12)
    finally:
        sync.close()
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs": len(seconds), "served_matches_trainer": matches, "output_changed": served != before,
            "seed_readme": SEED_FIGURES[mode]}


def measure_generation(url: str, tokenizer, max_tokens: int, batch: int) -> dict[str, Any]:
    prompts = [tokenizer(f"{PROMPT_TEXT} ({i})").input_ids for i in range(batch)]
    started = time.perf_counter()
    single = greedy_ids(url, prompts[0], max_tokens)
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        outputs = list(pool.map(lambda p: greedy_ids(url, p, max_tokens), prompts))
    batch_s = time.perf_counter() - started
    info = httpx.get(f"{url}/weights/info").json()
    return {"max_tokens": max_tokens, "single_request_tokens_per_s": len(single) / single_s,
            f"batch_{batch}_tokens_per_s": sum(len(o) for o in outputs) / batch_s,
            "largest_batch_seen": info["largest_batch"]}


def run_benchmark(model: str = SMOLLM2_MODEL_NAME, steps: int = 3, generation_tokens: int = 64, batch: int = 8,
                  modes: tuple[str, ...] = ("shared_vllm", "broadcast", "lora_only", "lora_inplace", "none"),
                  progress: Callable[[str], None] = print) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from posttrain.modeling import resolve_model_path

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    report: dict[str, Any] = {"model": model, "steps_per_mode": steps, "modes": {}, "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-sync-") as tmp:
        root = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # One long-running server serves both LoRA variants, shared_vllm and broadcast.
        flags = ("--enable-lora", "--shared-weights", "--shared-weights-dir", str(root))
        server = InferenceServerProcess(server_command(model, port, *flags), url, log_path=root / "server.log")
        started = time.perf_counter()
        server.start()
        report["server_start_s"] = time.perf_counter() - started
        try:
            progress("generation speed")
            report["generation"] = measure_generation(url, tokenizer, generation_tokens, batch)
            # LoRA first, on the untouched base weights the trainer also loads; then the adapters go, and
            # shared_vllm (trains the served bytes) and broadcast (overwrites every tensor) follow.
            for mode in ("lora_only", "lora_inplace", "shared_vllm", "broadcast"):
                if mode in modes:
                    progress(mode)
                    real_mode = "lora_only" if mode == "lora_inplace" else mode
                    report["modes"][mode] = measure_mode(real_mode, model, tokenizer, url, steps, root / mode,
                                                         lora_inplace=mode == "lora_inplace",
                                                         shared_weights_dir=root)
                    unload_adapters(url)
        finally:
            server.stop()
        if "none" in modes:
            progress("none (save + restart)")
            port = free_port()
            report["modes"]["none"] = measure_mode(
                "none", model, tokenizer, f"http://127.0.0.1:{port}", steps, root / "none",
                command=server_command(model, port), server_log=root / "restart.log")
    return report


def unload_adapters(url: str) -> None:
    for entry in httpx.get(f"{url}/v1/models").json()["data"][1:]:
        httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": entry["id"]}).raise_for_status()


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
