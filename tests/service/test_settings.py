"""Service settings and API key files, without a server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from posttrain.service.auth import Principal, hash_api_key, load_api_keys
from posttrain.service.hosts import host_name, is_loopback
from posttrain.service.settings import ServiceSettings, normalize_db_url


def test_key_file_holds_plain_or_hashed_keys_with_owners(tmp_path: Path):
    keys = tmp_path / "keys.txt"
    other = hashlib.sha256(b"other").hexdigest()
    keys.write_text(f"# comment\n\nplain-key\nsha256:{other.upper()}  alice\nops-key ops admin\nalice-laptop alice\n")
    loaded = load_api_keys(keys)
    plain = hash_api_key("plain-key")
    assert loaded == {
        plain: Principal(f"key-{plain[:12]}"),  # a line with only a key: owned by its own hash
        other: Principal("alice"),
        hash_api_key("ops-key"): Principal("ops", admin=True),
        hash_api_key("alice-laptop"): Principal("alice"),
    }
    assert Principal("alice").may_see("alice") and not Principal("alice").may_see("bob")
    assert Principal("ops", admin=True).may_see("bob") and not Principal("alice").may_see(None)


@pytest.mark.parametrize(("text", "message"), [
    ("# nothing\n", "holds no keys"), ("sha256:abc\n", "line 1"), ("k1 alice root\n", "extra 'root'"),
    ("k1 al/ice\n", "owner 'al/ice'"), ("k1 alice\nk1 bob\n", "line 2: this key is already listed for alice"),
])
def test_bad_key_files_say_what_is_wrong(tmp_path: Path, text: str, message: str):
    keys = tmp_path / "keys.txt"
    keys.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_api_keys(keys)


def test_settings_defaults_and_database_urls(tmp_path: Path):
    settings = ServiceSettings(data_dir=tmp_path / "data")
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'posttrain.db'}"
    assert settings.jobs_dir == tmp_path / "data" / "jobs"
    assert normalize_db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_db_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValueError, match="one per slot"):
        ServiceSettings(data_dir=tmp_path, slots=2, devices=["0"])


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("[::1]", True), ("127.0.0.2", True), ("localhost.", True),
                                                ("0.0.0.0", False), ("10.0.0.5", False), ("example.org", False),
                                                ("localhost.example.org", False)])
def test_loopback_addresses(host: str, loopback: bool):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("header", "name"), [("localhost:8322", "localhost"), ("[::1]:80", "[::1]"),
                                              ("127.0.0.1", "127.0.0.1"), ("Evil.Example:8322", "evil.example"),
                                              ("[::1]", "[::1]")])
def test_host_header_names(header: str, name: str):
    assert host_name(header) == name
