"""How a run ended: :class:`JobResult`, and the exit code of the process that ran it.

Exit codes: 0 succeeded, 1 failed, 2 rejected input (status.json says why), 130/143 cancelled by
SIGINT/SIGTERM, 75 paused (EX_TEMPFAIL: "continue later"). Launchers, torchrun and cluster schedulers read
them; :func:`exit_code_for` is the one rule every stand-in for the worker (the KFP driver) uses too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CANCELLED = {"SIGINT": 130, "SIGTERM": 143}
EXIT_PAUSED = 75


def exit_code_for(state: str, cancelled_by: str | None = None, input_error: bool = False) -> int:
    """The process exit code of a run that ended in ``state``."""
    if state == "succeeded":
        return EXIT_OK
    if state == "paused":
        return EXIT_PAUSED
    if state == "cancelled":
        return EXIT_CANCELLED.get(cancelled_by or "SIGTERM", EXIT_CANCELLED["SIGTERM"])
    return EXIT_BAD_INPUT if input_error else EXIT_FAILED


@dataclass
class JobResult:
    """What a finished run reports back to its caller (the CLI prints it as the summary)."""

    state: str
    job_dir: Path
    step: int = 0
    total_steps: int | None = None
    final_loss: float | None = None
    runtime_s: float = 0.0
    tokens_per_s: float | None = None
    final_dir: Path | None = None
    error: str | None = None
    cancelled_by: str | None = None
    input_error: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    # A pause that arrived on the last step: the run just finished, and a caller with more to run (a
    # pipeline's next stage) pauses before it.
    pause_pending: bool = False
    # A node of a multi-node run that holds no rank 0: its node rank, and HOST:JOB_DIR where rank 0 wrote
    # the results.
    node_rank: int | None = None
    rank0_results: str | None = None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state, self.cancelled_by, self.input_error)
