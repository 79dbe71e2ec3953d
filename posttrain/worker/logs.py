"""Where a worker's log lines go: stderr and worker.log on rank 0, worker.rankN.log on the other ranks."""

from __future__ import annotations

import logging
import os
import sys

from posttrain.job.directory import JobDir
from posttrain.model_cache import quiet_library_warnings


def setup_logging(job_dir: JobDir | None, to_file: bool) -> None:
    root = logging.getLogger("posttrain")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_posttrain", False):
            root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if to_file and job_dir is not None:
        handlers.append(logging.FileHandler(job_dir.log_path))
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank and job_dir is not None:
        # Under torchrun, rank 0 logs as a single worker does; every other rank to worker.rankN.log only.
        handlers = [logging.FileHandler(job_dir.root / f"worker.rank{rank}.log")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._posttrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    quiet_library_warnings()
    if not sys.stderr.isatty():
        # Progress bars written to a log file are a wall of carriage returns; log lines say the same.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
