"""Saving ``final/``: the trained adapter (or full model) and its tokenizer, all or nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.job.directory import JobDir
from posttrain.job.ranks import is_main_process


def save_final(save_model: Callable[[str], Any], tokenizer: Any, job_dir: JobDir) -> Path:
    """Write ``final/`` through a temporary folder and a rename. ``save_model(folder)`` writes the weights (a
    TRL trainer's ``save_model``, a PEFT or transformers model's ``save_pretrained``). Every rank calls it (a
    sharded model gathers its weights there); only rank 0 writes files."""
    final = job_dir.final_dir
    main = is_main_process()
    tmp = job_dir.root / ".final.partial"  # one name for every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(str(tmp))
        if not main:
            return final
        tokenizer.save_pretrained(str(tmp))
        # Move an old final/ aside rather than deleting it first: a crash in between must not leave
        # the directory without any final/.
        old = job_dir.root / ".final.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
