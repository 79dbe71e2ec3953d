"""The inference engine behind the server: one model, a batching thread, LoRA adapters, a weight lock.

Requests are queued; the engine thread takes everything that arrived within a few milliseconds of the
first one and generates it as one batch (one batch per adapter). Everything that changes the weights
(loading an adapter, receiving a broadcast, the trainer's optimizer step in shared-memory mode) holds
``weights_lock``, which the engine thread also holds for a whole batch: no sample mixes two policies.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.inference.adapters import AdapterSlots
from posttrain.inference.generation import GenerationResult, SamplingParams, generate_batch
from posttrain.inference.shared_weights import UpdateLock

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT saves and loads

log = logging.getLogger(__name__)


class RequestError(PosttrainError):
    """A request the server refuses (answered with a 4xx status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    future: Future


class WeightsLock:
    """A lock that one HTTP request can take (pause) and another release (resume).

    A pause that is never resumed (a trainer that died mid-step) expires after its timeout, so the
    server does not hang forever.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self._pause_token: object | None = None

    def __enter__(self) -> WeightsLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    @property
    def paused(self) -> bool:
        return self._pause_token is not None

    def pause(self, timeout_s: float, blocking: bool = True) -> bool:
        """Take the lock for a weight update; False only when ``blocking`` is off and a batch is in flight."""
        if self._pause_token is not None:
            raise RequestError("generation is already paused; resume it first", status=409)
        if not self._lock.acquire(blocking=blocking):
            return False
        token = object()
        with self._state:
            self._pause_token = token
        timer = threading.Timer(timeout_s, self._expire, args=(token,))
        timer.daemon = True
        timer.start()
        return True

    def resume(self) -> bool:
        """Release a pause; False when generation was not paused."""
        with self._state:
            if self._pause_token is None:
                return False
            self._pause_token = None
            self._lock.release()
            return True

    def _expire(self, token: object) -> None:
        with self._state:
            if self._pause_token is token:
                log.warning("a weight-update pause was never resumed; resuming generation")
                self._pause_token = None
                self._lock.release()


class InferenceEngine:
    def __init__(self, model, tokenizer, model_name: str, *, max_batch_size: int = 64, batch_wait_s: float = 0.005,
                 max_model_len: int | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                 update_lock: UpdateLock | None = None, lora_root: str | Path | None = None) -> None:
        self.base_model = model.eval()
        self.lora = AdapterSlots(self.base_model)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        # Adapters load only from local folders inside this one (None: any local folder; see inference_launch).
        self.lora_root = Path(lora_root).resolve() if lora_root is not None else None
        self.weights_lock = WeightsLock()
        self.update_lock = update_lock  # shared_vllm: the trainer's optimizer step, across processes
        self.weights_version = 0
        self.generated_tokens = 0
        self.largest_batch = 0  # most requests generated together so far
        self.pending = 0  # requests submitted and not answered yet
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        self._thread.start()

    @property
    def adapters(self) -> OrderedDict[str, str]:
        """Loaded adapters, name -> folder, oldest first (the newest serves unnamed requests)."""
        return self.lora.loaded

    # -- generation -------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> Future:
        """Queue one prompt; the future resolves to a GenerationResult. ``adapter`` None = newest adapter."""
        if not prompt:
            raise RequestError("the prompt is empty")
        vocab = self.base_model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"model's context length {self.max_model_len}")
        if adapter is not None and adapter not in self.adapters:
            raise RequestError(f"model {adapter!r} does not exist", status=404)
        future: Future = Future()
        with self._pending_lock:
            self.pending += 1
        future.add_done_callback(self._answered)
        self._queue.put(_Job(prompt, params, adapter, future))
        return future

    def _answered(self, _future: Future) -> None:
        with self._pending_lock:
            self.pending -= 1

    def generate(self, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> GenerationResult:
        return self.submit(prompt, params, adapter).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(jobs) < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
            self.largest_batch = max(self.largest_batch, len(jobs))
            with self.weights_lock, self.update_lock.serving() if self.update_lock else nullcontext():
                for adapter, group in self._group_by_adapter(jobs).items():
                    self._generate_group(adapter, group)

    def _group_by_adapter(self, jobs: list[_Job]) -> dict[str | None, list[_Job]]:
        groups: dict[str | None, list[_Job]] = {}
        newest = next(reversed(self.adapters)) if self.adapters else None
        for job in jobs:
            adapter = job.adapter if job.adapter is not None else newest
            if adapter is not None and adapter not in self.adapters:
                job.future.set_exception(RequestError(f"model {adapter!r} was unloaded", status=404))
                continue
            groups.setdefault(adapter, []).append(job)
        return groups

    def _generate_group(self, adapter: str | None, jobs: list[_Job]) -> None:
        try:
            with self.lora.activate(adapter) as model:
                results = generate_batch(model, self.tokenizer, [j.prompt for j in jobs], [j.params for j in jobs])
        except Exception as exc:  # a failed batch fails its requests, never the engine thread
            if len(jobs) > 1:
                # One bad request must not fail those batched with it: generate each alone, so only the
                # request that fails on its own gets the error.
                log.warning("a batch of %d failed (%s); generating its requests one by one", len(jobs), exc)
                for job in jobs:
                    self._generate_group(adapter, [job])
                return
            log.exception("generation failed")
            jobs[0].future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            self.generated_tokens += sum(len(c.token_ids) for c in result.completions)
            job.future.set_result(result)

    # -- LoRA adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, inplace: bool = False) -> None:
        """Load (or with ``inplace``, replace the weights of) adapter ``name``; it becomes the newest."""
        if not self.enable_lora:
            raise RequestError("LoRA is not enabled on this server; start it with --enable-lora")
        folder = self._adapter_folder(path)
        config_file = folder / "adapter_config.json"
        try:
            config = json.loads(config_file.read_text())
            rank = int(config.get("r", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            raise RequestError(f"{config_file} is not a valid adapter config: {exc}") from None
        if rank > self.max_lora_rank:
            raise RequestError(f"adapter rank {rank} exceeds --max-lora-rank {self.max_lora_rank}")
        if name in self.adapters and not inplace:
            raise RequestError(f"adapter {name!r} is already loaded; unload it or pass load_inplace=true")
        with self.weights_lock:
            try:
                self.lora.load(name, folder, config)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise RequestError(f"cannot load adapter {name!r} from {folder}: {exc}") from None
            self.weights_version += 1

    def _adapter_folder(self, path: str) -> Path:
        """``path`` resolved, if it is a local adapter folder (config and weights) inside --lora-root.

        Local only: PEFT would look a missing file up on the hub. One message for every refusal, so a
        caller learns nothing about which folders exist outside the adapters.
        """
        folder = Path(path).expanduser().resolve()
        inside = self.lora_root is None or folder.is_relative_to(self.lora_root)
        weights = any((folder / name).is_file() for name in ADAPTER_WEIGHT_FILES)
        if not inside or not (folder / "adapter_config.json").is_file() or not weights:
            where = f" inside --lora-root {str(self.lora_root)!r}" if self.lora_root is not None else ""
            raise RequestError(f"lora_path {path!r} is not a local LoRA adapter folder{where} (it needs "
                               f"adapter_config.json and {' or '.join(ADAPTER_WEIGHT_FILES)})")
        return folder

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise RequestError(f"adapter {name!r} is not loaded", status=404)
        with self.weights_lock:
            self.lora.unload(name)
            self.weights_version += 1

    # -- weights ----------------------------------------------------------------------------------------------
    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The base model's parameters by the names a trainer's transformers model uses."""
        return self.lora.base_parameters()
