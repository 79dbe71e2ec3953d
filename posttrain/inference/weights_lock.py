"""The lock between generation and whatever changes the weights it uses.

The engine thread holds it while its batch is not empty. An update (a trainer's broadcast, a pause around
its optimizer step, replacing an adapter in place) marks itself as waiting before it takes the lock: the
engine then takes in no new request, lets the running ones finish and releases the lock, so no sample mixes
two policies and a busy server cannot starve an update.
"""

from __future__ import annotations

import logging
import threading

from posttrain.inference.openai_protocol import RequestError

log = logging.getLogger(__name__)


class WeightsLock:
    """Held by the engine thread while it generates, and by anything that changes the weights in use.

    An update (``with lock:``, or :meth:`pause` from one HTTP request until :meth:`resume` from another)
    marks itself as waiting first: the engine then takes in no new request and releases the lock once its
    running ones are done. A pause that is never resumed (a trainer that died mid-step) expires after its
    timeout, so the server does not hang forever.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self._pause_token: object | None = None
        self._waiting = 0

    @property
    def update_waiting(self) -> bool:
        return self._waiting > 0

    def _acquire_for_update(self, blocking: bool = True) -> bool:
        with self._state:
            self._waiting += 1
        try:
            return self._lock.acquire(blocking=blocking)
        finally:
            with self._state:
                self._waiting -= 1

    def __enter__(self) -> WeightsLock:
        self._acquire_for_update()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def acquire_for_generation(self) -> None:
        self._lock.acquire()

    def release_for_generation(self) -> None:
        self._lock.release()

    @property
    def paused(self) -> bool:
        return self._pause_token is not None

    def pause(self, timeout_s: float, blocking: bool = True) -> bool:
        """Take the lock for a weight update; False only when ``blocking`` is off and requests are in flight."""
        if self._pause_token is not None:
            raise RequestError("generation is already paused; resume it first", status=409)
        if not self._acquire_for_update(blocking=blocking):
            return False
        token = object()
        with self._state:
            self._pause_token = token
        timer = threading.Timer(timeout_s, self._expire, args=(token,))
        timer.daemon = True
        timer.start()
        return True

    def resume(self) -> bool:
        """Release a pause; False when generation was not paused."""
        with self._state:
            if self._pause_token is None:
                return False
            self._pause_token = None
            self._lock.release()
            return True

    def _expire(self, token: object) -> None:
        with self._state:
            if self._pause_token is token:
                log.warning("a weight-update pause was never resumed; resuming generation")
                self._pause_token = None
                self._lock.release()
