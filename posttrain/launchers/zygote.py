"""The warm template ("zygote") process: imports the training stack once, then forks one worker per job.

    python -m posttrain.launchers.zygote      (started by the server; see warm.py)

Starting ``python -m posttrain.worker`` costs seconds of imports (torch, transformers, TRL, PEFT,
datasets) before the job does anything. This process pays them once, then waits for requests on its
stdin and answers on its stdout, one JSON object a line:

    -> {"id": 1, "argv": [...worker arguments...], "env": {...}, "job_dir": "...", "log": "..."}
    <- {"id": 1, "pid": 1234, "started": 5123.47}   or   {"id": 1, "error": "..."}
    <- {"exit": 1234, "code": 0}                             (whenever a worker ends; -N: killed by signal N)
    <- {"ready": true, "pid": ..., "threads": 1}             (once, when the imports are done)

Each worker is a forked child that becomes what a cold start would have made: its own session and
process group (so cancel can kill the whole group, and it outlives a server restart), its identity
recorded in the job directory (identity.py: how a restarted server recognises it), stdin from
/dev/null, stdout and stderr appended to worker.log, the job directory as working directory, the job's
environment, then the same ``posttrain.worker`` main with the same arguments, and ``os._exit`` with its code.

Fork copies only the calling thread, so this process stays single-threaded: it never runs a torch op
(no OpenMP or intra-op pool is started, CUDA is never initialised), starts no thread, and refuses to
fork if a thread has appeared anyway (the server then starts that job cold). It reaps its children
itself (no SIGCHLD handler, no thread: a short select timeout), killing whatever is left in a worker's
process group while the exited worker's pid still holds the group id, and reports each exit. When the
server goes away (stdin closes) it exits; the workers carry on in their own sessions.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

# What the worker imports before it reports "running" and while it builds a trainer: importing it here
# is the whole point of this process. posttrain's own modules import torch, transformers, TRL and PEFT.
PRELOADED_MODULES = (
    "torch", "numpy", "psutil", "datasets", "transformers", "peft", "trl", "transformers.trainer",
    "posttrain.worker.entry", "posttrain.recipes.runner", "posttrain.recipes.callbacks", "posttrain.data",
    "posttrain.modeling", "posttrain.preflight", "posttrain.recipes.sft", "posttrain.recipes.dpo", "posttrain.recipes.reward", "posttrain.recipes.grpo",
    "posttrain.launchers.identity",
)
POLL_S = 0.05  # how soon an exited worker is noticed
IDENTITY_TIMEOUT_S = 30.0
START_DIR = os.getcwd()


def os_thread_count() -> int:
    """Threads of this process as the kernel sees them (native ones too: OpenMP, allocators, CUDA)."""
    return len(os.listdir("/proc/self/task"))


def fork_safety_problem() -> str | None:
    """Why forking now would be unsafe, or None."""
    torch = sys.modules.get("torch")
    if threading.active_count() != 1 or os_thread_count() != 1:
        names = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip()
                       for task in os.listdir("/proc/self/task"))
        return f"the warm template has {os_thread_count()} threads ({', '.join(names)}); it forks only with one"
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised in the warm template; a forked child could not use it"
    return None


class Template:
    def __init__(self, requests_fd: int, replies_fd: int) -> None:
        self.requests_fd = requests_fd
        self.replies_fd = replies_fd
        self.pending = b""
        self.children: set[int] = set()
        self.server_pid = os.getppid()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.replies_fd, data):]

    def serve(self) -> None:
        """Answer requests and report exits until the server closes our stdin."""
        while True:
            readable, _, _ = select.select([self.requests_fd], [], [], POLL_S)
            if readable:
                chunk = os.read(self.requests_fd, 1 << 16)
                if not chunk:
                    return  # the server is gone; the workers live on in their own sessions
                self.pending += chunk
                *lines, self.pending = self.pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.handle(json.loads(line))
            self.reap()

    def handle(self, request: dict[str, Any]) -> None:
        try:
            if os.getppid() != self.server_pid:  # a request written just before the server died
                raise RuntimeError("the server that sent this request is gone")
            problem = fork_safety_problem()
            if problem is not None:
                raise RuntimeError(problem)
            pid, started = self.spawn(request)
        except Exception as exc:
            self.send({"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})
            return
        self.send({"id": request["id"], "pid": pid, "started": started})

    def spawn(self, request: dict[str, Any]) -> tuple[int, float]:
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(ready_r)
            run_child(request, ready_w, (self.requests_fd, self.replies_fd))
        os.close(ready_w)
        self.children.add(pid)
        # Answer only once the child has recorded who it is: from then on a restarted server finds it.
        try:
            readable, _, _ = select.select([ready_r], [], [], IDENTITY_TIMEOUT_S)
            answer = os.read(ready_r, 64) if readable else b""
        finally:
            os.close(ready_r)
        if not answer:
            raise RuntimeError(f"worker {pid} ended or hung before recording its identity")
        return pid, float(answer.decode())

    def reap(self) -> None:
        while self.children:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            # The exited worker is still an unreaped zombie, so its pid (= its group id) cannot have been
            # reused: kill what it left in its group, then reap it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info.si_pid, signal.SIGKILL)
            _, status = os.waitpid(info.si_pid, 0)
            self.children.discard(info.si_pid)
            self.send({"exit": info.si_pid, "code": os.waitstatus_to_exitcode(status)})


def run_child(request: dict[str, Any], ready_w: int, template_fds: tuple[int, ...]) -> None:
    """In the forked child: become the job's worker, run it, exit. Never returns."""
    code = 1
    try:
        os.setsid()  # own session and process group, not the template's
        # Exit handlers registered so far belong to the template and its resources; the worker's own
        # (a tracker finishing its run, say) are run when it ends, as at a normal interpreter exit.
        atexit._clear()
        weakref.finalize._registered_with_atexit = False  # type: ignore[attr-defined]
        from posttrain.launchers.identity import record_worker_identity

        identity = record_worker_identity(Path(request["job_dir"]))
        os.write(ready_w, repr(identity.started).encode())
        for fd in (ready_w, *template_fds):
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        os.chdir(request["job_dir"])
        if sys.path and sys.path[0] == START_DIR:  # `python -m` puts the working directory first: the job's
            sys.path[0] = request["job_dir"]
        os.environ.clear()
        os.environ.update(request["env"])
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Python reseeds `random` in a forked child itself; numpy's global generator would otherwise be
        # the template's in every worker. torch's default generator is untouched (never used here), as
        # in a fresh process; jobs seed all three from training.seed anyway.
        import numpy

        numpy.random.seed()
        from posttrain.worker import entry

        argv = list(request["argv"])
        sys.argv = [entry.__file__, *argv]
        print(f"worker {os.getpid()} forked from the warm template {os.getppid()}", file=sys.stderr)
        code = entry.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    # The protocol gets file descriptors of its own; fd 0 becomes /dev/null and fd 1 our stderr (the
    # template's log), so nothing an imported library prints can corrupt a reply.
    requests_fd, replies_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's; stdin EOF stops us
    started = time.perf_counter()
    for module in PRELOADED_MODULES:
        importlib.import_module(module)
    # Keep the imported objects out of the collector's reach: a worker's collections then do not touch
    # (and copy) the pages it shares with this process.
    gc.collect()
    gc.freeze()
    template = Template(requests_fd, replies_fd)
    print(f"warm template {os.getpid()}: imports took {time.perf_counter() - started:.1f}s; "
          f"threads: {os_thread_count()}", file=sys.stderr)
    template.send({"ready": True, "pid": os.getpid(), "threads": os_thread_count(),
                   "problem": fork_safety_problem()})
    with contextlib.suppress(BrokenPipeError):  # the server went away while we answered
        template.serve()


if __name__ == "__main__":
    main()
