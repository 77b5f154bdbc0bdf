"""Tests for mpubsub._cli: the ``mpubsub`` command against real brokers."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from mpubsub import NetPubSub

from .conftest import BrokerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
MPUBSUB = [sys.executable, "-m", "mpubsub"]


def run(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MPUBSUB, *args, "-c", str(broker.credentials)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def procs() -> Iterator[List[subprocess.Popen[str]]]:
    """Long-running mpubsub commands of a test, always stopped."""
    started: List[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def subscribe(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]], *args: str
) -> subprocess.Popen[str]:
    """Start ``mpubsub sub ARGS`` and wait until the broker has its subscriptions."""
    before = subscriptions(broker)
    proc = subprocess.Popen(
        [*MPUBSUB, "sub", *args, "-c", str(broker.credentials)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    wait_for(lambda: subscriptions(broker) > before, what="the subscriber to subscribe")
    return proc


def subscriptions(broker: BrokerProcess) -> int:
    with NetPubSub.from_file(broker.credentials) as pubsub:
        stats = pubsub.broker_statistics()
    assert stats is not None
    return int(stats["subscriptions"])


def test_pub_sub_readable(broker: BrokerProcess, procs: List[subprocess.Popen[str]]) -> None:
    """sub prints 'topic key=repr' lines; --count exits after N messages."""
    sub = subscribe(broker, procs, "a", "--count", "2")
    assert run(broker, "pub", "a/b", "n=1", "s=hello").returncode == 0
    assert run(broker, "pub", "other", "n=2").returncode == 0
    assert run(broker, "pub", "a").returncode == 0
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out == "a/b n=1 s='hello'\na\n"


def test_pub_sub_json_and_value_parsing(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """VALUEs are JSON when they parse; --json prints one object per line, repr for the rest."""
    sub = subscribe(broker, procs, "--json", "--count", "3")
    pairs = ["n=1", "s=hello", "z=[1, 2]", "f=1.5", "t=true", "none=null", "q='x'"]
    assert run(broker, "pub", "a/b", *pairs).returncode == 0
    assert run(broker, "pub", "/", "--json", '{"k": {"deep": [1]}}').returncode == 0
    with NetPubSub.from_file(broker.credentials) as pubsub:
        pubsub.publish(("py",), raw=b"\x00", items={1, 2})
    out, _ = sub.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {
        "topic": ["a", "b"],
        "message": {
            "n": 1,
            "s": "hello",
            "z": [1, 2],
            "f": 1.5,
            "t": True,
            "none": None,
            "q": "'x'",
        },
    }
    assert lines[1] == {"topic": [], "message": {"k": {"deep": [1]}}}
    assert lines[2] == {"topic": ["py"], "message": {"raw": "b'\\x00'", "items": "{1, 2}"}}


def test_stats_move_after_traffic(broker: BrokerProcess) -> None:
    """stats --json reports the figures; messages and bytes grow with traffic."""
    before = json.loads(run(broker, "stats", "--json").stdout)
    for i in range(5):
        assert run(broker, "pub", "t", f"i={i}").returncode == 0
    after = json.loads(run(broker, "stats", "--json").stdout)
    assert after["messages_in"] == before["messages_in"] + 5
    assert after["bytes_in"] > before["bytes_in"]
    assert after["uptime"] > before["uptime"]
    readable = run(broker, "stats").stdout
    for label in (
        "uptime",
        "clients",
        "messages in",
        "slow consumers cut",
        "connections refused",
        "largest client buffer",
        "messages/s",
    ):
        assert label in readable


def test_ping(broker: BrokerProcess) -> None:
    """ping prints the round trip; exit 0."""
    result = run(broker, "ping", "--count", "2", "--interval", "0")
    assert result.returncode == 0
    assert result.stdout.count("round trip") == 2


def test_errors_are_one_line(broker: BrokerProcess, tmp_path: Path) -> None:
    """Missing file, bad KEY=VALUE, wrong key, broker not running: one line, non-zero."""
    missing = subprocess.run(
        [*MPUBSUB, "ping", "-c", str(tmp_path / "none.pckl")], capture_output=True, text=True
    )
    assert missing.returncode == 1
    path = tmp_path / "none.pckl"
    assert missing.stderr == (
        f"mpubsub: cannot read credentials file {path}: No such file or directory\n"
    )
    bad = run(broker, "pub", "t", "novalue")
    assert (bad.returncode, bad.stderr) == (
        1,
        "mpubsub: bad argument 'novalue': expected KEY=VALUE\n",
    )
    address, _ = broker.creds()
    wrong = tmp_path / "wrong.pckl"
    wrong.write_bytes(pickle.dumps((address, b"not the key")))
    wrong.chmod(0o600)
    result = subprocess.run([*MPUBSUB, "ping", "-c", str(wrong)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == (
        f"mpubsub: the broker at {address} refused the key in {wrong} (a stale credentials file?)\n"
    )
    stale = tmp_path / "stale.pckl"
    stale.write_bytes(broker.credentials.read_bytes())
    stale.chmod(0o600)
    broker.stop()
    result = subprocess.run([*MPUBSUB, "ping", "-c", str(stale)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"mpubsub: cannot reach the broker at {address}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unreadable_credentials_suggest_group(broker: BrokerProcess) -> None:
    """Without permission to read the file, the error says so and points at 'group'."""
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and Debian's /usr/bin/python3")
    base = Path(tempfile.mkdtemp(prefix="mpubsub-cli-"))
    try:
        base.chmod(0o755)
        shutil.copytree(ROOT / "mpubsub", base / "mpubsub")
        secret = base / "broker.pckl"
        shutil.copy(broker.credentials, secret)
        secret.chmod(0o600)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-m",
                "mpubsub",
                "ping",
                "-c",
                str(secret),
            ],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(base)},
            cwd="/",
            timeout=60,
        )
    finally:
        shutil.rmtree(base)
    assert result.returncode == 1
    assert result.stderr == (
        f"mpubsub: cannot read credentials file {secret}: permission denied "
        "(ask for the broker's group, see the 'group' option of mpubsubd)\n"
    )


def test_sub_quiet_on_broken_pipe_and_ctrl_c(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """Piped into a reader that goes away, or interrupted, sub stops without a traceback."""
    piped = subscribe(broker, procs, "t")
    interrupted = subscribe(broker, procs, "t")
    assert run(broker, "pub", "t", "n=1").returncode == 0
    assert piped.stdout is not None and piped.stdout.readline() == "t n=1\n"
    piped.stdout.close()  # the reader is gone
    for n in range(2, 6):
        assert run(broker, "pub", "t", f"n={n}").returncode == 0
    assert piped.wait(timeout=30) == 0
    assert piped.stderr is not None and piped.stderr.read() == ""
    piped.stderr.close()
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=30)
    assert interrupted.returncode == 130 and err == ""


def test_sub_survives_broker_restart(
    broker_factory: Callable[..., BrokerProcess], procs: List[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """After the broker is killed and restarted, sub reconnects, says so, and prints on."""
    address = str(tmp_path / "restart.sock")
    first = broker_factory(address, name="cli")
    sub = subscribe(first, procs, "t", "--count", "2")
    assert run(first, "pub", "t", "n=1").returncode == 0
    first.kill()
    second = broker_factory(address, "--overwrite", name="cli")
    wait_for(lambda: subscriptions(second) > 0, what="sub to reconnect and subscribe")
    assert run(second, "pub", "t", "n=2").returncode == 0
    out, err = sub.communicate(timeout=30)
    assert out == "t n=1\nt n=2\n"
    assert "mpubsub: lost the broker at" in err and "mpubsub: reconnected to the broker at" in err


@pytest.mark.parametrize("command", ["pub", "sub", "stats", "ping"])
def test_help(command: str) -> None:
    """Every subcommand has --help, naming -c/--credentials."""
    result = subprocess.run([*MPUBSUB, command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--credentials" in result.stdout
