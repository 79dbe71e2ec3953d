"""The shared-weights layout comes from the network (GET /weights/info): the trainer maps only the
server's own files in its shared-weights directory and never unpickles anything."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.inference.shared_weights import (
    SharedLayout,
    UpdateLock,
    map_shared_buffer,
    open_update_lock,
    share_model_weights,
    sweep_stale_weights,
)


def layout_for(path: str | None = None, kind: str = "file", **extra) -> SharedLayout:
    return SharedLayout(kind, 64, [{"name": "w", "dtype": "float32", "shape": [4], "offset": 0}], path, **extra)


@pytest.fixture()
def shm(tmp_path: Path) -> Path:
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


def test_the_servers_own_file_is_mapped(shm: Path):
    model = torch.nn.Linear(4, 1, bias=False)
    layout, _buffer = share_model_weights(model, shm, tag="posttrain-9001")
    mapped = map_shared_buffer(layout, shm)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the server's parameter is a view of the same bytes
    assert torch.equal(mapped[:16].view(torch.float32), torch.full((4,), 3.0))
    server_lock = UpdateLock(layout.lock_path or "")  # the server creates the lock files
    lock = open_update_lock(layout, shm)
    assert lock is not None
    lock.close()
    server_lock.close()


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "wrong-name"])
def test_a_path_outside_the_directory_or_not_the_servers_is_refused(shm: Path, where: str):
    victim = shm.parent / "precious.bin"
    victim.write_bytes(b"keep me" + bytes(57))
    paths = {
        "outside": str(victim),
        "dotdot": str(shm / ".." / "precious.bin"),
        "symlink": str(shm / "posttrain-9001-weights-1.bin"),
        "wrong-name": str(shm / "precious.bin"),
    }
    (shm / "posttrain-9001-weights-1.bin").symlink_to(victim)
    (shm / "precious.bin").write_bytes(bytes(64))
    with pytest.raises(ModelError, match="refusing shared weights path"):
        map_shared_buffer(layout_for(paths[where]), shm)
    assert victim.read_bytes().startswith(b"keep me")


def test_a_lock_path_elsewhere_is_refused_and_no_file_is_created(shm: Path, tmp_path: Path):
    elsewhere = tmp_path / "posttrain-weights-7"
    with pytest.raises(ModelError, match="refusing shared weights path"):
        open_update_lock(layout_for(lock_path=str(elsewhere)), shm)
    # Inside the directory with the right name but no files: the trainer falls back to HTTP, creating nothing.
    assert open_update_lock(layout_for(lock_path=str(shm / "posttrain-weights-7")), shm) is None
    assert not list(tmp_path.rglob("*.intent")) and not list(tmp_path.rglob("*.lock"))


def test_a_pickled_cuda_ipc_handle_is_never_unpickled(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = base64.b64encode(pickle.dumps(Exploit())).decode()
    for handle in (payload, {"numel": 64, "handle": payload}, None):
        with pytest.raises(ModelError, match="CUDA IPC handle"):
            map_shared_buffer(layout_for(kind="cuda_ipc", ipc_handle=handle))  # type: ignore[arg-type]
    assert not marker.exists()


def test_a_malformed_layout_is_a_model_error():
    with pytest.raises(ModelError, match="malformed"):
        SharedLayout.from_json({"kind": "file", "params": [1, 2]})


def test_the_sweep_removes_files_of_dead_servers_only(shm: Path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    stale = [shm / f"posttrain-9001-weights-{dead.pid}{suffix}" for suffix in (".bin", ".intent", ".lock")]
    live = shm / f"posttrain-9002-weights-{os.getpid()}.bin"
    other = shm / f"something-else-{dead.pid}.bin"
    for path in (*stale, live, other):
        path.write_bytes(b"x")
    assert sorted(sweep_stale_weights(shm)) == sorted(stale)
    assert live.exists() and other.exists()


def test_a_new_server_sweeps_what_a_killed_one_left(tmp_path: Path):
    """A SIGKILLed server never runs its shutdown; the next server in that directory cleans up after it."""
    import signal

    from inference_harness import start_server

    first = start_server("posttrain:tiny", tmp_path / "logs", "--shared-weights", "--shared-weights-dir",
                         str(tmp_path))
    leaked = list(tmp_path.glob("posttrain-*-weights-*"))
    assert len(leaked) == 3  # .bin, .intent, .lock
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    first.stop()
    assert all(path.exists() for path in leaked)
    second = start_server("posttrain:tiny", tmp_path / "logs", "--shared-weights", "--shared-weights-dir",
                          str(tmp_path))
    try:
        assert not any(path.exists() for path in leaked)
        assert len(list(tmp_path.glob("posttrain-*-weights-*"))) == 3  # the new server's own
    finally:
        second.stop()
    assert not list(tmp_path.glob("posttrain-*-weights-*"))
