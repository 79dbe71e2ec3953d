"""The models a serving worker keeps loaded, within a memory budget.

One engine per base model, loaded on its first request and shared by every LoRA adapter trained from it
(each adapter loaded over it on first use, between two decode steps, so requests for different adapters
share its batches); one engine per full fine-tune. Everything counts against one budget of bytes (the
weights; the KV cache of running requests comes on top). When a new model or adapter does not fit, the
least recently used adapters and engines that no request is using are unloaded first.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import ModelError
from posttrain.inference.engine import InferenceEngine
from posttrain.inference.model_source import ADAPTER_CONFIG, ModelSource
from posttrain.inference.openai_protocol import RequestError
from posttrain.modeling import (
    cpu_has_bf16_matmul,
    ensure_chat_template,
    resolve_device,
    resolve_model_path,
    torch_dtype,
)

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MAX_LORA_RANK = 256  # adapters trained here are far smaller; the bound only stops a nonsensical file


@dataclass
class PoolOptions:
    memory_bytes: int = 8 * 1024**3
    device: str = "auto"
    dtype: str = "auto"  # see serving_dtype
    max_batch_size: int = 64
    max_model_len: int | None = None


@dataclass(eq=False)
class _Model:
    key: str  # the resolved weights folder
    engine: InferenceEngine
    nbytes: int
    used: float


def weight_bytes(folder: Path) -> int:
    """What a model folder's weight files hold (a close estimate of its size in memory at the same dtype)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()) \
        if folder.is_dir() else 0


def serving_dtype(requested: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU and on a CPU that multiplies it natively (many streams at once run
    several times faster than in float32; one stream alone about as fast), float32 elsewhere."""
    if requested != "auto":
        return torch_dtype(requested)
    return torch.bfloat16 if device == "cuda" or (device == "cpu" and cpu_has_bf16_matmul()) else torch.float32


def load_model(source: ModelSource, device: str, dtype: torch.dtype):
    """(model, tokenizer) for ``source.base`` served whole, ready to generate (KV cache on, a pad token, a chat
    template). A base that is itself an adapter folder (a pipeline stage trained on the previous stage's
    adapter) is merged into its own base first. The one loader of both servers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.model_cache import quiet_library_warnings, quiet_transformers_bars

    quiet_library_warnings()
    path = resolve_model_path(source.base)
    try:
        with quiet_transformers_bars():
            if (Path(path) / ADAPTER_CONFIG).is_file():
                from peft import AutoPeftModelForCausalLM

                model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(source.tokenizer) if source.tokenizer else path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {source.base!r} for serving: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


class ModelPool:
    def __init__(self, options: PoolOptions) -> None:
        self.options = options
        self._models: OrderedDict[str, _Model] = OrderedDict()  # least recently used first
        self._adapters: OrderedDict[tuple[str, str], int] = OrderedDict()  # (model key, folder) -> bytes
        self._lock = threading.Lock()
        self.loads = 0  # models and adapters loaded so far (the first-load count a benchmark reports)

    @property
    def used_bytes(self) -> int:
        return sum(m.nbytes for m in self._models.values()) + sum(self._adapters.values())

    def resolve(self, source: ModelSource) -> tuple[InferenceEngine, str | None]:
        """The engine serving ``source`` and the adapter name to ask it for, loading them if needed."""
        with self._lock:
            model = self._model(source)
            adapter = None
            if source.adapter is not None:
                adapter = str(Path(source.adapter).resolve())
                self._adapter(model, adapter)
            model.used = time.monotonic()
            self._models.move_to_end(model.key)
        return model.engine, adapter

    def loaded(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"model": m.key, "bytes": m.nbytes, "adapters": [a for (k, a) in self._adapters if k == m.key],
                     "running": m.engine.running, "pending": m.engine.pending} for m in self._models.values()]

    def evict(self, source: ModelSource) -> bool:
        """Unload what serves ``source`` (its adapter, or a whole model) when no request uses it."""
        with self._lock:
            key = str(Path(resolve_model_path(source.base)).resolve())
            model = self._models.get(key)
            if model is None:
                return False
            if source.adapter is not None:
                return self._evict_adapter((key, str(Path(source.adapter).resolve())))
            return self._evict_model(model)

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                model.engine.close()
            self._models.clear()
            self._adapters.clear()

    # -- under the lock ---------------------------------------------------------------------------------------
    def _model(self, source: ModelSource) -> _Model:
        path = Path(resolve_model_path(source.base))
        key = str(path.resolve())
        if key in self._models:
            return self._models[key]
        self._make_room(weight_bytes(path), f"model {source.base!r}")
        started = time.perf_counter()
        device = resolve_device(self.options.device)
        model, tokenizer = load_model(source, device, serving_dtype(self.options.dtype, device))
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        engine = InferenceEngine(model, tokenizer, source.base, max_batch_size=self.options.max_batch_size,
                                 max_model_len=self.options.max_model_len, enable_lora=True,
                                 max_lora_rank=MAX_LORA_RANK, newest_adapter_by_default=False)
        loaded = _Model(key, engine, nbytes, time.monotonic())
        self._models[key] = loaded
        self.loads += 1
        log.info("loaded %s (%.0f MiB) in %.1f s", source.base, nbytes / 2**20, time.perf_counter() - started)
        return loaded

    def _adapter(self, model: _Model, folder: str) -> None:
        entry = (model.key, folder)
        if entry in self._adapters:
            self._adapters.move_to_end(entry)
            return
        self._make_room(weight_bytes(Path(folder)), f"adapter {folder}", keep=model)
        started = time.perf_counter()
        model.engine.add_adapter(folder, folder)
        self._adapters[entry] = model.engine.lora.nbytes(folder)
        self.loads += 1
        log.info("loaded adapter %s over %s in %.2f s", folder, model.key, time.perf_counter() - started)

    def _make_room(self, needed: int, what: str, keep: _Model | None = None) -> None:
        budget = self.options.memory_bytes
        if needed > budget:
            raise RequestError(f"{what} needs {needed / 2**20:.0f} MiB, more than the inference memory budget "
                               f"({budget / 2**20:.0f} MiB; posttrain serve --inference-memory-mb)", status=503)
        while self.used_bytes + needed > budget:
            if not self._evict_one(keep):
                raise RequestError(f"no room for {what}: the inference memory budget ({budget / 2**20:.0f} MiB) is "
                                   "taken by models that are generating; try again shortly", status=503)

    def _evict_one(self, keep: _Model | None) -> bool:
        """Unload the least recently used adapter or model that no request is using."""
        for entry in list(self._adapters):
            if self._evict_adapter(entry):
                return True
        return any(model is not keep and self._evict_model(model) for model in list(self._models.values()))

    def _evict_adapter(self, entry: tuple[str, str]) -> bool:
        model = self._models.get(entry[0])
        if model is None or not model.engine.evict_adapter(entry[1]):
            return False
        del self._adapters[entry]
        log.info("unloaded adapter %s", entry[1])
        return True

    def _evict_model(self, model: _Model) -> bool:
        if model.engine.busy:
            return False
        model.engine.close()
        del self._models[model.key]
        for entry in [e for e in self._adapters if e[0] == model.key]:
            del self._adapters[entry]
        gc.collect()
        log.info("unloaded %s", model.key)
        return True
