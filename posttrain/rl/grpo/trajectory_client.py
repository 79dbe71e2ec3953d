"""Client of the Atropos trajectory API (atroposlib's ``run-api``), the trainer's side of it.

The protocol: ``GET /info`` (is it up?) -> ``POST /register`` (the trainer's batch size, token budget,
checkpoint settings, starting step and step count) -> poll ``GET /batch`` until it answers a batch
(``{"batch": null}`` means "not enough scored rollouts yet"). A batch is a list of groups, each one
``ScoredData`` as an environment posted it to ``/scored_data``: tokens, masks, scores and optional
advantages, overrides, inference_logprobs, generation_params.

The API keeps its state in memory: if it restarts, it answers ``/batch`` with "not registered", and the
client registers again with the same registration (its starting step is the trainer's current step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from posttrain.errors import PosttrainError

log = logging.getLogger(__name__)

Group = dict[str, Any]


class TrajectoryAPIError(PosttrainError):
    """The trajectory API cannot be reached, or answered something the trainer cannot use."""


@dataclass
class Registration:
    """The body of ``POST /register`` (atroposlib.api.server.Registration): every field is required."""

    batch_size: int
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int
    wandb_group: str = ""
    wandb_project: str = ""


class TrajectoryAPIClient:
    """Talks to one trajectory API at ``url``; ``should_stop`` is polled while waiting, so a cancel or
    pause of the job is honoured even when no batch ever comes."""

    def __init__(self, url: str, *, timeout: float = 10.0, poll_interval: float = 1.0,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.url = url.rstrip("/")
        self.poll_interval = poll_interval
        self.should_stop = should_stop
        self.registration: Registration | None = None
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrajectoryAPIClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plain calls ------------------------------------------------------------------------------
    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TrajectoryAPIError(f"trajectory API {self.url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise TrajectoryAPIError(f"trajectory API {self.url}{path} answered {response.status_code}: "
                                     f"{response.text[:500]}")
        try:
            return response.json()
        except ValueError:
            raise TrajectoryAPIError(f"trajectory API {self.url}{path} answered non-JSON: "
                                     f"{response.text[:200]!r}") from None

    def info(self) -> dict[str, Any]:
        return self._json("GET", "/info")

    def status(self) -> dict[str, Any]:
        return self._json("GET", "/status")

    def register(self, registration: Registration) -> str:
        """Register this trainer; returns the uuid the API assigned."""
        answer = self._json("POST", "/register", json=asdict(registration))
        if not isinstance(answer, dict) or "uuid" not in answer:
            raise TrajectoryAPIError(f"trajectory API {self.url}/register answered without a uuid: {answer!r}")
        self.registration = registration
        log.info("registered with the trajectory API %s (batch_size=%d, starting_step=%d, num_steps=%d)",
                 self.url, registration.batch_size, registration.starting_step, registration.num_steps)
        return str(answer["uuid"])

    def get_batch(self) -> list[Group] | None:
        """One ``GET /batch``: the batch's groups, or None while the API has too few rollouts."""
        answer = self._json("GET", "/batch")
        if not isinstance(answer, dict):
            raise TrajectoryAPIError(f"trajectory API {self.url}/batch answered {answer!r}")
        if answer.get("status") == "error":
            raise NotRegistered(str(answer.get("message", "not registered")))
        batch = answer.get("batch")
        if batch is None:
            return None
        if not isinstance(batch, list) or not all(isinstance(group, dict) for group in batch):
            raise TrajectoryAPIError(f"trajectory API {self.url}/batch: 'batch' is not a list of groups")
        return batch

    # -- waiting ----------------------------------------------------------------------------------
    def wait_until_up(self, timeout: float) -> dict[str, Any] | None:
        """Poll ``GET /info`` until the API answers; None if a stop was requested first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.info()
            except TrajectoryAPIError as exc:
                if time.monotonic() > deadline:
                    raise TrajectoryAPIError(f"the trajectory API at {self.url} did not answer within {timeout:g} s "
                                             f"(start it with `run-api --port PORT`): {exc.message}") from None
            if self._sleep():
                return None

    def wait_for_batch(self, timeout: float | None = None) -> list[Group] | None:
        """Poll ``GET /batch`` until a batch comes; None if a stop was requested first.

        Connection errors are retried (the API may be restarting) until ``timeout`` (None: forever); an API
        that lost our registration is registered with again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_error: str | None = None
        while True:
            try:
                batch = self.get_batch()
                if batch:
                    return batch
                last_error = None
            except NotRegistered:
                if self.registration is None:
                    raise TrajectoryAPIError(f"trajectory API {self.url}: GET /batch before registering") from None
                log.warning("the trajectory API %s lost this trainer's registration (restarted?); registering again",
                            self.url)
                self._reregister()
                continue
            except TrajectoryAPIError as exc:
                if exc.message != last_error:
                    log.warning("waiting for the trajectory API: %s", exc.message)
                last_error = exc.message
            if deadline is not None and time.monotonic() > deadline:
                raise TrajectoryAPIError(f"no batch from the trajectory API {self.url} within {timeout:g} s"
                                         + (f" (last error: {last_error})" if last_error else
                                            ": are environments posting scored data?"))
            if self._sleep():
                return None

    def _reregister(self) -> None:
        assert self.registration is not None
        try:
            self.register(self.registration)
        except TrajectoryAPIError as exc:
            log.warning("registering again failed: %s", exc.message)

    def _sleep(self) -> bool:
        """Sleep one poll interval in short slices; True when a stop was requested."""
        end = time.monotonic() + self.poll_interval
        while time.monotonic() < end:
            if self.should_stop():
                return True
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self.should_stop()


class NotRegistered(TrajectoryAPIError):
    """``GET /batch`` before ``POST /register`` (or after the API restarted and forgot us)."""
