"""An inference server a trainer started must not outlive it: the service SIGKILLs a cancelled job's worker,
and a server left behind would hold its port and memory. Real `posttrain rl serve-inference` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from inference_harness import free_port, serve_command
from ports import port_is_free
from waiting import kill_process, wait_for

# A stand-in for the trainer: starts the server, reports its pid, then waits to be killed.
THROUGH_SERVER_PROCESS = """
import sys, time
from pathlib import Path
from posttrain.inference.process import InferenceServerProcess
port, log = int(sys.argv[1]), Path(sys.argv[2])
server = InferenceServerProcess(sys.argv[3:], f"http://127.0.0.1:{port}", log_path=log, startup_timeout=180)
server.start()
print(server.process.pid, flush=True)
time.sleep(600)
"""

# The portable fallback alone: no PR_SET_PDEATHSIG, only the parent pid the server watches.
WATCHED_ONLY = """
import os, subprocess, sys, time
import httpx
from posttrain.inference.parent_watch import PARENT_PID_ENV
port, log = int(sys.argv[1]), open(sys.argv[2], "ab")
child = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, PARENT_PID_ENV: str(os.getpid())})
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.2)
print(child.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("parent_script", [THROUGH_SERVER_PROCESS, WATCHED_ONLY], ids=["pdeathsig", "watchdog"])
def test_a_sigkilled_parent_takes_its_inference_server_with_it(tmp_path: Path, parent_script: str):
    port = free_port()
    command = serve_command("posttrain:tiny", port)
    parent = subprocess.Popen([sys.executable, "-c", parent_script, str(port), str(tmp_path / "server.log"),
                               *command], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    server_pid = None
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.strip().isdigit(), f"the parent did not start the server: {line!r}"
        server_pid = int(line)
        assert not gone(server_pid) and not port_is_free(port)

        parent.send_signal(signal.SIGKILL)  # as the service does after cancel_grace_s: no finally runs
        parent.wait()

        wait_for(lambda: gone(server_pid), timeout=60, what=f"the server (pid {server_pid}) to exit")
        wait_for(lambda: port_is_free(port), timeout=30, what=f"port {port} to be free")
    finally:
        kill_process(parent)
        if server_pid is not None and not gone(server_pid):
            os.killpg(server_pid, signal.SIGKILL)  # the fix failed: do not leave the server behind
