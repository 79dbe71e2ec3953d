"""Helpers of the inference-server tests: a real `posttrain rl serve-inference` process and a test-side trainer."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import httpx
import torch
from ports import free_port

from posttrain.inference.process import InferenceServerProcess

# A loaded 2-core machine can take seconds to answer the first LoRA load (importing PEFT): no 5 s default.
post = functools.partial(httpx.post, timeout=120)
get = functools.partial(httpx.get, timeout=120)


def serve_command(model: str, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", model, "--port", str(port),
            *flags]


def start_server(model: str, log_dir: Path, *flags: str) -> InferenceServerProcess:
    port = free_port()
    server = InferenceServerProcess(serve_command(model, port, *flags), f"http://127.0.0.1:{port}",
                                    log_path=log_dir / f"server-{port}.log", startup_timeout=180)
    server.start()
    return server


def greedy(url: str, prompt: list[int], max_tokens: int = 8, model: str | None = None) -> list[int]:
    """The server's greedy completion of ``prompt`` (token ids) through vLLM's /generate."""
    body: dict = {"prompt": {"prompt_token_ids": prompt}, "max_tokens": max_tokens, "temperature": 0,
                  "logprobs": 0, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    response = post(f"{url}/generate", json=body)
    response.raise_for_status()
    return response.json()["token_ids"][0]


def local_greedy(model, tokenizer, prompt: list[int], max_tokens: int = 8) -> list[int]:
    """The same greedy completion computed in this process (the trainer's view of its own weights)."""
    from posttrain.inference.generation import SamplingParams, generate_batch

    was_training = model.training
    model.eval()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens = generate_batch(model, tokenizer, [prompt], [params])[0].completions[0].token_ids
    model.train(was_training)
    return tokens


def sgd_steps(model, tokenizer, target: str, steps: int = 3, lr: float = 0.5, sync=None) -> None:
    """A deliberate weight change: a few SGD steps that make ``target`` likelier (the test's "trainer")."""
    batch = tokenizer(target, return_tensors="pt")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        if sync is not None:
            sync.before_update()
        optimizer.step()
        optimizer.zero_grad()
