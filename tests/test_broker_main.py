"""Tests for mpubsub.broker's command line: ``python -m mpubsub.broker``."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from mpubsub import NetPubSub

from .conftest import BrokerProcess

BROKER = [sys.executable, "-m", "mpubsub.broker"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=30)


def test_help() -> None:
    """--help describes the file and the options, and exits 0."""
    result = run("--help")
    assert result.returncode == 0
    for option in ("FILE", "--overwrite", "--address", "--max-message-size"):
        assert option in result.stdout


def test_existing_file_needs_overwrite(tmp_path: Path) -> None:
    """An existing file is left alone: one line on stderr and a non-zero exit."""
    path = tmp_path / "taken.pckl"
    path.write_bytes(b"keep me")
    result = run(str(path))
    assert result.returncode != 0
    assert result.stderr == f"error: {path} already exists; pass --overwrite to replace it\n"
    assert path.read_bytes() == b"keep me"


def test_unusable_address_is_one_line(tmp_path: Path) -> None:
    """An address the broker cannot listen on is reported without a traceback."""
    result = run(str(tmp_path / "c.pckl"), "--address", str(tmp_path / "no" / "dir.sock"))
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot start the broker: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_credentials_file_lifecycle(
    broker_factory: Callable[..., BrokerProcess], sig: signal.Signals
) -> None:
    """The file is 0600 and works with from_file; a signal stops the broker and removes it."""
    broker = broker_factory()
    assert stat.S_IMODE(broker.credentials.stat().st_mode) == 0o600
    with NetPubSub.from_file(broker.credentials) as pubsub:
        assert pubsub.flush()
    assert broker.proc is not None
    broker.proc.send_signal(sig)
    assert broker.proc.wait(timeout=10) == 0
    assert not broker.credentials.exists()
    assert "Traceback" not in broker.output()


def test_overwrite_replaces_file(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """--overwrite replaces a leftover file with fresh credentials."""
    (tmp_path / "broker.pckl").write_bytes(b"stale")
    broker = broker_factory(None, "--overwrite")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        assert pubsub.flush()


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--route-cache-bytes", "-5", "route_cache_bytes must not be negative"),
        ("--handshake-timeout", "0", "timeout must be positive"),
        ("--max-handshakes", "0", "max_handshakes must be at least 1 and at most 4294967295"),
        ("--max-input-buffer", "10", "max_input_buffer must be at least max_message_size"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, option: str, value: str, reason: str) -> None:
    """A setting the broker cannot work with: one line naming it, and a non-zero exit."""
    result = run(str(tmp_path / "b.pckl"), option, value)
    assert (result.returncode, result.stderr) == (1, f"error: cannot start the broker: {reason}\n")


def test_bad_bridge_key_files_are_one_line(tmp_path: Path) -> None:
    """A bridge key file that is missing, a link, a directory, readable by others or short."""
    good = tmp_path / "key"
    good.write_bytes(b"k" * 32)
    good.chmod(0o600)
    short = tmp_path / "short"
    short.write_bytes(b"k" * 8)
    short.chmod(0o600)
    shared = tmp_path / "shared"
    shared.write_bytes(b"k" * 32)
    shared.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(good)
    cases = {
        tmp_path / "absent": "No such file or directory",
        link: "a symbolic link, not followed",
        tmp_path: "not a regular file",
        shared: "others may read it (mode 644; chmod 600 it)",
    }
    for path, reason in cases.items():
        result = run(str(tmp_path / "b.pckl"), "--bridge-key-file", str(path))
        assert (result.returncode, result.stderr) == (
            1,
            f"error: cannot start the broker: bridge key file {path}: {reason}\n",
        )
    result = run(str(tmp_path / "b.pckl"), "--bridge-key-file", str(short))
    assert result.stderr == "error: cannot start the broker: bridge_key must be at least 16 bytes\n"
