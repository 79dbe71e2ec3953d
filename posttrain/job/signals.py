"""How a run is asked to stop: SIGINT/SIGTERM cancel, SIGUSR1 pauses, both at the next step boundary.

A pause saves a complete checkpoint at that boundary first, so a resumed run continues from that very step;
a cancel does not. A pause never interrupts anything (a repeated SIGUSR1 changes nothing); a cancel replaces
a pause that is still pending (a cancel always wins), and a second cancel means "stop at once".
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

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


def install_stop_handlers(stop: StopRequest) -> dict[int, Any]:
    """Route the cancel and pause signals to ``stop``; returns the handlers they replaced (none off the main
    thread, where Python cannot install any)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def handle(signum, _frame):
        name = signal.Signals(signum).name
        if signum == PAUSE_SIGNAL:
            # A pause must not lose work: it never interrupts, and a repeat (a re-adopting server sends it
            # again) or one after a cancel changes nothing.
            if not stop.is_set():
                log.warning("%s received: pausing after the current step, with a checkpoint", name)
                stop.set(name)
            return
        if stop.is_set() and not stop.pausing:
            # A second signal means "now": unwind immediately; the caller still records the state.
            raise KeyboardInterrupt(name)
        log.warning("%s received: stopping after the current step (send again to stop at once)", name)
        stop.set(name)  # a cancel replaces a pending pause

    for signum in (*CANCEL_SIGNALS, PAUSE_SIGNAL):
        previous[signum] = signal.signal(signum, handle)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
