"""mpubsubd's federation against hostile peers (THREATS.md 2 and 4), with real processes.

A group member who tries to take the bridge's place; anyone who can publish
on NATS without the secret, replaying envelopes or sending subjects that are
not UTF-8 or hold terminal escapes; a subscriber whose topic NATS cannot
carry; a NATS server that stops answering.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import read_credentials
from mpubsubd._federation import Signer

from .conftest import (
    wait_for,
)
from .processes import NatsServer
from .test_bridge import (  # noqa: F401  (pytestmark: skipped without nats-server)
    SECRET,
    Federation,
    Host,
    _publish_raw,
    collect,
    federated,
    pump,
    pytestmark,
    reach,
    real,
)
from .test_hostile import closed_with_error


@pytest.fixture
def federation() -> Iterator[Federation]:
    with federated() as fed:
        yield fed


def bridge_pid(host: Host) -> int:
    """The pid of the host's newest bridge process."""
    return int(re.findall(r"federation bridge started \(pid (\d+)\)", host.output())[-1])


def restart_bridge(host: Host) -> None:
    """Kill the host's bridge; return once mpubsubd's next one is connected to NATS."""
    old = bridge_pid(host)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: bridge_pid(host) != old, what=f"{host.name}'s bridge restarted")
    host.wait_state("connected")


def undisturbed(*hosts: Host) -> None:
    """Each host kept its NATS connection and its first bridge."""
    for host in hosts:
        assert host.federation()["reconnects"] == 0
        assert len(re.findall("federation bridge started", host.output())) == 1


def nats_with_control_line(federation: Federation, size: int) -> NatsServer:
    """A nats-server whose max_control_line is *size*."""
    limits = federation.base / "nats.conf"
    limits.write_text(f"max_control_line: {size}\n")
    return federation.nats("nats", "-c", str(limits))


def raw_nats(port: int, commands: bytes) -> None:
    """Send protocol *commands* to nats-server on a plain socket, as any NATS user could."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        hello = b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
        sock.sendall(hello + commands + b"PING\r\n")
        while (line := reader.readline()) != b"PONG\r\n":
            assert line and not line.startswith(b"-ERR"), line


def test_only_mpubsubds_own_bridge_is_the_bridge(federation: Federation) -> None:
    """A group member who says BRIDGE first is refused; mpubsubd's bridge federates."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    first = bridge_pid(a)
    os.kill(first, signal.SIGKILL)  # the claimer now has half a second to step in
    wait_for(lambda: "the federation bridge is gone" in a.output(), what="the bridge gone")
    address, authkey = read_credentials(a.credentials)
    for guess in (bytes(32), b"k" * 32, b"", authkey):  # mpubsubd's is random at each start
        with connect_socket(address, 10) as claimer:
            handshake(claimer, authkey)
            forged = {"state": "connected", "server": "forged"}
            claimer.sendall(
                proto.frame(proto.BRIDGE, guess)
                + proto.frame(proto.FEDERATION, json.dumps(forged).encode())
            )
            assert closed_with_error(claimer).startswith("BRIDGE refused")
    wait_for(lambda: bridge_pid(a) != first, what="mpubsubd's next bridge")
    assert a.wait_state("connected")["server"] == nats.url
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("t",))
    reach(pub_a, ("t",), got, [pub_a, sub_b])
    assert "BRIDGE refused" in a.output()


def test_replays_of_two_bridge_instances_are_delivered_once(
    federation: Federation, helpers: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Envelopes of two starts of a bridge, replayed alternately: none is delivered again."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("r",))
    reach(pub_a, ("r",), got, [pub_a, sub_b])
    tapped = tmp_path / "tapped.pckl"
    tap = helpers("nats_tap", nats.url, "mpubsub.r.*", tapped)
    for start in (1, 2):
        if start == 2:
            restart_bridge(a)
            reach(pub_a, ("r",), got, [pub_a, sub_b])
        for n in range(3):
            pub_a.publish(("r", str(start)), n=n)
        assert pub_a.flush()
        wanted = 3 * start
        pump([sub_b], lambda: len(real(got)) == wanted, f"start {start}'s")  # noqa: B023
    tap.send_signal(signal.SIGTERM)
    tap.communicate(timeout=30)
    recorded: List[Tuple[str, bytes]] = pickle.loads(tapped.read_bytes())
    by_subject: Dict[str, List[bytes]] = {}
    for name, body in recorded:
        by_subject.setdefault(name, []).append(body)
    assert sorted(by_subject) == ["mpubsub.r.1", "mpubsub.r.2"]
    first, second = by_subject["mpubsub.r.1"], by_subject["mpubsub.r.2"]
    assert len(first) == len(second) == 3
    replays = [
        (f"mpubsub.r.{i}", body)
        for _ in range(5)
        for pair in zip(first, second)
        for i, body in enumerate(pair, 1)
    ]
    asyncio.run(_publish_raw(nats.url, replays))
    pub_a.publish(("r", "end"), n=0)
    assert pub_a.flush()
    pump([sub_b], lambda: (("r", "end"), {"n": 0}) in got, "the message after the replays")
    delivered = sorted((topic, m["n"]) for topic, m in real(got))
    assert delivered == [(("r", i), n) for i in ("1", "2") for n in range(3)] + [(("r", "end"), 0)]
    wait_for(lambda: b.federation()["duplicates"] >= len(replays), what="replays counted")
    # The receiver's bridge restarted, its windows empty: still nothing taken again.
    restart_bridge(b)
    reach(pub_a, ("r",), got, [pub_a, sub_b])
    asyncio.run(_publish_raw(nats.url, replays))
    pub_a.publish(("r", "end"), n=1)
    assert pub_a.flush()
    pump([sub_b], lambda: (("r", "end"), {"n": 1}) in got, "the message after the replays")
    assert len(real(got)) == len(delivered) + 1
    wait_for(lambda: b.federation()["dropped_unverified"] >= len(replays), what="replays counted")
    assert "sent before this bridge started" in b.output()


def test_envelopes_far_from_the_clock_are_refused(federation: Federation) -> None:
    """An envelope stamped further than max_clock_skew from the receiver's clock is refused."""
    nats = federation.nats()
    b = federation.host("b", nats.url, max_clock_skew="1")
    sub_b = b.client()
    stale = Signer(SECRET, "a", clock=lambda: time.time_ns() + 2 * 10**9)  # clocks apart
    fresh = Signer(SECRET, "a")
    got = collect(sub_b, ("s",))
    wait_for(lambda: b.federation()["nats_subscriptions"] == 3, what="b's subscriptions")
    topic = proto.encode_topic(("s",))
    asyncio.run(
        _publish_raw(
            nats.url,
            [
                ("mpubsub.s", stale.seal(topic, pickle.dumps({"n": 1}))),
                ("mpubsub.s", fresh.seal(topic, pickle.dumps({"n": 2}))),
            ],
        )
    )
    pump([sub_b], lambda: got, "the fresh one")
    assert got == [(("s",), {"n": 2})]
    wait_for(lambda: b.federation()["dropped_unverified"] == 1, what="the other one dropped")
    assert "further from now than max_clock_skew" in b.output()


def test_a_subject_that_is_not_utf8_or_holds_escapes_stops_and_forges_nothing(
    federation: Federation,
) -> None:
    """Odd subjects published on NATS are dropped and logged escaped; federation carries on."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub_a, sub_a, sub_b = a.client(), a.client(), b.client()
    got_a, got_b = collect(sub_a, ("w",)), collect(sub_b, ("x",))
    reach(sub_b, ("w",), got_a, [sub_a, sub_b])
    reach(pub_a, ("x",), got_b, [pub_a, sub_b])
    raw_nats(
        int(nats.url.rsplit(":", 1)[1]),
        b"PUB mpubsub.x.\xff\xfe 1\r\nx\r\n"  # for b
        b"PUB mpubsub.w.\x1b]0;pwned\x07 1\r\nx\r\n",  # for a
    )
    wait_for(
        lambda: a.federation()["dropped_unverified"] == b.federation()["dropped_unverified"] == 1,
        what="the odd subjects dropped",
    )
    pub_a.publish(("x",), n=1)
    assert pub_a.flush()
    pump([sub_b], lambda: (("x",), {"n": 1}) in got_b, "a message after the odd subjects")
    assert b.federation()["reconnects"] == 0
    for host in (a, b):
        assert "\x1b" not in host.output() and "\x07" not in host.output()
    assert "on mpubsub.w.\\x1b]0;pwned\\x07: malformed subject token" in a.output()
    assert "on mpubsub.x.\\udcff\\udcfe: malformed subject token" in b.output()


def test_a_nats_server_that_stops_answering_is_not_connected(federation: Federation) -> None:
    """NATS frozen: `mpubsub stats` says "not answering" within seconds, then connected again."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    assert nats.proc is not None
    os.kill(nats.proc.pid, signal.SIGSTOP)
    try:
        a.wait_state("not answering", 15)
    finally:
        os.kill(nats.proc.pid, signal.SIGCONT)
    a.wait_state("connected", 10)
    assert a.federation()["reconnects"] == 0  # the same connection, answering again
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("y",))
    reach(pub_a, ("y",), got, [pub_a, sub_b])
    log = a.output()
    assert "does not answer" in log and f"NATS at {nats.url} answers again" in log


def test_a_nats_server_frozen_for_long_is_left_for_a_new_connection(
    federation: Federation,
) -> None:
    """NATS frozen past the keep-alive: not answering, then disconnected, then reconnected."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    assert nats.proc is not None
    os.kill(nats.proc.pid, signal.SIGSTOP)
    try:
        a.wait_state("not answering", 15)
        a.wait_state("disconnected", 40)  # three keep-alive PINGs five seconds apart
    finally:
        os.kill(nats.proc.pid, signal.SIGCONT)
    assert a.wait_state("connected", 20)["reconnects"] >= 1
    assert "disconnected from NATS; reconnecting" in a.output()


def test_a_topic_too_long_for_nats_stays_local(federation: Federation) -> None:
    """A topic whose subject is over NATS's control line is neither asked for nor sent."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    long = ("\u00e9" * 1000,)  # 2,000 bytes of UTF-8, a 6,000-character subject
    pub_a, local_a, sub_b = a.client(), a.client(), b.client()
    far = collect(sub_b, long)
    near = collect(local_a, long)
    got = collect(sub_b, ("x",))
    reach(pub_a, ("x",), got, [pub_a, sub_b])
    pub_a.publish(long, n=1)
    pub_a.publish(("x",), n=2)
    assert pub_a.flush()
    pump([local_a, sub_b], lambda: near and (("x",), {"n": 2}) in got, "the messages")
    # On each host, the subscription's two subjects (t and t.>); on a, the message too.
    wait_for(lambda: a.federation()["too_long"] == 3, what="a's message counted")
    wait_for(lambda: b.federation()["too_long"] == 2, what="b's subscription counted")
    assert not far
    undisturbed(a, b)
    for host in (a, b):
        assert "over NATS's control line" in host.output()
    more = collect(sub_b, ("z",))  # another change of interest: the long one counted once
    reach(pub_a, ("z",), more, [pub_a, sub_b])
    assert b.federation()["too_long"] == 2


def test_the_control_line_limit_is_exact(federation: Federation) -> None:
    """With max_control_line 256, a subject of 224 bytes (256 - 32) crosses; 225 stays home."""
    nats = nats_with_control_line(federation, 256)
    a = federation.host("a", nats.url, max_control_line="256")
    b = federation.host("b", nats.url, max_control_line="256")
    fits, over = ("x" * 216,), ("y" * 217,)  # subjects mpubsub.xxx...: 224 and 225 bytes
    pub_a, sub_b = a.client(), b.client()
    got_fits, got_over = collect(sub_b, fits), collect(sub_b, over)
    reach(pub_a, fits, got_fits, [pub_a, sub_b])
    pub_a.publish(over, n=1)
    pub_a.publish(fits, n=2)  # behind it, on the same way
    assert pub_a.flush()
    pump([sub_b], lambda: (fits, {"n": 2}) in got_fits, "the message after the long one")
    # b: the subject fits.> (226) and both of over's; a: the message on over.
    wait_for(lambda: b.federation()["too_long"] == 3, what="b's subjects counted")
    wait_for(lambda: a.federation()["too_long"] == 1, what="a's message counted")
    assert not got_over
    undisturbed(a, b)


def test_an_origin_name_reaches_the_log_escaped(federation: Federation) -> None:
    """Text signed by a host (its name) is still escaped in another host's log."""
    nats = federation.nats()
    b = federation.host("b", nats.url, settings={"max_message_size": "65536"})
    sub_b = b.client()
    got = collect(sub_b, ("x",))
    wait_for(lambda: b.federation()["nats_subscriptions"] == 3, what="b's subscriptions")
    topic = proto.encode_topic(("x",))
    origin = Signer(SECRET, "\x1b]0;x\x07")
    big = origin.seal(topic, pickle.dumps({"big": "x" * 70_000}))
    small = origin.seal(topic, pickle.dumps({"n": 1}))  # behind it, to show it went nowhere
    asyncio.run(_publish_raw(nats.url, [("mpubsub.x", big), ("mpubsub.x", small)]))
    wait_for(lambda: "over this host's max_message_size" in b.output(), what="the drop logged")
    assert "dropped a message from \\x1b]0;x\\x07 over" in b.output()
    pump([sub_b], lambda: got, "the message after the big one")
    assert "\x1b" not in b.output() and got == [(("x",), {"n": 1})]


def test_the_bridge_imports_nothing_from_the_working_directory(
    federation: Federation, tmp_path: Path
) -> None:
    """Modules planted where root starts mpubsubd, or on its PYTHONPATH, never run in its bridge.

    mpubsubd starts as the installed wrapper starts it (isolated, the tree
    under test put first on sys.path); its bridge runs from "/", and runs
    this tree's mpubsubd, not another copy.
    """
    planted = tmp_path / "planted"
    planted.mkdir()
    for module in ("json", "asyncio", "nats", "hmac"):
        marker = planted / f"{module}.imported"
        (planted / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    nats = federation.nats()
    a = Host(federation.base, "a", nats.url)
    federation.hosts.append(a)
    tree = str(Path(__file__).resolve().parent.parent)
    start = f"import sys; sys.path.insert(0, {tree!r}); from mpubsubd import main; main()"
    a.command = [sys.executable, "-I", "-c", start]
    a.start(cwd=planted, env={**os.environ, "PYTHONPATH": str(planted)})
    b = federation.host("b", nats.url)
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("p",))
    reach(pub_a, ("p",), got, [pub_a, sub_b])
    assert sorted(p.name for p in planted.glob("*.imported")) == []
    assert os.readlink(f"/proc/{bridge_pid(a)}/cwd") == "/"
    assert f"bridge running mpubsubd from {tree}\n" in a.output()


def test_a_bridge_whose_nats_connection_closes_for_good_is_restarted(
    federation: Federation,
) -> None:
    """NATS closes the connection for good (an -ERR): the bridge exits 1, mpubsubd restarts it.

    Here the server's max_control_line is below the bridge's setting, so a
    long subscription draws "-ERR 'Maximum Control Line Exceeded'"; once
    the topic is gone, the next bridge stays connected. With the setting
    right, the same topic is kept local and nothing closes.
    """
    nats = nats_with_control_line(federation, 512)
    a = federation.host("a", nats.url)
    first = bridge_pid(a)
    pubsub = a.client()
    long = ("x" * 600,)
    collect(pubsub, long)
    wait_for(lambda: bridge_pid(a) != first, what="the bridge restarted")
    assert "the NATS connection closed for good" in a.output()
    assert re.search(r"the federation bridge exited with status 1; restarting", a.output())
    pubsub.disconnect()  # the topic gone, the next bridge stays connected
    a.clients.remove(pubsub)
    a.wait_state("connected", 60)
    b = federation.host("b", nats.url, max_control_line="512")
    collect(b.client(), long)
    wait_for(lambda: b.federation()["too_long"] == 2, what="b's subscription kept local")
    assert b.federation()["state"] == "connected"
    assert len(re.findall("federation bridge started", b.output())) == 1


def test_messages_nats_py_cannot_parse_stop_nothing(federation: Federation) -> None:
    """Headers nats-py fails on (not UTF-8, no status): dropped, counted, the read loop lives."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("h",))
    reach(pub_a, ("h",), got, [pub_a, sub_b])
    poison = b""
    for headers in (b"NATS/1.0 \xff\r\n\r\n", b"NATS/1.0 503 \xff\r\n\r\n", b"NATS/1.0\r\n\r\n"):
        poison += b"HPUB mpubsub.h %d %d\r\n%sx\r\n" % (len(headers), len(headers) + 1, headers)
    raw_nats(int(nats.url.rsplit(":", 1)[1]), poison)
    wait_for(lambda: b.federation()["dropped_unverified"] == 3, what="the three dropped")
    pub_a.publish(("h",), n=1)
    assert pub_a.flush()
    pump([sub_b], lambda: (("h",), {"n": 1}) in got, "a message after the poison")
    assert b.federation()["reconnects"] == 0
    assert "headers nats-py cannot parse" in b.output()


def test_a_message_over_the_receivers_limits_stays_out(federation: Federation) -> None:
    """A topic deeper than another host takes is dropped there; its bridge keeps its place."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    b = federation.host("b", nats.url, settings={"max_topic_depth": "4"})
    pub_a, sub_b = a.client(), b.client()
    got = collect(sub_b, ("x",))
    reach(pub_a, ("x",), got, [pub_a, sub_b])
    pub_a.publish(("x", "1", "2", "3", "4", "5"), n=1)
    pub_a.publish(("x",), n=2)
    assert pub_a.flush()
    pump([sub_b], lambda: (("x",), {"n": 2}) in got, "the message within the limits")
    wait_for(lambda: b.federation()["dropped_unverified"] == 1, what="the deep one dropped")
    assert "x.1.2.3.4.5: subject deeper or longer than any topic this host takes" in b.output()
    assert len(re.findall("federation bridge started", b.output())) == 1
