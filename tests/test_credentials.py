"""Tests for mpubsub._credentials: which credentials files a client trusts."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from mpubsub import CredentialsError, NetPubSub
from mpubsub._credentials import read_credentials, write_credentials

from . import needs
from .conftest import (
    BrokerProcess,
    as_nobody,
    subscribed,
    wait_for,
)
from .processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def refusal(path: Path, reason: str) -> str:
    """The exact-match pattern of the CredentialsError refusing *path* for *reason*."""
    return f"^{re.escape(f'refusing credentials file {path}: {reason}')}$"


def good_file(path: Path) -> Path:
    """A well-formed credentials file at *path*, written as the broker writes it."""
    write_credentials(path, "/nonexistent/broker.sock", b"k" * 32, overwrite=False)
    return path


def needs_root_and_nobody() -> None:
    needs.check_other_users()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp (mode 1777); removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="mpubsub-shared-"))
    base.chmod(0o1777)
    yield base
    shutil.rmtree(base)


def test_refuses_a_file_another_user_owns(tmp_path: Path) -> None:
    """A credentials file owned by neither root nor the caller is refused, naming its owner."""
    needs.OTHER_USERS.check(needs.as_root())
    path = good_file(tmp_path / "broker.pckl")
    os.chown(path, NOBODY, -1)
    reason = f"owned by uid {NOBODY}, not by root or you (uid 0)"
    with pytest.raises(CredentialsError, match=refusal(path, reason)):
        read_credentials(path)


def test_a_user_trusts_its_own_and_roots_files_only(library: Path) -> None:
    """Run as nobody, a client reads files of nobody and of root, and refuses another user's."""
    needs_root_and_nobody()
    own, roots, others = (good_file(library / name) for name in ("own", "root", "other"))
    os.chown(own, NOBODY, -1)
    os.chown(others, 12345, -1)
    for path in (own, roots, others):
        path.chmod(0o644)
    code = (
        "import sys\n"
        "from mpubsub import CredentialsError\n"
        "from mpubsub._credentials import read_credentials\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        print('read', read_credentials(path)[0])\n"
        "    except CredentialsError as exc:\n"
        "        print(exc)\n"
    )
    result = subprocess.run(
        as_nobody("-c", code, str(own), str(roots), str(others)),
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(library)},
        cwd="/",
        timeout=60,
    )
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "read /nonexistent/broker.sock",
        "read /nonexistent/broker.sock",
        f"refusing credentials file {others}: owned by uid 12345, not by root or you "
        f"(uid {NOBODY})",
    ]


def test_refuses_a_symbolic_link(tmp_path: Path) -> None:
    """A credentials file that is a symbolic link is refused, even to a good file."""
    target = good_file(tmp_path / "broker.pckl")
    link = tmp_path / "link.pckl"
    link.symlink_to(target)
    with pytest.raises(CredentialsError, match=refusal(link, "it is a symbolic link")):
        read_credentials(link)
    (tmp_path / "dir").symlink_to(tmp_path)  # links above the file itself are followed
    assert read_credentials(tmp_path / "dir" / "broker.pckl")[1] == b"k" * 32


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=lambda mode: f"{mode:o}")
def test_refuses_a_file_group_or_others_can_write(tmp_path: Path, mode: int) -> None:
    """A credentials file that group or others can write is refused, with its mode."""
    path = good_file(tmp_path / "broker.pckl")
    path.chmod(mode)
    reason = f"group or others can write it (mode {mode:o})"
    with pytest.raises(CredentialsError, match=refusal(path, reason)):
        read_credentials(path)


def test_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """A directory, a device or a FIFO is refused at once (a FIFO without a writer too)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path in (tmp_path, Path("/dev/null"), fifo):
        with pytest.raises(CredentialsError, match=refusal(path, "not a regular file")):
            read_credentials(path)


def test_root_client_never_reconnects_to_a_broker_nobody_planted(
    shared: Path, library: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once root's broker stops, nobody's broker in the same sticky directory is never trusted.

    nobody plants its own credentials file where the broker's was, runs a broker
    there and publishes a pickle that would run a command: root's client keeps
    refusing the file and never runs the command.
    """
    needs_root_and_nobody()
    caplog.set_level(logging.DEBUG, logger="mpubsub.net")
    credentials = shared / "broker.pckl"
    marker = tmp_path / "ran-as-root"  # in a directory only root can write
    broker = BrokerProcess(credentials, str(shared / "broker.sock"), [], [])
    env = {"PYTHONPATH": str(library)}
    rogue_log = tmp_path / "rogue.log"
    rogue = publisher = None

    def refusals() -> int:
        reason = f"refusing credentials file {credentials}: owned by uid {NOBODY}"
        return sum(reason in record.getMessage() for record in caplog.records)

    try:
        broker.start()
        with NetPubSub.from_file(credentials) as client:
            got = subscribed(client, ("t",))
            broker.stop()
            assert not credentials.exists()
            with open(rogue_log, "wb") as log:
                rogue = subprocess.Popen(
                    as_nobody("-m", "mpubsub.broker", str(credentials), "-v"),
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd="/",
                )
            wait_for(
                lambda: "broker listening on" in rogue_log.read_text(),
                what="nobody's broker to listen",
            )
            assert credentials.stat().st_uid == NOBODY

            def tried_the_rogue() -> bool:
                client.poll(0.05)
                return client.connected or refusals() > 0

            wait_for(tried_the_rogue, 30, "root's client to try nobody's broker")
            code = (
                "import os, sys, time\n"
                "from mpubsub import NetPubSub\n"
                "class Evil:\n"
                "    def __reduce__(self):\n"
                f"        return (os.system, ('touch {marker}',))\n"
                "pubsub = NetPubSub.from_file(sys.argv[1])\n"
                "pubsub.connect()\n"
                "while True:\n"
                "    pubsub.publish(('t',), x=Evil())\n"
                "    pubsub.flush()\n"
                "    print('published', flush=True)\n"
                "    time.sleep(0.05)\n"
            )
            publisher = subprocess.Popen(
                as_nobody("-c", code, str(credentials)),
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd="/",
            )
            assert publisher.stdout is not None
            assert publisher.stdout.readline() == "published\n"
            before = refusals()

            def ran_or_refused_again() -> bool:
                client.poll(0.05)
                return marker.exists() or refusals() > before

            wait_for(ran_or_refused_again, 30, "root's client to refuse nobody's file again")
            assert not marker.exists(), "nobody's pickle ran a command as root"
            assert got == [] and not client.connected
    finally:
        stop_process(publisher)
        if publisher is not None and publisher.stdout is not None:
            publisher.stdout.close()
        stop_process(rogue)
        broker.stop()


def test_a_key_that_is_not_bytes_is_refused(tmp_path: Path) -> None:
    """An (address, authkey) pickle whose key is a string: one line, no connection attempt."""
    path = tmp_path / "str-key.pckl"
    path.write_bytes(pickle.dumps(("/run/x.sock", "not bytes")))
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match=r"holds no authkey bytes$"):
        read_credentials(path)
