"""How a run is asked to stop: SIGINT/SIGTERM cancel, SIGUSR1 pauses, both at the next step boundary.

A pause saves a complete checkpoint at that boundary first, so a resumed run continues from that very step;
a cancel does not. A pause never interrupts anything (a repeated SIGUSR1 changes nothing); a cancel replaces
a pause that is still pending (a cancel always wins), and a second cancel means "stop at once".

A process a launcher started acknowledges each first cancel or pause in ``stop-received.json`` as it
receives it (:func:`acknowledge_stops` says where, once per process): the service re-sends a signal only
while it is unacknowledged, so its re-sends never count as the second, "at once" cancel.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from posttrain.job.directory import JobDir, StopReceived
from posttrain.job.ranks import is_main_process

log = logging.getLogger("posttrain.worker")

PAUSE_SIGNAL = signal.SIGUSR1  # what the service (or a user: kill -USR1) sends to pause a run
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by a signal handler (or by ranks agreeing on a stop); trainers stop at the next step boundary.
    Holds the name of the signal that set it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, signal_name: str) -> None:
        self.signal_name = signal_name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def pausing(self) -> bool:
        return self.signal_name == PAUSE_SIGNAL.name

    @property
    def outcome(self) -> str:
        """The state a run stopped by this request ends in."""
        return "paused" if self.pausing else "cancelled"


_acknowledgements: tuple[JobDir, int] | None = None  # set by acknowledge_stops


def acknowledge_stops(job_dir: JobDir, pid: int) -> None:
    """From now on, record each stop request this process receives in ``job_dir`` (the one the service
    watches) for ``pid`` (the process the service signals for the job). Called once by the programs a
    launcher starts (the worker's and the pipeline runner's entry points, the KFP driver): a signal belongs to
    the process, not to one run, so a pipeline's stages acknowledge into the pipeline's directory. Through
    run_worker alone (`posttrain train` on one process, the Python API, a KFP step), nothing is recorded:
    nobody re-sends signals there."""
    global _acknowledgements
    _acknowledgements = (job_dir, pid)


def acknowledge_stop(request: str, signal_name: str) -> None:
    """Called by signal handlers, before they act on a first cancel or pause: after it, the service does not
    re-send that signal. Best effort (an unwritable job dir only means a re-send)."""
    if _acknowledgements is None or not is_main_process():
        return
    job_dir, pid = _acknowledgements
    try:
        job_dir.record_stop_received(StopReceived(pid=pid, request=request, signal=signal_name))
    except OSError as exc:
        log.warning("could not record the %s request in %s: %s", request, job_dir.stop_received_path, exc)


def install_stop_handlers(stop: StopRequest) -> dict[int, Any]:
    """Route the cancel and pause signals to ``stop``; returns the handlers they replaced (none off the main
    thread, where Python cannot install any)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def handle(signum, _frame):
        name = signal.Signals(signum).name
        if signum == PAUSE_SIGNAL:
            # A pause must not lose work: it never interrupts, and a repeat (the service re-sends it until it
            # sees it acknowledged) or one after a cancel changes nothing.
            if not stop.is_set():
                acknowledge_stop("pause", name)
                log.warning("%s received: pausing after the current step, with a checkpoint", name)
                stop.set(name)
            return
        if stop.is_set() and not stop.pausing:
            # A second signal means "now": unwind immediately; the caller still records the state.
            raise KeyboardInterrupt(name)
        # Acknowledged first: a signal arriving while this runs is still taken for the first one.
        acknowledge_stop("cancel", name)
        log.warning("%s received: stopping after the current step (send again to stop at once)", name)
        stop.set(name)  # a cancel replaces a pending pause

    for signum in (*CANCEL_SIGNALS, PAUSE_SIGNAL):
        previous[signum] = signal.signal(signum, handle)
    return previous


def restore_handlers(previous: dict[int, Any], signums: tuple[int, ...] = (*CANCEL_SIGNALS, PAUSE_SIGNAL)) -> None:
    for signum in signums:
        if signum in previous:
            signal.signal(signum, previous[signum])
