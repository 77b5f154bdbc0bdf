"""mpubsubd's federation against hostile peers (THREATS.md 2 and 4), with real processes.

A group member who tries to take the bridge's place; anyone who can publish
on NATS without the secret, replaying envelopes.
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
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import read_credentials

from .conftest import wait_for
from .test_bridge import (  # noqa: F401  (pytestmark: skipped without nats-server)
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


def raw_nats(port: int, commands: bytes) -> None:
    """Send protocol *commands* to nats-server on a plain socket, as any NATS user could."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n' + commands + b"PING\r\n")
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
    with connect_socket(address, 10) as claimer:
        handshake(claimer, authkey)
        forged = {"state": "connected", "server": "forged"}
        claimer.sendall(
            proto.frame(proto.BRIDGE, b"k" * 32)
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
        pub_a.flush()
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
    pub_a.flush()
    pump([sub_b], lambda: (("r", "end"), {"n": 0}) in got, "the message after the replays")
    delivered = sorted((topic, m["n"]) for topic, m in real(got))
    assert delivered == [(("r", i), n) for i in ("1", "2") for n in range(3)] + [(("r", "end"), 0)]
    wait_for(lambda: b.federation()["duplicates"] >= len(replays), what="replays counted")
