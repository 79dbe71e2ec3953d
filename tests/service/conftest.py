"""Fixtures of the service tests: real servers on loopback ports, stopped (with their workers) after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_harness import ServerProcess, kill_workers


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(*serve_args, api_key=None, data_dir=None, env=None) -> a ready ServerProcess; all stopped after."""
    started: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None, data_dir: Path | None = None,
              env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path_factory.mktemp("service") / "data", *args, api_key=api_key,
                               env=env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        kill_workers(server.data_dir)


