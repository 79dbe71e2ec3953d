"""Start the inference server from its options: our transformers server, or ``vllm serve`` on GPU machines."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.errors import ConfigError, UnsupportedError
from posttrain.inference.parent_watch import watch_parent
from posttrain.modeling import resolve_device, resolve_model_path, torch_dtype

log = logging.getLogger(__name__)

ServeDtype = Literal["auto", "bfloat16", "float16", "float32"]
Backend = Literal["transformers", "vllm"]


@dataclass
class ServeOptions:
    model: str
    port: int = 9001
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    tokenizer: str | None = None  # defaults to the model; a restart onto a bare checkpoint keeps the original's
    enable_lora: bool = False
    max_lora_rank: int = 16
    dtype: ServeDtype = "auto"
    device: str = "auto"
    backend: Backend = "transformers"
    shared_weights: bool = False  # shared_vllm: weights in one shared buffer the trainer maps
    shared_weights_dir: str = "/dev/shm"
    max_batch_size: int = 64
    max_model_len: int | None = None
    num_threads: int | None = None
    api_key: str | None = None  # required as Authorization: Bearer on every route but /health
    allow_unauthenticated: bool = False  # serve a non-loopback host without an api_key anyway
    lora_root: str | None = None  # adapters load only from inside this folder

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(options: ServeOptions) -> None:
    """The server can overwrite its weights and load files on request: off loopback it needs a key, and
    adapters a folder they must come from."""
    if is_loopback(options.host):
        return
    if not options.api_key and not options.allow_unauthenticated:
        raise ConfigError(f"--host {options.host} is reachable from other machines: set --api-key (or "
                          "POSTTRAIN_INFERENCE_API_KEY), or pass --allow-unauthenticated on a trusted network")
    if options.enable_lora and options.lora_root is None:
        raise ConfigError(f"--enable-lora on --host {options.host} needs --lora-root, the folder adapters may "
                          "be loaded from")


def vllm_serve_command(options: ServeOptions) -> list[str]:
    """The ``vllm serve`` command line for these options (runtime LoRA loading needs the env variable below)."""
    if options.shared_weights:
        raise UnsupportedError("--shared-weights is served by the transformers backend; vLLM's single-copy mode "
                               "needs Atropos' patched vLLM server (see docs/rl-inference.md)")
    command = ["vllm", "serve", resolve_model_path(options.model), "--host", options.host,
               "--port", str(options.port), "--served-model-name", options.name, "--dtype", options.dtype]
    if options.tokenizer:
        command += ["--tokenizer", resolve_model_path(options.tokenizer)]
    if options.enable_lora:
        command += ["--enable-lora", "--max-lora-rank", str(options.max_lora_rank)]
    if options.max_model_len:
        command += ["--max-model-len", str(options.max_model_len)]
    return command


def exec_vllm(options: ServeOptions) -> None:
    command = vllm_serve_command(options)
    if shutil.which("vllm") is None:
        raise UnsupportedError("--backend vllm needs vLLM installed (pip install vllm, on a CUDA machine); "
                               f"the command would be: {' '.join(command)}")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if options.api_key:
        env["VLLM_API_KEY"] = options.api_key  # vllm serve's --api-key, kept off the command line
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def load_served_model(options: ServeOptions):
    """Model + tokenizer through posttrain's model-name resolution, so names match the trainer's parameters.
    ``auto`` is float32 on CPU: the trainer recomputes the sampled tokens' log-probabilities in its own
    precision, and the PPO ratio must compare like with like."""
    from posttrain.inference.model_source import ModelSource
    from posttrain.inference.pool import load_model

    device = resolve_device(options.device)
    if options.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = torch_dtype(options.dtype)
    return load_model(ModelSource(base=options.model, tokenizer=options.tokenizer), device, dtype)


def build_app(options: ServeOptions):
    from posttrain.inference.engine import InferenceEngine
    from posttrain.inference.server import WeightState, create_app
    from posttrain.inference.shared_weights import UpdateLock, share_model_weights, sweep_stale_weights
    from posttrain.modeling import apply_threads

    apply_threads(options.num_threads, resolve_device(options.device))
    if options.enable_lora:
        import peft  # noqa: F401 - imported now, so the trainer's first adapter sync does not wait for it
    model, tokenizer = load_served_model(options)
    weights = WeightState()
    update_lock = None
    if options.shared_weights:
        sweep_stale_weights(options.shared_weights_dir)  # what servers killed by SIGKILL left behind
        weights.shared_layout, weights.shared_buffer = share_model_weights(
            model, options.shared_weights_dir, tag=f"posttrain-{options.port}")
        update_lock = UpdateLock(weights.shared_layout.lock_path or "")
    engine = InferenceEngine(model, tokenizer, options.name, max_batch_size=options.max_batch_size,
                             max_model_len=options.max_model_len, enable_lora=options.enable_lora,
                             max_lora_rank=options.max_lora_rank, update_lock=update_lock,
                             lora_root=options.lora_root)
    return create_app(engine, weights, api_key=options.api_key)


def run_server(options: ServeOptions) -> None:
    """Serve until SIGTERM / Ctrl-C; uvicorn finishes requests in flight before it exits."""
    import uvicorn

    check_exposure(options)
    if options.backend == "vllm":
        exec_vllm(options)
        return
    app = build_app(options)
    watch_parent()  # started by a trainer: stop when it is gone (the portable half of dying with it)
    print(f"posttrain inference server: {options.name} on http://{options.host}:{options.port}", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=30)
