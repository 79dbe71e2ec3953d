"""The cache of built model folders: each built once, race-safe, into ``$POSTTRAIN_CACHE``
(default ``~/.cache/posttrain``); the embedded models (:mod:`posttrain.embedded`, :mod:`posttrain.tiny`) live there."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from posttrain.errors import ModelError


@contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars while an embedded model is built (seconds of work
    that the caller already announces)."""
    from transformers.utils import logging as transformers_logging

    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def quiet_library_warnings() -> None:
    """Silence two warnings every process that loads models would print, neither actionable by a user."""
    import logging
    import warnings

    # bitsandbytes warns on every import that an optional hub-downloaded CPU kernel is absent; the
    # built-in kernel it falls back to is what we test with, so the warning is noise to users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # TRL 1.16 and PEFT 0.21 still call the renamed transformers 5 API; nothing a user can do about it.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def default_cache_dir() -> Path:
    """``$POSTTRAIN_CACHE``, else ``~/.cache/posttrain``."""
    configured = os.environ.get("POSTTRAIN_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "posttrain"


def cached_build(root: Path | None, folder: str, build: Callable[[Path], object], label: str) -> Path:
    """``root/folder``, made by ``build(tmp_dir)`` on first call and reused afterwards.

    Safe when several processes (e.g. torchrun ranks) race: each builds in its own temporary folder beside
    the target and renames it into place; a rename is atomic, so the target is either absent or complete,
    and a process that loses the race discards its copy.
    """
    root = Path(root) if root is not None else default_cache_dir()
    target = root / folder
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".building", dir=root))
    except OSError as exc:
        raise ModelError(
            f"cannot create the cache folder for {label} at {root}: {exc.strerror}; "
            "set POSTTRAIN_CACHE to a writable folder"
        ) from exc
    try:
        build(building)
        # mkdtemp (and safetensors' writer) make files private; the cache may be shared between users.
        building.chmod(0o755)
        for file in building.iterdir():
            file.chmod(0o644)
        try:
            os.rename(building, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished first; its folder is identical, keep it.
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target
