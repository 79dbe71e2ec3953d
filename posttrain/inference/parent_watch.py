"""Make a child server die with the process that started it, however that process ends (even SIGKILL).

Two layers: on Linux the kernel sends the child SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, set
between fork and exec, so it also covers an exec'd ``vllm serve``); and our own server runs a thread that
exits the process once its parent pid is gone, which works wherever the kernel option does not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_PID_ENV = "POSTTRAIN_PARENT_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: SIGTERM this child when its parent dies (Linux only).

    The kernel ties the signal to the parent *thread* that forked: callers start the child from a thread
    that lives as long as the job (the trainer's main thread)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def parent_alive(pid: int) -> bool:
    if os.getppid() != pid:  # re-parented: the parent is gone (also when its pid was reused since)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(interval: float = 1.0) -> threading.Thread | None:
    """When ``POSTTRAIN_PARENT_PID`` is set (by InferenceServerProcess), SIGTERM this process as soon as that
    parent is gone, so the server shuts down as after a normal stop. Does nothing without the variable: a
    server a person started by hand (nohup, a shell) keeps running on its own."""
    value = os.environ.get(PARENT_PID_ENV)
    if not value or not value.isdigit():
        return None
    parent = int(value)

    def watch() -> None:
        while parent_alive(parent):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
