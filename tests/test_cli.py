"""Tests for mpubsub._cli: the ``mpubsub`` command against real brokers."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from mpubsub import NetPubSub
from mpubsub import _protocol as proto
from mpubsub._cli import load_message
from mpubsub._connect import connect_socket, handshake

from . import needs
from .conftest import BrokerProcess, RawBridge, as_nobody, wait_for

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
    broker: BrokerProcess, procs: List[subprocess.Popen[str]], *args: str, topics: int = 1
) -> subprocess.Popen[str]:
    """Start ``mpubsub sub ARGS`` and wait until the broker has its *topics* subscriptions."""
    before = subscriptions(broker)
    proc = subprocess.Popen(
        [*MPUBSUB, "sub", *args, "-c", str(broker.credentials)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)

    def subscribed() -> bool:
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(f"mpubsub sub exited with {proc.returncode}: {proc.stderr.read()}")
        return subscriptions(broker) >= before + topics

    wait_for(subscribed, what="the subscriber to subscribe")
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
        "publishes and subscriptions refused",
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
    """Missing file, bad KEY=VALUE, too deep a topic, wrong key, no broker: one line, non-zero."""
    missing = subprocess.run(
        [*MPUBSUB, "ping", "-c", str(tmp_path / "none.pckl")], capture_output=True, text=True
    )
    assert missing.returncode == 1
    path = tmp_path / "none.pckl"
    assert missing.stderr == (
        f"mpubsub: cannot read credentials file {path}: No such file or directory\n"
    )
    deep = run(broker, "sub", "/".join(["a"] * 129))
    assert (deep.returncode, deep.stderr) == (
        1,
        f"mpubsub: cannot subscribe to {'/'.join(['a'] * 129)!r}: topic of 129 elements "
        "exceeds the broker's limit of 128 elements\n",
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
    for command in ("ping", "clients"):
        result = subprocess.run(
            [*MPUBSUB, command, "-c", str(stale)], capture_output=True, text=True
        )
        assert result.returncode == 1
        assert result.stderr.startswith(f"mpubsub: cannot reach the broker at {address}: ")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unreadable_credentials_suggest_group(broker: BrokerProcess) -> None:
    """Without permission to read the file, the error says so and points at 'group'."""
    needs.check_other_users()
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
    assert sub.stdout is not None and sub.stdout.readline() == "t n=1\n"  # before the kill
    first.kill()
    second = broker_factory(address, "--overwrite", name="cli")
    wait_for(lambda: subscriptions(second) > 0, what="sub to reconnect and subscribe")
    assert run(second, "pub", "t", "n=2").returncode == 0
    out, err = sub.communicate(timeout=30)
    assert out == "t n=2\n"
    assert "mpubsub: lost the broker at" in err and "mpubsub: reconnected to the broker at" in err


@pytest.mark.parametrize("command", ["pub", "sub", "stats", "ping", "clients"])
def test_help(command: str) -> None:
    """Every subcommand has --help, naming -c/--credentials."""
    result = subprocess.run([*MPUBSUB, command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--credentials" in result.stdout


def test_help_of_the_command_names_credentials_and_clients() -> None:
    """mpubsub --help shows -c/--credentials before the subcommand, and the clients command."""
    result = subprocess.run([*MPUBSUB, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--credentials" in result.stdout and "clients" in result.stdout


class Runs:
    """Pickles as a call of *func* with *args*: what unpickling it runs."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        return self.func, self.args


def publish_raw(broker: BrokerProcess, topic: Tuple[str, ...], *payloads: bytes) -> None:
    """Publish *payloads* as they are, not pickled by NetPubSub; return once the broker has them."""
    address, authkey = broker.creds()
    with connect_socket(address, 5.0) as sock:
        handshake(sock, authkey)
        encoded = proto.encode_topic(topic)
        frames = [proto.pub_frame(encoded, payload) for payload in payloads]
        sock.sendall(b"".join([*frames, proto.frame(proto.PING, b"")]))
        decoder = proto.FrameDecoder(proto.DEFAULT_MAX_MESSAGE)
        while not any(kind == proto.PONG for kind, _ in decoder.feed(sock.recv(65536))):
            pass


def test_sub_shows_pickled_code_as_a_notice(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """A message whose pickle would call os.system is a notice in its place; nothing runs."""
    marker = tmp_path / "ran"
    text = subscribe(broker, procs, "t", "--count", "2")
    as_json = subscribe(broker, procs, "t", "--json", "--count", "2")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        pubsub.publish(("t", "x"), evil=Runs(os.system, f"touch {marker}"))
        pubsub.publish(("t",), n=1, z=1 + 2j, s={1}, b=bytearray(b"x"))  # plain data
    notice = f"global {os.system.__module__}.system is not allowed; --unsafe-pickle loads it"
    plain = "n=1 z=(1+2j) s={1} b=bytearray(b'x')"
    assert text.communicate(timeout=30) == (f"t/x <not shown: {notice}>\nt {plain}\n", "")
    out, err = as_json.communicate(timeout=30)
    assert err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": ["t", "x"], "not_shown": notice},
        {"topic": ["t"], "message": {"n": 1, "z": "(1+2j)", "s": "{1}", "b": "bytearray(b'x')"}},
    ]
    assert not marker.exists()


def test_sub_unsafe_pickle_loads_globals(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """With --unsafe-pickle, sub unpickles a call of a function; --help says what that risks."""
    marker = tmp_path / "touched"
    sub = subscribe(broker, procs, "t", "--unsafe-pickle", "--count", "1")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        pubsub.publish(("t",), x=Runs(pathlib.Path.touch, marker))
    assert sub.communicate(timeout=30) == ("t x=None\n", "")
    assert marker.exists()
    usage = subprocess.run([*MPUBSUB, "sub", "--help"], capture_output=True, text=True).stdout
    assert "whoever can publish can run code as you" in " ".join(usage.split())


def test_sub_escapes_control_characters(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """Newlines, escape sequences, bidi overrides in topics, keys and values stay on one line."""
    nasty = "a\nb\x1b]0;title\x07\u202e\u2028\x7f\x85\\"
    escaped = "a\\x0ab\\x1b]0;title\\x07\\u202e\\u2028\\x7f\\x85\\\\"
    topic = ("t", nasty + "\ud800")  # and a lone surrogate, which cannot even be encoded
    text = subscribe(broker, procs, "t", "--count", "1")
    as_json = subscribe(broker, procs, "t", "--json", "--count", "1")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        pubsub.publish(topic, **{"k" + nasty: nasty})
    out, err = text.communicate(timeout=30)
    assert (out, err) == (f"t/{escaped}\\ud800 k{escaped}={nasty!r}\n", "")
    out, err = as_json.communicate(timeout=30)
    assert err == "" and out.endswith("\n") and out[:-1].isprintable() and out.isascii()
    assert json.loads(out) == {"topic": list(topic), "message": {"k" + nasty: nasty}}


def test_sub_shows_what_it_cannot_print_as_notices(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """A payload that is no message, garbage, a huge int or deep nesting: notices, sub goes on."""
    depth = 100_000
    deep = b"\x80\x05}\x8c\x01d" + b"]" * depth + b"a" * (depth - 1) + b"s."  # {'d': [[[...]]]}
    text = subscribe(broker, procs, "t", "--count", "5")
    as_json = subscribe(broker, procs, "t", "--json", "--count", "5")
    publish_raw(broker, ("t",), pickle.dumps([1, 2], protocol=5), b"\x00garbage", deep)
    with NetPubSub.from_file(broker.credentials) as pubsub:
        pubsub.publish(("t",), n=10**5000)
        pubsub.publish(("t",), n=1)
    too_long = (
        "Exceeds the limit (4300 digits) for integer string conversion; "
        "use sys.set_int_max_str_digits() to increase the limit"
    )
    out, err = text.communicate(timeout=30)
    assert err == ""
    assert out.splitlines() == [
        "t <not shown: not a message (a dict with str keys)>",
        "t <not shown: cannot unpickle: invalid load key, '\\\\x00'.>",  # its backslash too
        "t d=<not shown: nested too deeply>",
        f"t n=<not shown: {too_long}>",
        "t n=1",
    ]
    out, err = as_json.communicate(timeout=30)
    assert err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        {"topic": ["t"], "not_shown": "not a message (a dict with str keys)"},
        {"topic": ["t"], "not_shown": "cannot unpickle: invalid load key, '\\x00'."},
        {"topic": ["t"], "message": {"d": "<not shown: nested too deeply>"}},
        {"topic": ["t"], "message": {"n": f"<not shown: {too_long}>"}},
        {"topic": ["t"], "message": {"n": 1}},
    ]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (pickle.dumps({"b": bytearray(3)}), "global builtins.bytearray is not allowed"),
        (pickle.dumps({1: "x"}), "not a message (a dict with str keys)"),
    ],
)
def test_sub_loads_plain_dicts_of_str_only(payload: bytes, reason: str) -> None:
    """Not a global beyond complex (not bytearray: a tiny pickle of 10 GB), and str keys only."""
    shown = load_message(payload)
    assert list(shown) == ["not_shown"] and reason in shown["not_shown"].reason


def test_sub_count_stops_at_n_even_after_a_burst(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """--count 3 prints three lines, however many messages arrive in one read."""
    sub = subscribe(broker, procs, "burst", "--count", "3")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        for n in range(10):
            pubsub.publish(("burst",), n=n)
    out, err = sub.communicate(timeout=30)
    assert (sub.returncode, out) == (0, "burst n=0\nburst n=1\nburst n=2\n"), err


def test_sub_to_two_topics_prints_a_broadcast_once(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """A broadcast reaches `sub a b` once, and each topic's messages once."""
    sub = subscribe(broker, procs, "a", "b", "--count", "3", topics=2)
    assert run(broker, "pub", "/", "n=0").returncode == 0
    assert run(broker, "pub", "a", "n=1").returncode == 0
    assert run(broker, "pub", "b/c", "n=2").returncode == 0
    out, err = sub.communicate(timeout=30)
    assert (sub.returncode, out) == (0, "/ n=0\na n=1\nb/c n=2\n"), err


@pytest.mark.parametrize(
    "args, message",
    [
        (["stats", "--watch", "-1"], "argument --watch: not a number of seconds above 0: '-1'"),
        (["stats", "--watch", "nan"], "argument --watch: not a number of seconds above 0: 'nan'"),
        (["stats", "--watch", "0"], "argument --watch: not a number of seconds above 0: '0'"),
        (["ping", "--interval", "-2"], "argument --interval: not a number of seconds: '-2'"),
        (["ping", "--interval", "inf"], "argument --interval: not a number of seconds: 'inf'"),
        (["sub", "--count", "0"], "argument --count: not a whole number above 0: '0'"),
        (["sub", "--count", "-1"], "argument --count: not a whole number above 0: '-1'"),
        (["ping", "--count", "0"], "argument --count: not a whole number above 0: '0'"),
    ],
)
def test_counts_and_intervals_that_mean_nothing_are_refused(args: List[str], message: str) -> None:
    """A negative, zero or not-a-number interval or count is a usage error, not a traceback
    (stats --watch -1 was one) nor a loop that never sleeps (stats --watch 0 was one)."""
    result = subprocess.run(
        [*MPUBSUB, *args, "-c", "/nonexistent"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"mpubsub {args[0]}: error: {message}"
    assert result.stdout == ""


def table(text: str) -> List[Dict[str, Any]]:
    """The rows of ``mpubsub clients``, as {column: cell}; "topics": the indented lines below."""
    header, *lines = text.splitlines()
    columns = re.split(r" {2,}", header)
    rows: List[Dict[str, Any]] = []
    for line in lines:
        if line.startswith(" "):
            rows[-1]["topics"].append(line)
        else:
            cells = re.split(r" {2,}", line)
            assert len(cells) == len(columns), text
            rows.append({**dict(zip(columns, cells)), "topics": []})
    return rows


def attached(bridge: RawBridge) -> RawBridge:
    """*bridge*, once the broker has taken it as its federation bridge."""
    bridge.sock.sendall(proto.frame(proto.PING, b""))
    assert bridge.receive(1)[-1][0] == proto.PONG
    return bridge


@pytest.mark.parametrize("broker", ["unix"], indirect=True)
def test_clients_lists_each_connection(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """clients shows a row per connection: pid, user, subscriptions, the bridge marked."""
    bridge = attached(RawBridge(broker))
    try:
        two = subscribe(broker, procs, "a", "b/c", topics=2)
        one = subscribe(broker, procs, "d")
        result = run(broker, "clients")
    finally:
        bridge.sock.close()
    assert (result.returncode, result.stderr) == (0, "")
    rows = table(result.stdout)
    assert len(rows) == 4  # the two subs, the bridge, and clients itself
    by_pid = {row["PID"]: row for row in rows}
    for sub, subscriptions in ((two, "2"), (one, "1")):
        row = by_pid[str(sub.pid)]
        assert row["SUBS"] == subscriptions and row["ROLE"] == "client"
        assert (row["USER"], row["UID"], row["ADDRESS"]) == ("root", "0", "-")
        assert row["COMMAND"].startswith("python") and re.fullmatch(r"\d+s", row["CONNECTED"])
        assert row["DENIED"] == row["DROPPED"] == "0" and row["WAITING"] == "0 B"
        assert row["topics"] == []  # only with -v
    assert [row["ROLE"] for row in rows].count("bridge") == 1  # known as the federation, not by pid


@pytest.mark.parametrize("broker", ["unix"], indirect=True)
def test_clients_verbose_shows_topics(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """clients -v lists each connection's topics under its row, '/' for the catch-all."""
    sub = subscribe(broker, procs, "b/c", "a", topics=2)
    everything = subscribe(broker, procs)
    result = run(broker, "clients", "-v")
    assert (result.returncode, result.stderr) == (0, "")
    rows = {row["PID"]: row for row in table(result.stdout)}
    assert rows[str(sub.pid)]["topics"] == ["    a", "    b/c"]
    assert rows[str(everything.pid)]["topics"] == ["    /"]
    assert sum(len(row["topics"]) for row in rows.values()) == 3  # clients itself has none


def test_clients_json_holds_every_figure(
    broker: BrokerProcess, procs: List[subprocess.Popen[str]]
) -> None:
    """clients --json is one JSON array of the broker's figures, a dict per connection."""
    sub = subscribe(broker, procs, "t", "--count", "2")
    assert run(broker, "pub", "t", "n=1").returncode == 0
    assert sub.stdout is not None and sub.stdout.readline() == "t n=1\n"
    result = run(broker, "clients", "--json")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.count("\n") == 1
    listed = json.loads(result.stdout)
    keys = {
        "id", "user", "uid", "gid", "pid", "command", "address", "since", "bridge",
        "subscriptions", "topics", "messages_in", "bytes_in", "messages_out", "bytes_out",
        "waiting", "denied", "dropped",
    }  # fmt: skip
    assert len(listed) == 2 and all(set(client) == keys for client in listed)
    (entry,) = [client for client in listed if client["topics"] == ["t"]]
    assert entry["subscriptions"] == 1 and entry["bridge"] is False
    assert entry["messages_out"] == 1 and entry["bytes_out"] > 0
    if isinstance(broker.creds()[0], str):  # a Unix socket: the kernel says who
        assert (entry["pid"], entry["uid"], entry["address"]) == (sub.pid, 0, None)
    else:
        assert entry["pid"] is None and entry["address"].startswith("127.0.0.1:")


def test_credentials_from_the_environment(broker: BrokerProcess, tmp_path: Path) -> None:
    """Without -c, $MPUBSUB_CREDENTIALS names the file, whatever characters its path holds."""
    odd = tmp_path / "50% {odd}.pckl"
    shutil.copy(broker.credentials, odd)
    result = subprocess.run(
        [*MPUBSUB, "ping"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MPUBSUB_CREDENTIALS": str(odd)},
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_credentials_before_the_subcommand(broker: BrokerProcess) -> None:
    """-c works before the subcommand too; given in both places, the one after wins."""
    credentials = str(broker.credentials)
    elsewhere = {**os.environ, "MPUBSUB_CREDENTIALS": "/nonexistent/env.pckl"}

    def mpubsub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MPUBSUB, *args], capture_output=True, text=True, timeout=60, env=elsewhere
        )

    for args in (["stats", "--json"], ["pub", "t", "n=1"], ["clients", "--json"], ["ping"]):
        result = mpubsub("-c", credentials, *args)
        assert (result.returncode, result.stderr) == (0, ""), args
    assert json.loads(mpubsub("--credentials", credentials, "stats", "--json").stdout)
    assert mpubsub("-c", "/nonexistent/before.pckl", "ping", "-c", credentials).returncode == 0
    after = mpubsub("-c", credentials, "ping", "-c", "/nonexistent/after.pckl")
    assert (after.returncode, after.stderr) == (
        1,
        "mpubsub: cannot read credentials file /nonexistent/after.pckl: "
        "No such file or directory\n",
    )


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (["pub", "secret/x", "n=1"], "publish on secret/x"),
        (["sub", "secret", "--count", "1"], "subscribe to secret"),
    ],
)
def test_refused_by_the_policy_is_one_line(
    library: Path, helpers: Callable[..., subprocess.Popen[str]], command: List[str], line: str
) -> None:
    """A publish or subscription the policy refuses: one line naming it, exit 1, no traceback."""
    needs.check_other_users()
    credentials = library / "broker.pckl"
    helpers(
        "policy_broker",
        credentials,
        library / "broker.sock",
        "* publish=!secret",
        "* subscribe=!secret",
    )
    refused = subprocess.run(
        as_nobody("-m", "mpubsub", *command, "-c", str(credentials)),
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(library)},
        cwd="/",
        timeout=60,
    )
    assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
    assert refused.stderr == f"mpubsub: the broker refused to {line}: the policy forbids it\n"


def test_clients_refused_without_the_admin_right(
    library: Path, helpers: Callable[..., subprocess.Popen[str]]
) -> None:
    """A user without the admin right on / gets one line naming it, exit 1; root lists."""
    needs.check_other_users()
    credentials = library / "broker.pckl"
    helpers("policy_broker", credentials, library / "broker.sock", "default=allow", "* admin=!/")
    refused = subprocess.Popen(
        as_nobody("-m", "mpubsub", "clients", "-c", str(credentials)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(library)},
        cwd="/",
    )
    out, err = refused.communicate(timeout=60)
    assert (refused.returncode, out) == (1, ""), err
    assert re.fullmatch(
        rf"mpubsub: the broker refused: client \d+ \(uid 65534 nobody, pid {refused.pid} "
        r"python3\) may not list clients: it needs the admin right on /\n",
        err,
    ), err
    root = subprocess.run(
        [*MPUBSUB, "clients", "--json", "-c", str(credentials)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert root.returncode == 0 and len(json.loads(root.stdout)) == 1, root.stderr
