"""Tests for mpubsubd._config: the configuration file and its checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpubsubd._config import Config, ConfigError, load, read_authkey

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mpubsubd.conf"
    path.write_text("[mpubsubd]\n" + body)
    return str(path)


def test_shipped_file_documents_the_defaults() -> None:
    """etc/mpubsubd.conf sets every key, to exactly the built-in defaults."""
    text = (ROOT / "etc" / "mpubsubd.conf").read_text()
    assert load(str(ROOT / "etc" / "mpubsubd.conf")) == Config()
    for key in Config.__dataclass_fields__:
        assert f"\n{key} =" in text, f"{key} is not documented"


def test_values_are_read(tmp_path: Path) -> None:
    """Keys override the defaults; the address may be TCP."""
    config = load(write(tmp_path, "address = 127.0.0.1:7000\nlog_level = debug\ngroup = users\n"))
    assert config.broker_address == ("127.0.0.1", 7000)
    assert config.log_level == "DEBUG" and config.gid == 100
    assert config.pidfile == Config().pidfile


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "log_level = LOUD",
            r"log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL$",
        ),
        ("max_buffer = lots", r"max_buffer: 'lots' is not a whole number of bytes$"),
        ("max_message_size = 0", r"max_message_size: '0' must be positive$"),
        ("handshake_timeout = -1", r"handshake_timeout: '-1' must be positive$"),
        ("group = no-such-group-here", r"group: no group named 'no-such-group-here'$"),
        ("address = relative.sock", r"address: 'relative.sock' is neither an absolute socket path"),
        ("pidfile = run/x.pid", r"pidfile: 'run/x.pid' is not an absolute path$"),
        ("colour = blue", r"unknown key 'colour' in \[mpubsubd\]$"),
        (
            "max_message_size = 100\nmax_buffer = 10",
            r"max_buffer: must be at least max_message_size$",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    """Each bad value is a ConfigError naming the file and the key."""
    path = write(tmp_path, body + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load(path)


def test_missing_files(tmp_path: Path) -> None:
    """A missing explicit file is an error; a file without the section too."""
    with pytest.raises(ConfigError, match=r"no such file$"):
        load(str(tmp_path / "absent.conf"))
    other = tmp_path / "other.conf"
    other.write_text("[other]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"no \[mpubsubd\] section$"):
        load(str(other))


def test_authkey_file(tmp_path: Path) -> None:
    """A stable key is read from a file only its owner can read."""
    key = tmp_path / "authkey"
    key.write_bytes(b"0123456789abcdef")
    key.chmod(0o600)
    assert read_authkey(str(key)) == b"0123456789abcdef"
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"must be readable by its owner only \(mode 640"):
        read_authkey(str(key))
    key.write_bytes(b"\n")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match=r"is empty$"):
        read_authkey(str(key))
