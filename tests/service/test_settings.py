"""Service settings and API key files, without a server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from posttrain.service.auth import hash_api_key, load_key_hashes
from posttrain.service.commands import is_loopback
from posttrain.service.settings import ServiceSettings, normalize_db_url


def test_key_file_holds_plain_or_hashed_keys(tmp_path: Path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# comment\n\nplain-key\nsha256:{hashlib.sha256(b'other').hexdigest().upper()}\n")
    assert load_key_hashes(keys) == {hash_api_key("plain-key"), hash_api_key("other")}


@pytest.mark.parametrize(("text", "message"), [("# nothing\n", "holds no keys"), ("sha256:abc\n", "line 1")])
def test_bad_key_files_say_what_is_wrong(tmp_path: Path, text: str, message: str):
    keys = tmp_path / "keys.txt"
    keys.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_key_hashes(keys)


def test_settings_defaults_and_database_urls(tmp_path: Path):
    settings = ServiceSettings(data_dir=tmp_path / "data")
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'posttrain.db'}"
    assert settings.jobs_dir == tmp_path / "data" / "jobs"
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValueError, match="one per slot"):
        ServiceSettings(data_dir=tmp_path, slots=2, devices=["0"])


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("0.0.0.0", False), ("10.0.0.5", False), ("example.org", False)])
def test_loopback_addresses(host: str, loopback: bool):
    assert is_loopback(host) is loopback
