"""One copy of the weights for two processes (``shared_vllm`` mode).

The server packs every parameter into one flat byte buffer and rebinds its parameters onto views of it;
the layout (name, dtype, shape, byte offset of each parameter) is published over HTTP. The trainer maps
the same buffer and rebinds its own parameters onto the same views, so ``optimizer.step()`` writes the
very bytes the server generates from.

- CPU: the buffer is a file in ``/dev/shm`` (RAM-backed) mapped by both processes with ``torch.from_file``.
- CUDA: the buffer is one CUDA tensor shared by an IPC handle (``torch.multiprocessing.reductions``),
  Atropos' ``shared_vllm`` idea; limits: both processes on the same GPU, no tensor parallelism.
"""

from __future__ import annotations

import base64
import fcntl
import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError

ALIGN = 64  # bytes; every view starts aligned for any dtype and for vectorised kernels


@dataclass(frozen=True)
class SharedLayout:
    """Where each parameter lives in the shared buffer: JSON-serialisable, published by the server."""

    kind: str  # "file" | "cuda_ipc"
    total_bytes: int
    params: list[dict[str, Any]]  # {"name", "dtype", "shape", "offset"}
    path: str | None = None  # kind=file
    ipc_handle: str | None = None  # kind=cuda_ipc: base64 pickle of torch's (rebuild function, args)
    lock_path: str | None = None  # the UpdateLock's files are lock_path + ".intent" / ".lock"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_bytes": self.total_bytes, "params": self.params, "path": self.path,
                "ipc_handle": self.ipc_handle, "lock_path": self.lock_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SharedLayout:
        return cls(data["kind"], int(data["total_bytes"]), list(data["params"]), data.get("path"),
                   data.get("ipc_handle"), data.get("lock_path"))

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

    def __init__(self, base: str) -> None:
        self._intent = os.open(base + ".intent", os.O_RDWR | os.O_CREAT, 0o600)
        self._weights = os.open(base + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Server side, around one batch: wait while a trainer is updating or waiting to update."""
        fcntl.flock(self._intent, fcntl.LOCK_SH)
        fcntl.flock(self._intent, fcntl.LOCK_UN)
        fcntl.flock(self._weights, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._weights, fcntl.LOCK_UN)

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


def share_model_weights(model: torch.nn.Module, directory: str | Path = "/dev/shm",
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
        handle = base64.b64encode(pickle.dumps(reduce_tensor(buffer))).decode()
    return SharedLayout(layout_kind, total, params, path, handle, lock_path=base), buffer


def map_shared_buffer(layout: SharedLayout) -> torch.Tensor:
    """Open the server's buffer in this process (trainer side)."""
    if layout.kind == "file":
        if not layout.path or not Path(layout.path).exists():
            raise ModelError(f"shared weights file {layout.path!r} is not on this machine: shared_vllm needs the "
                             "trainer and the inference server on the same host (use broadcast across hosts)")
        return torch.from_file(layout.path, shared=True, size=layout.total_bytes, dtype=torch.uint8)
    if layout.kind == "cuda_ipc":
        rebuild, args = pickle.loads(base64.b64decode(layout.ipc_handle or ""))
        return rebuild(*args)
    raise ModelError(f"unknown shared weights kind {layout.kind!r}")


def attach_model_weights(model: torch.nn.Module, layout: SharedLayout) -> torch.Tensor:
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
    buffer = map_shared_buffer(layout)
    if buffer.device != named[0][1].device:
        raise ModelError(f"the shared weights are on {buffer.device}, the trainer's model on {named[0][1].device}")
    for name, param in named:
        param.data = _view(buffer, entries[name])
    return buffer
