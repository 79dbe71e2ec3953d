"""An inference server run as a child process: start it, wait for /health, stop its whole tree, restart it.

Used by ``none`` weight sync (save a checkpoint, restart the server on it) and by ``posttrain rl run``.
The child gets its own session, so stopping it also stops anything it started (``vllm serve`` workers), and
it dies with the process that started it (see parent_watch.py), so a SIGKILLed trainer leaves no server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from posttrain.errors import PosttrainError
from posttrain.inference.parent_watch import PARENT_PID_ENV, die_with_parent

# The inference server's --api-key as an environment variable: how `rl run` hands one key to every part.
API_KEY_VARIABLE = "POSTTRAIN_INFERENCE_API_KEY"


class ServerProcessError(PosttrainError):
    """The inference server process did not start or did not become healthy."""


def tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def with_model(command: list[str], model_path: str, tokenizer: str | None = None) -> list[str]:
    """``command`` with its ``--model`` value replaced; the original model stays the tokenizer unless one is set.

    A bare training checkpoint may lack tokenizer files, so the original model keeps providing them.
    """
    new = list(command)
    if "--model" not in new:
        raise ServerProcessError(f"the server command has no --model option to replace: {command}")
    index = new.index("--model") + 1
    original = new[index]
    new[index] = model_path
    if "--tokenizer" not in new:
        new += ["--tokenizer", tokenizer or original]
    return new


class InferenceServerProcess:
    def __init__(self, command: list[str], url: str = "http://127.0.0.1:9001", log_path: Path | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 600.0, cwd: Path | None = None) -> None:
        self.command = list(command)
        self.cwd = cwd
        self.url = url.rstrip("/").removesuffix("/v1")
        self.log_path = log_path
        self.env = env
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        if self.running:
            raise ServerProcessError("the inference server is already running")
        if self.healthy():
            raise ServerProcessError(f"another server already answers on {self.url}; stop it or pick another port")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(self.env or {}),
               PARENT_PID_ENV: str(os.getpid())}
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it; closed below
        else:
            output = subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=die_with_parent, cwd=self.cwd)
        except OSError as exc:
            raise ServerProcessError(f"cannot start the inference server {self.command[0]!r}: {exc}") from None
        finally:
            if output is not subprocess.DEVNULL:
                output.close()
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if not self.running:
                code = self.process.returncode if self.process else None
                raise ServerProcessError(f"the inference server exited with code {code} before it was healthy"
                                         + (f"; last lines of {self.log_path}:\n{tail(self.log_path)}"
                                            if self.log_path else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise ServerProcessError(f"the inference server was not healthy at {self.url}/health after "
                                         f"{self.startup_timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group (it finishes requests in flight), SIGKILL after ``grace`` s."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self._signal(process, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        # Children that outlived their parent (same group) go too.
        self._signal(process, signal.SIGKILL)
        self.process = None

    @staticmethod
    def _signal(process: subprocess.Popen, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    def restart(self, model_path: str | None = None) -> float:
        """Stop, then start on ``model_path`` (when given); returns the seconds the server was away."""
        started = time.perf_counter()
        if model_path is not None:
            self.command = with_model(self.command, model_path)
        self.stop()
        self.start()
        return time.perf_counter() - started

    def __enter__(self) -> InferenceServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
