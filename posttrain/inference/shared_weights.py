"""One copy of the weights for two processes (``shared_vllm`` mode).

The server packs every parameter into one flat byte buffer and rebinds its parameters onto views of it;
the layout (name, dtype, shape, byte offset of each parameter) is published over HTTP. The trainer maps
the same buffer and rebinds its own parameters onto the same views, so ``optimizer.step()`` writes the
very bytes the server generates from.

- CPU: the buffer is a file in ``/dev/shm`` (RAM-backed) mapped by both processes with ``torch.from_file``.
- CUDA: the buffer is one CUDA tensor shared by an IPC handle (``torch.multiprocessing.reductions``),
  Atropos' ``shared_vllm`` idea; limits: both processes on the same GPU, no tensor parallelism.

The layout arrives over the network, so the trainer trusts none of it: the CUDA handle is plain JSON
fields rebuilt with torch's own function (never unpickled), and a file or lock path is used only if it
resolves inside the shared-weights directory under the server's own naming pattern.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError

log = logging.getLogger(__name__)

ALIGN = 64  # bytes; every view starts aligned for any dtype and for vectorised kernels
DEFAULT_DIRECTORY = "/dev/shm"
# What share_model_weights names its files: posttrain[-TAG]-weights-PID (+ ".bin" / ".intent" / ".lock").
WEIGHTS_NAME = re.compile(r"^posttrain(-[A-Za-z0-9_]+)*-weights-(?P<pid>[0-9]+)(?P<suffix>\.bin|\.intent|\.lock)?$")


@dataclass(frozen=True)
class SharedLayout:
    """Where each parameter lives in the shared buffer: JSON-serialisable, published by the server."""

    kind: str  # "file" | "cuda_ipc"
    total_bytes: int
    params: list[dict[str, Any]]  # {"name", "dtype", "shape", "offset"}
    path: str | None = None  # kind=file
    ipc_handle: dict[str, Any] | None = None  # kind=cuda_ipc: the fields of torch's CUDA IPC handle, as JSON
    lock_path: str | None = None  # the UpdateLock's files are lock_path + ".intent" / ".lock"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_bytes": self.total_bytes, "params": self.params, "path": self.path,
                "ipc_handle": self.ipc_handle, "lock_path": self.lock_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SharedLayout:
        try:
            params = list(data["params"])
            if not all(isinstance(p, dict) for p in params):
                raise TypeError("params must be objects")
            return cls(str(data["kind"]), int(data["total_bytes"]), params, data.get("path"),
                       data.get("ipc_handle"), data.get("lock_path"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the server's shared weights layout is malformed: {exc}") from None

    def files(self) -> list[Path]:
        """The files the server created (removed when it shuts down)."""
        files = [Path(self.path)] if self.path else []
        if self.lock_path:
            files += [Path(self.lock_path + ".intent"), Path(self.lock_path + ".lock")]
        return files


class UpdateLock:
    """Cross-process exclusion between the server's batches and the trainer's optimizer step, with flock.

    No HTTP on the trainer's critical path: an uncontended pause costs two system calls. Two files make it
    fair: the trainer first takes ``intent`` (exclusive), which the server passes through (shared) before
    each batch, so a busy server cannot starve a trainer that is waiting for the batch in flight to end.
    """

    def __init__(self, base: str, create: bool = True) -> None:
        """``create``: the server makes the files; a trainer opens existing ones only (and no symlink)."""
        flags = os.O_RDWR | (os.O_CREAT if create else os.O_NOFOLLOW)
        self._intent = os.open(base + ".intent", flags, 0o600)
        try:
            self._weights = os.open(base + ".lock", flags, 0o600)
        except OSError:
            os.close(self._intent)
            raise

    def begin_serving(self) -> None:
        """Server side, while its batch is not empty: waits while a trainer is updating or waiting to."""
        fcntl.flock(self._intent, fcntl.LOCK_SH)
        fcntl.flock(self._intent, fcntl.LOCK_UN)
        fcntl.flock(self._weights, fcntl.LOCK_EX)

    def end_serving(self) -> None:
        fcntl.flock(self._weights, fcntl.LOCK_UN)

    def update_waiting(self) -> bool:
        """Server side: whether a trainer waits to update (it holds ``intent``); no new request joins then."""
        try:
            fcntl.flock(self._intent, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._intent, fcntl.LOCK_UN)
        return False

    def acquire_update(self) -> None:
        """Trainer side, before optimizer.step(): returns once no batch is being generated."""
        fcntl.flock(self._intent, fcntl.LOCK_EX)
        fcntl.flock(self._weights, fcntl.LOCK_EX)

    def release_update(self) -> None:
        fcntl.flock(self._weights, fcntl.LOCK_UN)
        fcntl.flock(self._intent, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._intent)
        os.close(self._weights)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def sweep_stale_weights(directory: str | Path = DEFAULT_DIRECTORY) -> list[Path]:
    """Remove ``directory``'s posttrain-*-weights-* files whose server (the pid in the name) is dead.

    A server killed with SIGKILL never runs its shutdown, and its file holds a model's worth of RAM; each
    new server and the ``rl run`` supervisor sweep. Files of live processes are never touched.
    """
    removed = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        match = WEIGHTS_NAME.match(path.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # another sweeper was first
        except OSError as exc:  # another user's file: not ours to remove
            log.warning("cannot remove stale shared weights file %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.info("removed %d stale shared weights files from %s", len(removed), root)
    return removed


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_layout(named: list[tuple[str, torch.Tensor]]) -> tuple[list[dict[str, Any]], int]:
    params, offset = [], 0
    for name, tensor in named:
        params.append({"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                       "offset": offset})
        offset += math.ceil(tensor.numel() * tensor.element_size() / ALIGN) * ALIGN
    return params, max(offset, ALIGN)


def _view(buffer: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"])
    numel = math.prod(entry["shape"])
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buffer[entry["offset"]:entry["offset"] + nbytes].view(dtype).view(entry["shape"])


def share_model_weights(model: torch.nn.Module, directory: str | Path = DEFAULT_DIRECTORY,
                        tag: str = "posttrain") -> tuple[SharedLayout, torch.Tensor]:
    """Move ``model``'s parameters onto one shared buffer (server side); returns the layout and the buffer."""
    named = list(model.named_parameters())
    params, total = plan_layout(named)
    device = named[0][1].device
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = str(directory / f"{tag}-weights-{os.getpid()}")
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        layout_kind, path = "cuda_ipc", None
    else:
        path = base + ".bin"
        Path(path).unlink(missing_ok=True)
        buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        layout_kind = "file"
    for (_, param), entry in zip(named, params, strict=True):
        view = _view(buffer, entry)
        view.copy_(param.data)
        param.data = view
    handle = None
    if layout_kind == "cuda_ipc":
        handle = _ipc_fields(reduce_tensor(buffer)[1])
    return SharedLayout(layout_kind, total, params, path, handle, lock_path=base), buffer


def _ipc_fields(args: tuple) -> dict[str, Any]:
    """torch's rebuild_cuda_tensor arguments for a flat uint8 buffer, as JSON (classes left out: fixed)."""
    (_cls, size, _stride, offset, _storage_cls, _dtype, device, handle, size_bytes, offset_bytes, _grad,
     ref_handle, ref_offset, event_handle, event_sync) = args

    def b64(value: bytes | None) -> str | None:
        return None if value is None else base64.b64encode(value).decode()

    return {"numel": int(size[0]), "tensor_offset": int(offset), "device": int(device), "handle": b64(handle),
            "storage_size_bytes": int(size_bytes), "storage_offset_bytes": int(offset_bytes),
            "ref_counter_handle": b64(ref_handle), "ref_counter_offset": int(ref_offset),
            "event_handle": b64(event_handle), "event_sync_required": bool(event_sync)}


def _rebuild_ipc(fields: Any, total_bytes: int) -> torch.Tensor:
    """The server's CUDA buffer from validated JSON fields: ints, base64 bytes and a bool, nothing callable."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not isinstance(fields, dict):
        raise ModelError("the server's CUDA IPC handle is not an object")

    def integer(key: str) -> int:
        value = fields.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelError(f"the server's CUDA IPC handle: {key} must be a non-negative integer")
        return value

    def raw(key: str, optional: bool = False) -> bytes | None:
        value = fields.get(key)
        if value is None and optional:
            return None
        try:
            return base64.b64decode(value, validate=True)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ModelError(f"the server's CUDA IPC handle: {key} must be base64 bytes") from None

    if integer("numel") != total_bytes:
        raise ModelError(f"the server's CUDA IPC handle covers {fields['numel']} bytes, the layout {total_bytes}")
    if not isinstance(fields.get("event_sync_required"), bool):
        raise ModelError("the server's CUDA IPC handle: event_sync_required must be a boolean")
    return rebuild_cuda_tensor(
        torch.Tensor, (total_bytes,), (1,), integer("tensor_offset"), torch.storage.TypedStorage, torch.uint8,
        integer("device"), raw("handle"), integer("storage_size_bytes"), integer("storage_offset_bytes"), False,
        raw("ref_counter_handle"), integer("ref_counter_offset"), raw("event_handle", optional=True),
        fields["event_sync_required"])


def trusted_path(given: str | None, directory: str | Path, suffixes: tuple[str, ...]) -> Path:
    """``given`` resolved, if it is directly inside ``directory`` (resolved too) and named as the server
    names its files; anything else (another folder, ``..``, a symlink out, another name) is refused."""
    if not given:
        raise ModelError("the server's shared weights layout names no file")
    root = Path(directory).resolve()
    resolved = Path(given).resolve()
    match = WEIGHTS_NAME.match(resolved.name)
    if resolved.parent != root or match is None or (match["suffix"] or "") not in suffixes:
        raise ModelError(f"refusing shared weights path {given!r}: it must be a posttrain-*-weights-* file "
                         f"directly in the shared weights directory {str(root)!r} (set by --shared-weights-dir "
                         "on the server, POSTTRAIN_SHARED_WEIGHTS_DIR for the trainer)")
    return resolved


def open_update_lock(layout: SharedLayout, directory: str | Path) -> UpdateLock | None:
    """The server's UpdateLock (trainer side) when its files exist at a trusted path, else None (use HTTP)."""
    if not layout.lock_path:
        return None
    base = trusted_path(layout.lock_path, directory, ("",))
    if not (base.with_name(base.name + ".intent").is_file() and base.with_name(base.name + ".lock").is_file()):
        return None
    return UpdateLock(str(base), create=False)


def map_shared_buffer(layout: SharedLayout, directory: str | Path = DEFAULT_DIRECTORY) -> torch.Tensor:
    """Open the server's buffer in this process (trainer side); ``directory``: where its files may be."""
    if layout.kind == "file":
        path = trusted_path(layout.path, directory, (".bin",))
        if not path.is_file():
            raise ModelError(f"shared weights file {layout.path!r} is not on this machine: shared_vllm needs the "
                             "trainer and the inference server on the same host (use broadcast across hosts)")
        if path.stat().st_size != layout.total_bytes:
            raise ModelError(f"shared weights file {str(path)!r} has {path.stat().st_size} bytes, the layout says "
                             f"{layout.total_bytes}")
        return torch.from_file(str(path), shared=True, size=layout.total_bytes, dtype=torch.uint8)
    if layout.kind == "cuda_ipc":
        return _rebuild_ipc(layout.ipc_handle, layout.total_bytes)
    raise ModelError(f"unknown shared weights kind {layout.kind!r}")


def attach_model_weights(model: torch.nn.Module, layout: SharedLayout,
                         directory: str | Path = DEFAULT_DIRECTORY) -> torch.Tensor:
    """Rebind ``model``'s parameters onto the server's buffer; returns the buffer (keep it alive).

    Every trainer parameter must exist in the server's layout with the same dtype and shape: otherwise the
    two processes would not be training and serving the same model.
    """
    entries = {entry["name"]: entry for entry in layout.params}
    named = list(model.named_parameters())
    problems = []
    for name, param in named:
        entry = entries.get(name)
        if entry is None:
            problems.append(f"{name}: not served")
        elif entry["dtype"] != dtype_name(param.dtype) or list(param.shape) != entry["shape"]:
            problems.append(f"{name}: trainer {dtype_name(param.dtype)}{list(param.shape)} vs server "
                            f"{entry['dtype']}{entry['shape']}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelError("the trainer's model does not match the served weights: " + "; ".join(problems[:5]) + more
                         + ". shared_vllm trains the full model in the server's dtype (no LoRA).")
    for name, param in named:  # dtype and shape match the trainer's (checked above); the offset is the server's
        offset = entries[name].get("offset")
        if not isinstance(offset, int) or offset < 0 or offset + param.numel() * param.element_size() > \
                layout.total_bytes:
            raise ModelError(f"the served layout puts {name!r} outside the shared buffer (offset {offset!r})")
    buffer = map_shared_buffer(layout, directory)
    if buffer.device != named[0][1].device:
        raise ModelError(f"the shared weights are on {buffer.device}, the trainer's model on {named[0][1].device}")
    for name, param in named:
        param.data = _view(buffer, entries[name])
    return buffer
