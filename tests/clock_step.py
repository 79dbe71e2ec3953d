"""A step of the wall clock as one server process sees it (see clock_step_site/sitecustomize.py).

The server's workers never see the variable (it gives them a minimal environment), so they keep the true
boot time: for a server comparing start times it reads with ones its workers recorded, that is a step of
the clock between the two."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SITE = Path(__file__).with_name("clock_step_site")
VARIABLE = "POSTTRAIN_TEST_CLOCK_STEP_FILE"


class ClockStep:
    def __init__(self, step_file: Path) -> None:
        self.step_file = step_file

    def environment(self) -> dict[str, str]:
        """What the server process is started with."""
        path = [str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {"PYTHONPATH": os.pathsep.join(path), VARIABLE: str(self.step_file)}

    @contextlib.contextmanager
    def stepped(self, seconds: float = 1.0) -> Iterator[None]:
        """The server sees the clock stepped by ``seconds`` (after its current workers started) until the end."""
        self.step_file.write_text(str(seconds))
        try:
            yield
        finally:
            self.step_file.unlink(missing_ok=True)
