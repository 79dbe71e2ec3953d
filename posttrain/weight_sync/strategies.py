"""Weight sync, trainer side: after each optimizer step the inference server must serve the new policy.

One interface, four strategies, chosen by ``--weight-bridge-mode`` (the Atropos trainer's names):

- ``none``: save a full checkpoint every ``restart_interval`` steps and restart the server on it; the trainer
  starts and owns the server (``server_command``). Clients retry while it is away.
- ``lora_only``: save the PEFT adapter and hot-load it (``/v1/load_lora_adapter``), a new name per version
  (the previous one is unloaded) or in place; requests for the base model name and ``/generate`` serve it.
  A name the server already held when the trainer attached (an earlier run of the job, killed after it
  synced that step) is reloaded in place, with a warning.
- ``shared_vllm``: one copy of the weights; the trainer's parameters are rebound onto the server's shared
  buffer, generation is paused around ``optimizer.step()``, nothing is copied.
- ``broadcast``: torch.distributed (gloo) from the trainer to the server, for separate machines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.inference.process import API_KEY_VARIABLE, InferenceServerProcess
from posttrain.spec import WeightBridgeMode

WEIGHT_BRIDGE_MODES: tuple[str, ...] = WeightBridgeMode.__args__  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


class WeightSyncError(PosttrainError):
    """The inference server refused or failed a weight update."""


@dataclass
class SyncConfig:
    mode: WeightBridgeMode
    server_url: str = "http://127.0.0.1:9001"
    save_dir: Path = Path("runs/rl")  # where checkpoints/adapters for the server are written
    restart_interval: int = 1  # none: restart the server every N steps
    server_command: list[str] | None = None  # none: how the trainer starts (and restarts) its own server
    lora_inplace: bool = False  # lora_only: reload one adapter name in place instead of a new name per step
    lora_name: str = "policy"  # lora_only: adapter names are f"{lora_name}-step-{step}" (or just lora_name)
    broadcast_host: str = "127.0.0.1"  # broadcast: the address the server reaches the trainer at
    broadcast_port: int = 0  # broadcast: 0 = a free port
    timeout_s: float = 600.0
    server_log: Path | None = None  # none: the server's output
    # shared_vllm: the only folder whose posttrain-*-weights-* files the trainer maps (the server's
    # --shared-weights-dir); the layout the server publishes is not trusted to point anywhere else.
    shared_weights_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("POSTTRAIN_SHARED_WEIGHTS_DIR", "/dev/shm")))
    # The inference server's --api-key, sent as Authorization: Bearer (`rl run` sets the variable for all parts).
    api_key: str | None = field(default_factory=lambda: os.environ.get(API_KEY_VARIABLE) or None)
    extra: dict[str, Any] = field(default_factory=dict)


class WeightSync(ABC):
    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.url = config.server_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=config.timeout_s, headers=headers)

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Once, after the model (and LoRA) exist and before the optimizer does; returns the model to train."""
        return model

    def before_update(self) -> None:  # noqa: B027 - an optional hook: only shared_vllm needs it
        """Just before ``optimizer.step()``."""

    @abstractmethod
    def after_update(self, model: torch.nn.Module, step: int) -> float:
        """After ``optimizer.step()``: make the server serve the new weights; returns the seconds spent."""

    def close(self) -> None:
        self.client.close()

    def _post(self, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.post(path, **kwargs)
        except httpx.HTTPError as exc:
            raise WeightSyncError(f"inference server at {self.url} unreachable ({path}): {exc}") from None
        if response.status_code >= 400:
            raise WeightSyncError(f"inference server refused {path} ({response.status_code}): {response.text}")
        return response

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = self.client.get(path)
        except httpx.HTTPError as exc:
            raise WeightSyncError(f"inference server at {self.url} unreachable ({path}): {exc}") from None
        if response.status_code >= 400:
            raise WeightSyncError(f"inference server refused {path} ({response.status_code}): {response.text}")
        return response.json()


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


class RestartSync(WeightSync):
    """``none``: full checkpoint + server restart every ``restart_interval`` steps."""

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        if not config.server_command:
            raise ConfigError("weight bridge mode 'none' restarts the inference server, so it needs the command "
                              "that starts it (server_command)")
        if config.restart_interval < 1:
            raise ConfigError(f"restart_interval must be >= 1, got {config.restart_interval}")
        self.server = InferenceServerProcess(config.server_command, self.url, log_path=config.server_log)
        self.served: Path | None = None

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        if _is_peft(model):
            raise ConfigError("weight bridge mode 'none' serves full checkpoints; train without LoRA or use "
                              "lora_only")
        self.server.start()
        return model

    def after_update(self, model: torch.nn.Module, step: int) -> float:
        if step % self.config.restart_interval:
            return 0.0
        started = time.perf_counter()
        target = Path(self.config.save_dir) / "server-weights" / f"step-{step}"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)
        self.server.restart(str(target))
        if self.served is not None and self.served != target:
            shutil.rmtree(self.served, ignore_errors=True)
        self.served = target
        return time.perf_counter() - started

    def close(self) -> None:
        self.server.stop()
        super().close()


class LoraSync(WeightSync):
    """``lora_only``: save the adapter, hot-load it, unload the previous version."""

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        self.current: tuple[str, Path] | None = None
        self._saved_tensors: dict[str, torch.Tensor] | None = None  # adapter file key -> live parameter
        self.found_loaded: set[str] = set()  # adapters the server held before this trainer loaded any

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        if not _is_peft(model):
            raise ConfigError("weight bridge mode 'lora_only' trains a LoRA adapter; enable LoRA (peft) for the "
                              "trainer's model")
        # A run killed after a sync left its adapter loaded, and the resumed run reaches that step's name
        # again; the server (vLLM too) refuses to load a name it holds, so such names are reloaded in place.
        # /v1/models lists each adapter with the base model as its parent, in vLLM as here.
        self.found_loaded = {m["id"] for m in self._get("/v1/models").get("data", []) if m.get("parent")}
        return model

    def after_update(self, model: torch.nn.Module, step: int) -> float:
        started = time.perf_counter()
        inplace = self.config.lora_inplace
        name = self.config.lora_name if inplace else f"{self.config.lora_name}-step-{step}"
        folder = Path(self.config.save_dir).resolve() / "adapters" / name
        if inplace:
            # Write beside, then swap in, so the server never reads a half-written adapter.
            folder = folder.with_name(f"{name}-{step}")
        self._save_adapter(model, folder)
        replacing = name in self.found_loaded
        if replacing:
            self.found_loaded.discard(name)
            log.warning("adapter %r was already loaded on the inference server at %s (left by an earlier run, "
                        "e.g. one killed after it synced this step): reloading it in place with step %d's weights",
                        name, self.url, step)
        self._post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder),
                                                  "load_inplace": inplace or replacing})
        previous, self.current = self.current, (name, folder)
        if previous is not None:
            if previous[0] != name:
                self._post("/v1/unload_lora_adapter", json={"lora_name": previous[0]})
            if previous[1] != folder:
                shutil.rmtree(previous[1], ignore_errors=True)
        return time.perf_counter() - started

    def _save_adapter(self, model: Any, folder: Path) -> None:
        """What ``save_pretrained`` writes minus the model card (half its time): config + safetensors.

        PEFT's own ``get_peft_model_state_dict`` names the tensors once; later saves reuse those names.
        """
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self._saved_tensors is None:
            state = get_peft_model_state_dict(model)
            live = {p.data_ptr(): p for p in model.parameters()}
            if not all(t.data_ptr() in live for t in state.values()):
                model.save_pretrained(folder)  # tensors PEFT builds on the fly: let it do the whole save
                return
            self._saved_tensors = {key: live[t.data_ptr()] for key, t in state.items()}
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            tensors = {key: p.detach().contiguous() for key, p in self._saved_tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config[model.active_adapter].save_pretrained(str(folder))


class SharedMemorySync(WeightSync):
    """``shared_vllm``: train on the server's own buffer; hold generation around the optimizer step.

    The hold is the server's UpdateLock (flock, no HTTP) when its files are reachable, else the HTTP
    /weights/pause and /weights/resume routes.
    """

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        self.buffer: torch.Tensor | None = None
        self.lock: Any = None
        self._held_since: float | None = None
        self._pause_seconds = 0.0

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        from posttrain.inference.shared_weights import SharedLayout, attach_model_weights, open_update_lock

        info = self._get("/weights/info")
        if not isinstance(info.get("shared"), dict):
            raise WeightSyncError(f"the inference server at {self.url} does not share its weights; start it with "
                                  "`posttrain rl serve-inference --shared-weights`")
        # Network data: map only files in our own shared-weights directory (see shared_weights.trusted_path).
        layout = SharedLayout.from_json(info["shared"])
        self.buffer = attach_model_weights(model, layout, self.config.shared_weights_dir)
        self.lock = open_update_lock(layout, self.config.shared_weights_dir)
        return model

    def before_update(self) -> None:
        started = time.perf_counter()
        if self.lock is not None:
            self.lock.acquire_update()
        else:
            self._post("/weights/pause", json={"timeout_s": self.config.timeout_s})
        self._held_since = time.perf_counter()
        self._pause_seconds = self._held_since - started

    def after_update(self, model: torch.nn.Module, step: int) -> float:
        if self._held_since is None:
            raise WeightSyncError("after_update without before_update: generation was never paused")
        if self.buffer is not None and self.buffer.is_cuda:
            torch.cuda.synchronize()  # the server's next kernel must see the finished optimizer step
        started = time.perf_counter()
        self._release()
        # Sync overhead = taking and releasing the hold; the optimizer step between them is training time.
        return self._pause_seconds + time.perf_counter() - started

    def _release(self) -> None:
        self._held_since = None
        if self.lock is not None:
            self.lock.release_update()
        else:
            self._post("/weights/resume")

    def close(self) -> None:
        if self._held_since is not None:
            with contextlib.suppress(WeightSyncError):
                self._release()
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        super().close()


class BroadcastSync(WeightSync):
    """``broadcast``: a gloo group with the server; each update is one request plus one broadcast per tensor."""

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        self.group: Any = None
        self.store: Any = None
        self.order: list[str] = []

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        from posttrain.inference import weight_broadcast

        if _is_peft(model):
            raise ConfigError("weight bridge mode 'broadcast' sends full weights; train without LoRA or use "
                              "lora_only")
        timeout = min(self.config.timeout_s, 120.0)
        self.store = weight_broadcast.master_store(self.config.broadcast_host, self.config.broadcast_port, 2,
                                                   timeout)
        body = {"master_address": self.config.broadcast_host, "master_port": self.store.port, "timeout_s": timeout}
        # The server's init returns once both ranks are in, so joining runs beside it; a refused init (wrong
        # key, bad address) ends the wait at once with the server's message, not after the join's timeout.
        joined: dict[str, Any] = {}
        store = self.store

        def join() -> None:
            try:
                joined["group"], _ = weight_broadcast.join_group(self.config.broadcast_host, store.port, 0, 2,
                                                                 timeout, store=store)
            except Exception as exc:  # reported below, after the server's answer
                joined["error"] = exc

        joining = threading.Thread(target=join, name="weight-group-join", daemon=True)
        joining.start()
        reply = self._call("/weights/broadcast/init", body)
        if "error" in reply:
            self.store = None  # the join gives up at its timeout; nothing else waits on it
            raise WeightSyncError(f"the inference server did not join the weight broadcast: {reply['error']}")
        joining.join(timeout)
        if "group" not in joined:
            raise WeightSyncError(f"joining the weight broadcast group failed: {joined.get('error', 'timed out')}")
        self.group = joined["group"]
        served = {p["name"]: p for p in reply["params"]}
        mine = dict(model.named_parameters())
        missing = sorted(set(served) ^ set(mine))
        if missing:
            raise WeightSyncError(f"the trainer's and the server's parameters differ: {missing[:5]}")
        self.order = [p["name"] for p in reply["params"]]
        return model

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._post(path, json=body).json()
        except WeightSyncError as exc:
            return {"error": exc.message}

    def after_update(self, model: torch.nn.Module, step: int) -> float:
        from posttrain.inference import weight_broadcast

        started = time.perf_counter()
        params = dict(model.named_parameters())
        reply: dict[str, Any] = {}
        request = threading.Thread(target=lambda: reply.update(
            self._call("/weights/broadcast/update", {"version": step})))
        request.start()
        try:
            with torch.no_grad():
                weight_broadcast.broadcast_tensors(self.group, [params[name].detach() for name in self.order])
        finally:
            request.join()
        if "error" in reply:
            raise WeightSyncError(reply["error"])
        return time.perf_counter() - started

    def close(self) -> None:
        if self.group is not None:
            with contextlib.suppress(WeightSyncError):
                self._post("/weights/broadcast/close")
            self.group = self.store = None
        super().close()


def make_weight_sync(config: SyncConfig) -> WeightSync:
    strategies: dict[str, type[WeightSync]] = {"none": RestartSync, "lora_only": LoraSync,
                                              "shared_vllm": SharedMemorySync, "broadcast": BroadcastSync}
    if config.mode not in strategies:
        raise ConfigError(f"unknown weight bridge mode {config.mode!r}; choose one of {', '.join(strategies)}")
    return strategies[config.mode](config)
