"""The inference engine: one model, one thread that schedules at every decode step, LoRA adapters per row.

Continuous batching, as in vLLM: the engine thread keeps one running :class:`DecodeBatch`. Between two
decode steps it takes in the requests that arrived (prefilling them and sampling their first token) and
lets finished ones go, so a request's first token waits for at most one step and its prefill, never for
another request to end. Each request names its LoRA adapter; rows of different adapters share every
forward (PEFT's per-row ``adapter_names``), never one batch per adapter.

Everything that changes weights in use (a trainer's broadcast, a pause for its optimizer step in
shared-memory mode, replacing an adapter in place) holds ``weights_lock``, which the engine thread holds
while its batch is not empty. A waiting update stops new requests from joining, the running ones finish,
and then the update goes: no sample mixes two policies. Loading a *new* adapter changes nothing in use,
so the serving pool does it between two steps (:meth:`InferenceEngine.call_between_steps`) without
draining the batch.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.inference import row_lora
from posttrain.inference.adapters import AdapterSlots
from posttrain.inference.generation import (
    DecodeBatch,
    GenerationResult,
    SamplingParams,
    Sequence,
    new_sequences,
)
from posttrain.inference.openai_protocol import RequestError
from posttrain.inference.shared_weights import UpdateLock
from posttrain.inference.weights_lock import WeightsLock

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT saves and loads
MAX_PREFILL_TOKENS = 4096  # prompt tokens prefilled between two decode steps (bounds the stall of the others)

log = logging.getLogger(__name__)
__all__ = ["InferenceEngine", "RequestError", "RequestFuture", "TokenEvent"]


@dataclass
class TokenEvent:
    """What one decode step added to one completion of a request (for streams)."""

    index: int  # which of the request's n completions
    token_id: int
    logprobs: dict[int, float] | None
    text: str  # new text safe to show (held back while it may start a stop string)
    finish_reason: str | None


Listener = Callable[[list[TokenEvent]], None]


class RequestFuture(Future):
    """A request's future: resolves to its GenerationResult; :meth:`cancel` also stops it mid-generation."""

    def __init__(self) -> None:
        super().__init__()
        self.sequences: list[Sequence] = []

    def cancel(self) -> bool:
        """Stop the request: at once if it is still waiting; if it is generating, its rows leave the batch
        at the next step and the future ends with CancelledError. False once it has finished."""
        for sequence in self.sequences:
            sequence.cancelled = True
        return super().cancel() or not self.done()


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    future: RequestFuture
    listener: Listener | None = None
    sequences: list[Sequence] = field(default_factory=list)
    done: int = 0  # completions finished


@dataclass(eq=False)
class _Call:
    """Work for the engine thread between two steps (a new adapter, an eviction)."""

    function: Callable[[], Any]
    future: Future


class InferenceEngine:
    """``newest_adapter_by_default``: a request without an adapter runs with the newest one loaded (the
    online-RL server, where the trainer's latest adapter is the policy); off, it runs on the base model."""

    def __init__(self, model, tokenizer, model_name: str, *, max_batch_size: int = 64, batch_wait_s: float = 0.005,
                 max_model_len: int | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                 update_lock: UpdateLock | None = None, lora_root: str | Path | None = None,
                 newest_adapter_by_default: bool = True, max_prefill_tokens: int = MAX_PREFILL_TOKENS) -> None:
        self.base_model = model.eval()
        self.lora = AdapterSlots(self.base_model)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.newest_adapter_by_default = newest_adapter_by_default
        self.max_prefill_tokens = max_prefill_tokens
        # Adapters load only from local folders inside this one (None: any local folder; see inference_launch).
        self.lora_root = Path(lora_root).resolve() if lora_root is not None else None
        self.weights_lock = WeightsLock()
        self.update_lock = update_lock  # shared_vllm: the trainer's optimizer step, across processes
        self.weights_version = 0
        self.generated_tokens = 0
        self.largest_batch = 0  # most requests taken into the batch together so far
        self.running = 0  # completions in the running batch
        self.pending = 0  # requests submitted and not answered yet
        self.last_used = time.monotonic()
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[_Request | _Call | None] = queue.Queue()
        self._waiting: list[_Request] = []
        self._batch = DecodeBatch(self.lora.model, tokenizer)
        self._most_adapters = 0  # of batches dropped after a failed step
        self._row_lora: row_lora.RowLora | None = None
        self._lora_version = 0  # the adapters' version the batch generates with
        self._thread = threading.Thread(target=self._run, name=f"inference-engine {model_name}", daemon=True)
        self._thread.start()

    @property
    def adapters(self) -> OrderedDict[str, str]:
        """Loaded adapters, name -> folder, oldest first (the newest serves unnamed requests)."""
        return self.lora.loaded

    @property
    def most_adapters_together(self) -> int:
        """Most different adapters (the base model counted as one) that shared one decode step so far."""
        return max(self._most_adapters, self._batch.most_adapters)

    @property
    def busy(self) -> bool:
        return self.pending > 0

    # -- generation -------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, adapter: str | None = None,
               listener: Listener | None = None) -> RequestFuture:
        """Queue one prompt; the future resolves to a GenerationResult. ``listener`` (called from the engine
        thread) gets each step's new tokens and text. ``adapter`` None: see ``newest_adapter_by_default``."""
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.base_model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                               f"requested {len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, "
                               f"{params.max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens" if len(prompt) < self.max_model_len else "messages",
                               code="context_length_exceeded")
        if adapter is not None and adapter not in self.adapters:
            raise RequestError(f"model {adapter!r} does not exist", status=404, param="model", code="model_not_found")
        future = RequestFuture()
        with self._pending_lock:
            self.pending += 1
            self.last_used = time.monotonic()
        future.add_done_callback(self._answered)
        self._queue.put(_Request(prompt, params, adapter, future, listener))
        return future

    def _answered(self, _future: Future) -> None:
        with self._pending_lock:
            self.pending -= 1
            self.last_used = time.monotonic()

    def generate(self, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> GenerationResult:
        return self.submit(prompt, params, adapter).result()

    def call_between_steps(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the engine thread between two decode steps; returns its result (or raises)."""
        if threading.current_thread() is self._thread:
            return function()
        future: Future = Future()
        self._queue.put(_Call(function, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        holding = False
        while True:
            if not self._batch.sequences and not self._waiting:
                item = self._queue.get()
                if not self._handle(item):
                    return
                deadline = time.monotonic() + self.batch_wait_s  # let requests sent together start together
                while True:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if not self._handle(item):
                        return
            while True:  # whatever else arrived, without waiting
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(item):
                    return
            if not self._waiting and not self._batch.sequences:
                continue
            if not holding:
                while self._update_waiting():  # let a weight update go first (the lock is not fair)
                    time.sleep(0.001)
                self._acquire()
                holding = True
            self._follow_adapters()
            self._admit()
            self._step()
            if holding and not self._batch.sequences:
                self._release()  # an update waiting for the batch to drain goes now
                holding = False

    def _handle(self, item: _Request | _Call | None) -> bool:
        if item is None:
            self._fail_all(RequestError("the inference engine stopped", status=503))
            return False
        if isinstance(item, _Call):
            try:
                item.future.set_result(item.function())
            except BaseException as exc:  # handed to the caller, never the end of the engine thread
                item.future.set_exception(exc)
            return True
        self._waiting.append(item)
        return True

    def _acquire(self) -> None:
        self.weights_lock.acquire_for_generation()
        if self.update_lock is not None:
            self.update_lock.begin_serving()

    def _release(self) -> None:
        if self.update_lock is not None:
            self.update_lock.end_serving()
        self.weights_lock.release_for_generation()

    def _follow_adapters(self) -> None:
        """After adapters were loaded, replaced or unloaded: generate with the model as it is now (a PEFT
        model once the first adapter came), its adapters per row through RowLora where it can."""
        if self.lora.version == self._lora_version:
            return
        batch = self._batch
        batch.model = self.lora.model
        batch.mixed_adapters = self.lora.model is not self.base_model
        if batch.mixed_adapters and row_lora.supports(self.lora.model):
            if self._row_lora is None:
                self._row_lora = row_lora.RowLora(self.lora.model)
            self._row_lora.rebuild(sorted(set(self.lora.slot_of.values())), self.lora.version)
        elif self._row_lora is not None:  # an adapter RowLora cannot apply: PEFT's own path for all
            self._row_lora.close()
            self._row_lora = None
            for layer in row_lora.lora_layers(self.lora.model):
                layer.enable_adapters(True)
        batch.row_lora = self._row_lora
        self._lora_version = self.lora.version

    def _update_waiting(self) -> bool:
        return self.weights_lock.update_waiting or (self.update_lock is not None and self.update_lock.update_waiting())

    def _admit(self) -> None:
        """Take waiting requests into the batch, within its size, the prefill budget and no update waiting."""
        if not self._waiting or self._update_waiting():
            return
        room = self.max_batch_size - len(self._batch.sequences)
        taken: list[_Request] = []
        tokens = 0
        for request in list(self._waiting):
            if request.future.cancelled():
                self._waiting.remove(request)
                continue
            if taken and (request.params.n > room or tokens + len(request.prompt) > self.max_prefill_tokens):
                break
            if request.params.n > room and self._batch.sequences:
                break
            self._waiting.remove(request)
            taken.append(request)
            room -= request.params.n
            tokens += len(request.prompt)
        if not taken:
            return
        self.largest_batch = max(self.largest_batch, len(taken) + len({s.owner for s in self._batch.sequences}))
        groups = []
        for request in taken:
            try:
                groups.append(self._sequences(request))
            except Exception as exc:  # this request's own fault (a seed torch refuses, an adapter gone)
                self._fail(request, exc)
        if groups:
            self._prefill(groups)

    def _sequences(self, request: _Request) -> list[Sequence]:
        adapter = request.adapter
        if adapter is None and self.newest_adapter_by_default and self.adapters:
            adapter = next(reversed(self.adapters))
        if adapter is not None and adapter not in self.adapters:
            raise RequestError(f"model {adapter!r} was unloaded", status=404, param="model", code="model_not_found")
        slot = self.lora.slot_of[adapter] if adapter is not None else None
        sequences = new_sequences(self.tokenizer, request.prompt, request.params, self._batch.device, slot, request)
        request.sequences = sequences
        request.future.sequences = sequences
        if not request.future.set_running_or_notify_cancel():
            raise RequestError("cancelled", status=499)
        return sequences

    def _prefill(self, groups: list[list[Sequence]]) -> None:
        try:
            self._batch.add(groups)
        except Exception as exc:
            if len(groups) > 1:
                # One bad request must not fail those taken in with it: each alone, so only the one that
                # fails on its own gets the error.
                log.warning("a prefill of %d requests failed (%s); retrying them one by one", len(groups), exc)
                for group in groups:
                    self._prefill([group])
                return
            log.exception("prefill failed")
            self._fail(groups[0][0].owner, exc)
            return
        self._deliver([s for group in groups for s in group])

    def _step(self) -> None:
        if not self._batch.sequences:
            return
        cancelled = {s.owner for s in self._batch.sequences if s.cancelled}
        try:
            stepped = self._batch.step()
        except Exception as exc:
            log.exception("a decode step failed; failing the %d requests in the batch", len(self._batch.sequences))
            owners = {s.owner for s in self._batch.sequences}
            self._most_adapters = max(self._most_adapters, self._batch.most_adapters)
            self._batch = DecodeBatch(self.lora.model, self.tokenizer)
            self._lora_version = -1
            for request in owners:
                self._fail(request, exc)
            return
        for request in cancelled:
            self._fail(request, CancelledError())
        self._deliver(stepped)

    def _deliver(self, sequences: list[Sequence]) -> None:
        """Hand each request its new tokens (listener) and, once all its completions are done, its result."""
        self.running = len(self._batch.sequences)
        events: dict[_Request, list[TokenEvent]] = {}
        for sequence in sequences:
            request: _Request = sequence.owner
            if sequence.cancelled:
                continue
            self.generated_tokens += 1
            logprobs = sequence.logprobs[-1] if sequence.params.logprobs is not None else None
            text = sequence.text.stream_delta(sequence.finished) if request.listener is not None else ""
            events.setdefault(request, []).append(TokenEvent(sequence.index, sequence.tokens[-1], logprobs, text,
                                                             sequence.finish_reason))
            if sequence.finished:
                request.done += 1
        for request, request_events in events.items():
            if request.listener is not None:
                try:
                    request.listener(request_events)
                except Exception:  # a listener's bug must not stop the engine
                    log.exception("a stream listener failed")
            if request.done == len(request.sequences) and not request.future.done():
                request.future.set_result(GenerationResult(
                    request.prompt, [s.completion() for s in request.sequences],
                    request.sequences[0].prompt_logprobs if request.params.prompt_logprobs is not None else None))

    def _fail(self, request: _Request, exc: BaseException) -> None:
        for sequence in request.sequences:
            sequence.cancelled = True
        if not request.future.done():
            request.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request in self._waiting:
            self._fail(request, exc)
        for request in {s.owner for s in self._batch.sequences}:
            self._fail(request, exc)
        self._waiting.clear()

    # -- LoRA adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, inplace: bool = False) -> None:
        """Load (or with ``inplace``, replace the weights of) adapter ``name``; it becomes the newest.
        Generation is drained first (the weights lock): a replaced adapter never changes mid-sample."""
        folder, config = self.check_adapter(name, path, inplace)
        with self.weights_lock:
            self._load(name, folder, config)
            self.weights_version += 1

    def add_adapter(self, name: str, path: str) -> None:
        """Load a new adapter between two decode steps, without draining the batch (nothing running uses it)."""
        folder, config = self.check_adapter(name, path, inplace=False)
        self.call_between_steps(lambda: self._load(name, folder, config))

    def check_adapter(self, name: str, path: str, inplace: bool) -> tuple[Path, dict[str, Any]]:
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
        return folder, config

    def _load(self, name: str, folder: Path, config: dict[str, Any]) -> None:
        try:
            self.lora.load(name, folder, config)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise RequestError(f"cannot load adapter {name!r} from {folder}: {exc}") from None

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

    def adapters_in_use(self) -> set[str]:
        """Adapters (public names) of requests waiting or generating; call on the engine thread."""
        slots = {s.adapter for s in self._batch.sequences}
        running = {name for name, slot in self.lora.slot_of.items() if slot in slots}
        return running | {r.adapter for r in self._waiting if r.adapter is not None}

    def evict_adapter(self, name: str) -> bool:
        """Unload ``name`` between two steps if no request uses it; False when one does (or it is not loaded)."""
        def evict() -> bool:
            if name not in self.adapters or name in self.adapters_in_use():
                return False
            self.lora.unload(name)
            return True
        return bool(self.call_between_steps(evict))

    # -- weights ----------------------------------------------------------------------------------------------
    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The base model's parameters by the names a trainer's transformers model uses."""
        return self.lora.base_parameters()
