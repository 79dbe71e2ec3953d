"""Fixtures of the Llama Stack tests: Llama Stack's own Python 3.12 environment, built once per test run
with `make llama-stack-venv` (cached between runs). Without Python 3.12 (or network for its packages)
the tests skip, saying why, except in CI (``CI`` set), where they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # service_harness

from llama_stack_harness import REPO, VENV


@pytest.fixture(scope="session")
def llama_stack_venv() -> Path:
    done = subprocess.run(["make", "-C", str(REPO), "llama-stack-venv"], capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"`make llama-stack-venv` failed, so Llama Stack 0.6.1 cannot run here:\n{done.stdout[-2000:]}" \
                 f"{done.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return VENV
