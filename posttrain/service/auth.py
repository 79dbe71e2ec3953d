"""API keys: kept only as SHA-256 hashes, checked by one FastAPI dependency.

A key file holds one key per line, either the key itself (hashed as it is read) or ``sha256:<hex>``
(``printf %s "$KEY" | sha256sum``), so the file on the server need not contain usable keys.
Keys are long random tokens, so a plain SHA-256 is enough (no salt/stretching needed, unlike passwords).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fastapi import HTTPException, Request, status

HASH_PREFIX = "sha256:"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return "pt-" + secrets.token_urlsafe(32)


def load_key_hashes(path: str | Path) -> frozenset[str]:
    """Read a key file into hashes; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"API key file {path} does not exist")
    hashes = set()
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(HASH_PREFIX):
            digest = line[len(HASH_PREFIX):].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{path} line {number}: 'sha256:' must be followed by 64 hex digits")
            hashes.add(digest)
        else:
            hashes.add(hash_api_key(line))
    if not hashes:
        raise ValueError(f"API key file {path} holds no keys")
    return frozenset(hashes)


async def require_api_key(request: Request) -> None:
    """401 without a bearer key, 403 with a key that is not configured; a no-op when auth is off."""
    hashes: frozenset[str] = request.app.state.settings.api_key_hashes
    if not hashes:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (posttrain reads POSTTRAIN_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_api_key(key.strip())
    if not any(hmac.compare_digest(digest, known) for known in hashes):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "API key not accepted by this server")
