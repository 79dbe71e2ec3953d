"""Ids of jobs and uploaded files: how they are made and the one pattern every lookup checks first."""

from __future__ import annotations

import re
import secrets

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_id(value: str) -> bool:
    """Whether ``value`` could be an id at all (anything else is looked up nowhere: it is 404 at once)."""
    return bool(ID_PATTERN.match(value))


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(8)
