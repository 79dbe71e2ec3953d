"""API keys and their owners: kept only as SHA-256 hashes, checked by one router-level dependency.

A key file holds one key per line: ``KEY_OR_SHA256 [OWNER [admin]]``. The key is written as itself
(hashed as it is read) or as ``sha256:<hex>`` (``printf %s "$KEY" | sha256sum``), so the file on the server
need not contain usable keys. ``OWNER`` names the tenant whose jobs and uploads the key reaches (several
keys may share one owner); ``admin`` lets the key see and manage every owner's. A line with only a key
is its own owner, named after the key's hash (``key-<12 hex digits>``).
Keys are long random tokens, so a plain SHA-256 is enough (no salt/stretching needed, unlike passwords).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request, status

HASH_PREFIX = "sha256:"
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner their jobs and uploads are filed under, and whether they see all owners'."""

    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or owner == self.owner


# The single user of a server without keys (a personal loopback server): sees everything.
LOCAL_USER = Principal("local", admin=True)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(path: str | Path) -> dict[str, Principal]:
    """Read a key file into {sha256 hex: Principal}; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"API key file {path} does not exist")
    keys: dict[str, Principal] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path} line {number}"
        key, owner, flags = fields[0], fields[1:2], fields[2:]
        if key.startswith(HASH_PREFIX):
            digest = key[len(HASH_PREFIX):].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        else:
            digest = hash_api_key(key)
        if owner and not _OWNER.match(owner[0]):
            raise ValueError(f"{where}: owner {owner[0]!r} must be 1-64 letters, digits or . _ @ -")
        if flags not in ([], ["admin"]):
            raise ValueError(f"{where}: expected 'KEY [OWNER [admin]]', got extra {' '.join(flags)!r}")
        principal = Principal(owner[0] if owner else f"key-{digest[:12]}", admin=bool(flags))
        if keys.get(digest, principal) != principal:
            raise ValueError(f"{where}: this key is already listed for {keys[digest].owner}")
        keys[digest] = principal
    if not keys:
        raise ValueError(f"API key file {path} holds no keys")
    return keys


async def require_api_key(request: Request) -> Principal:
    """The caller: 401 without a bearer key, 403 with a key that is not configured; LOCAL_USER when auth
    is off. Every router except health carries it, so a new route cannot be public by accident."""
    keys: dict[str, Principal] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_USER
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (posttrain reads POSTTRAIN_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_api_key(key.strip())
    for known, principal in keys.items():
        if hmac.compare_digest(digest, known):
            return principal
    raise HTTPException(status.HTTP_403_FORBIDDEN, "API key not accepted by this server")
