"""Attacks on the broker by its peers (THREATS.md 1-3 and 5): each one was seen to work once.

Every test here failed on the broker and client before they held: it stopped,
stalled or bloated the broker, or made a publish wait. Real broker processes,
real sockets; memory is the broker's resident set, read from /proc.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import pwd
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Callable, Iterator, List, Set, Tuple

import pytest

from mpubsub import AuthenticationError, Broker, NetPubSub
from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import write_credentials
from mpubsub._identity import Identity

from . import needs
from .conftest import (
    BRIDGE_KEY,
    BrokerProcess,
    FakeBroker,
    assert_serving,
    broker_rss,
    connected,
    session_on,
    subscribed,
    wait_for,
)
from .processes import free_port, stop_process

MiB = 1024 * 1024


def authenticated(broker: BrokerProcess) -> socket.socket:
    """A raw connection past the handshake, to send the broker any frame."""
    address, authkey = broker.creds()
    sock = connect_socket(address, 10)
    handshake(sock, authkey)
    return sock


def closed_with_error(sock: socket.socket) -> str:
    """Read until the broker closes *sock*; the reason of its ERROR frame."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    reasons = [frame[5:].decode() for kind, frame in proto.FrameDecoder(1 << 30).feed(data)]
    return reasons[-1] if reasons else ""


def topic_of(depth: int, element: str = "a") -> bytes:
    return proto.encode_topic((element,) * depth)


def for_seconds(seconds: float, action: Callable[..., object], *args: object) -> None:
    """Repeat *action* for *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        action(*args)


def worst_ping_during(pinger: NetPubSub, *attacks: Callable[[], object]) -> float:
    """Ping through *pinger* while the attacks run, each in a thread; the worst round trip."""
    threads = [threading.Thread(target=attack) for attack in attacks]
    for thread in threads:
        thread.start()
    worst = 0.0
    try:
        while any(thread.is_alive() for thread in threads):
            started = time.monotonic()
            assert pinger.flush()
            worst = max(worst, time.monotonic() - started)
    finally:
        for thread in threads:
            thread.join(60)
    return worst


def challenged(broker: BrokerProcess, count: int) -> List[socket.socket]:
    """*count* TCP connections that got their challenge, one after the other, and say nothing."""
    address, _ = broker.creds()
    socks = []
    for _ in range(count):
        socks.append(socket.create_connection(address))
        socks[-1].settimeout(10)
        socks[-1].recv(256)
    return socks


def pinged(sock: socket.socket) -> None:
    """Send PING on a raw connection and wait for its PONG (skipping anything else)."""
    sock.sendall(proto.frame(proto.PING, b""))
    decoder = proto.FrameDecoder(1 << 30)
    sock.settimeout(30)
    while True:
        chunk = sock.recv(1 << 20)
        assert chunk, "the broker closed the connection"
        if any(kind == proto.PONG for kind, _ in decoder.feed(chunk)):
            return


# --- 1. one client's trouble is one client's ---------------------------------


def test_wrong_answer_then_reset_leaves_the_broker_serving(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A peer without the key that answers wrong and resets at once only loses its connection."""
    address, _ = broker.creds()
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    for _ in range(20):
        with socket.socket(family) as sock:
            sock.connect(address)
            sock.recv(256)  # the challenge
            sock.sendall(proto.mp_frame(b"x" * 16))  # a wrong answer
            if family == socket.AF_INET:  # close with a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Each is refused, or closed first to make room for the next (max_handshakes_per_peer).
    wait_for(
        lambda: sum(map(broker.output().count, ("authentication failed", "making room"))) == 20,
        what="twenty connections closed",
    )
    assert "authentication failed" in broker.output()
    assert_serving(broker, clients)


def test_a_failing_scheduled_callback_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback run by the loop (mpubsubd's SIGHUP handler is one) that raises is logged."""
    broker = Broker(str(tmp_path / "b.sock"), b"key")
    thread = threading.Thread(target=broker.start)
    thread.start()
    try:

        def fails() -> None:
            raise ZeroDivisionError("division by zero")

        broker.schedule(fails)
        wait_for(lambda: "a scheduled callback" in caplog.text, what="the failure logged")
        with NetPubSub(broker.address, b"key") as pubsub:
            assert pubsub.flush()
        assert thread.is_alive()
        assert "ZeroDivisionError" in caplog.text
    finally:
        broker.stop()
        thread.join(10)
    assert not thread.is_alive()


# --- 2. topic limits ------------------------------------------------------------


def test_publishers_refuse_topics_over_the_limits(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """NetPubSub raises ValueError, before sending, for a topic deeper or longer than allowed."""
    pubsub = connected(broker, clients)
    deep, long = ("a",) * 129, ("x" * 5000,)
    with pytest.raises(
        ValueError, match=r"^topic of 129 elements exceeds the broker's limit of 128 elements$"
    ):
        pubsub.publish(deep)
    with pytest.raises(
        ValueError, match=r"^topic of 5001 bytes exceeds the broker's limit of 4096 bytes$"
    ):
        pubsub.add_subscriber(long, print)
    pubsub.publish(("a",) * 128)  # at the limit
    pubsub.add_subscriber((*deep, "*local"), print)  # local topics never travel
    assert pubsub.flush()


@pytest.mark.parametrize("kind", [proto.SUB, proto.PUB])
def test_deep_topics_close_the_connection_and_cost_nothing(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub], kind: int
) -> None:
    """One frame with a 20,000-element topic (575 MiB once) is refused; the broker stays small."""
    broker = broker_factory(None)
    before = broker_rss(broker)
    for depth in (20_000, 100_000):
        topic = topic_of(depth)
        sock = authenticated(broker)
        body = proto.pub_frame(topic, b"x")[5:] if kind == proto.PUB else topic
        sock.sendall(proto.frame(kind, body))
        assert closed_with_error(sock).startswith(f"topic of {len(topic)} bytes exceeds the limit")
        sock.close()
    assert broker_rss(broker) - before < 20 * MiB
    assert_serving(broker, clients)


# --- 3. subscription churn --------------------------------------------------------


def test_churn_beside_many_subscriptions_stalls_nobody(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """100,000 subscriptions and 400 x (SUB, broadcast, UNSUB, broadcast) leave pings prompt.

    The old broker spent 8 s on that churn, and another client's ping waited
    for it. The bound here is loose on purpose (the figure, under 50 ms at
    worst, is measured by make bench): the test catches a stall, not noise.
    """
    broker = broker_factory(
        None, "--max-subscriptions", "200000", "--max-subscription-bytes", "100000000"
    )
    churner = authenticated(broker)
    churner.sendall(
        b"".join(proto.frame(proto.SUB, proto.encode_topic(("s", str(n)))) for n in range(100_000))
    )
    pinged(churner)
    pinger = connected(broker, clients)
    subscribed(pinger, "elsewhere")
    churn = b""
    for n in range(400):
        extra = proto.encode_topic(("churn", str(n)))
        broadcast = proto.pub_frame(b"", b"\x80\x05}\x94.")  # an empty dict, pickled
        churn += proto.frame(proto.SUB, extra) + broadcast
        churn += proto.frame(proto.UNSUB, extra) + broadcast

    def churning() -> None:
        churner.sendall(churn)
        pinged(churner)

    with churner:
        worst = worst_ping_during(pinger, churning)
    assert worst < 1.0, f"a ping waited {worst * 1000:.0f} ms"


@pytest.mark.parametrize(("subscribers", "publishers"), [(500, 1), (100, 200)])
def test_fan_out_of_tiny_messages_stalls_nobody(
    broker_factory: Callable[..., BrokerProcess],
    clients: List[NetPubSub],
    helpers: Callable[..., subprocess.Popen[str]],
    subscribers: int,
    publishers: int,
) -> None:
    """Publishers bursting tiny messages to many subscribers leave others' pings prompt.

    The broker handled a whole read (4,000 messages, two million deliveries)
    in one round: pings waited 0.6-1.4 s; with a budget per client, 200
    publishers still made them wait 0.9 s. The bound is loose on purpose.
    """
    broker = broker_factory(None)
    pinger = connected(broker, clients)
    flood = helpers("fanout", broker.credentials, subscribers, publishers, 3)
    worst = worst_ping_during(pinger, flood.wait)
    assert worst < 0.5, f"a ping waited {worst * 1000:.0f} ms"


def test_ever_new_deep_topics_stall_nobody(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Four clients publishing to ever new 128-element topics leave others' pings prompt.

    Each new topic costs the broker a route computed over 128 prefixes:
    handled a whole read at a time, that made pings wait 0.6-1 s.
    """
    broker = broker_factory(None)
    pinger = connected(broker, clients)
    attackers = [authenticated(broker) for _ in range(4)]

    body = b"\xff" * 127  # 127 empty elements
    floods = [
        b"".join(proto.pub_frame(b"%d-%d\xff" % (i, n) + body, b"") for n in range(8_000))
        for i in range(len(attackers))
    ]

    try:
        worst = worst_ping_during(
            pinger,
            *(functools.partial(sock.sendall, flood) for sock, flood in zip(attackers, floods)),
        )
    finally:
        for sock in attackers:
            sock.close()
    assert worst < 0.4, f"a ping waited {worst * 1000:.0f} ms"


# --- 4. memory bounded per client and in total ----------------------------------------


def test_unsubscribed_topics_leave_no_memory(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Publishes to many distinct topics nobody wants stay within the route cache's bytes."""
    broker = broker_factory(None)
    before = broker_rss(broker)
    for _ in range(200):  # 1 MiB topics: refused, the connection closed (200 MiB once)
        sock = authenticated(broker)
        sock.sendall(proto.pub_frame(proto.encode_topic(("x" * MiB,)), b"x"))
        assert "exceeds the limit" in closed_with_error(sock)
        sock.close()
    sock = authenticated(broker)  # topics at the size limit: cached, within the budget
    for n in range(5000):
        sock.sendall(proto.pub_frame(proto.encode_topic((f"{n:04}" + "x" * 4090,)), b"x"))
    pinged(sock)
    sock.close()
    grown = broker_rss(broker) - before
    assert grown < 4 * MiB + 20 * MiB, f"grew by {grown / MiB:.0f} MiB"
    assert "reached 4194304 bytes (route_cache_bytes): starting afresh" in broker.output()
    assert_serving(broker, clients)


def test_subscriptions_are_capped_per_client(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Ten clients subscribing 4 KiB topics until cut each hold 1 MiB at most (620 MiB once)."""
    broker = broker_factory(None)
    before = broker_rss(broker)
    socks = [authenticated(broker) for _ in range(10)]
    for i, sock in enumerate(socks):
        frames = (
            proto.frame(proto.SUB, proto.encode_topic((f"{i}-{n:05}" + "x" * 4080,)))
            for n in range(600)
        )
        with pytest.raises(OSError):  # the broker closes it midway
            for frame in frames:
                sock.sendall(frame)
        assert "(max_subscription_bytes)" in closed_with_error(sock)
        sock.close()
    socks = [authenticated(broker) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"".join(proto.frame(proto.SUB, topic_of(1, str(n))) for n in range(10_001)))
        assert closed_with_error(sock) == "more than 10000 subscriptions (max_subscriptions)"
        sock.close()
    assert broker_rss(broker) - before < 10 * 2 * MiB + 20 * MiB
    assert "(max_subscription_bytes)" in broker.output()
    assert_serving(broker, clients)


def test_unfinished_frames_are_capped_in_total(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Twenty clients each holding most of a 16 MiB frame cost 64 MiB at most, not 320 MiB."""
    broker = broker_factory(None)
    before = broker_rss(broker)
    socks = [authenticated(broker) for _ in range(20)]
    body = b"x" * (15 * MiB)
    for sock in socks:
        with contextlib.suppress(OSError):  # cut midway
            sock.sendall(proto.HEADER.pack(16 * MiB, proto.PUB) + body)
    with authenticated(broker) as sock:
        pinged(sock)  # the broker has read what it could
    grown = broker_rss(broker, "VmHWM") - before
    for sock in socks:
        sock.close()
    assert broker.output().count("(max_input_buffer)") >= 15  # those holding the most, cut
    # 64 MiB held at most, and room for what the allocator keeps of the buffers of the
    # clients cut (glibc's dynamic mmap threshold leaves freed ones in the heap): runs
    # gave 77-106 MiB, before and after issue 15 alike. Without the cap: 320 MiB.
    assert grown < 64 * MiB + 64 * MiB, f"grew by {grown / MiB:.0f} MiB"
    assert "(max_input_buffer)" in broker.output()
    assert_serving(broker, clients)


def test_client_topic_cache_is_bounded_in_bytes(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A subscriber receiving many distinct long topics keeps a bounded cache of them."""
    sub = connected(broker, clients)
    count = [0]
    sub.add_subscriber((), lambda topic, **m: count.__setitem__(0, count[0] + 1), weak=False)
    assert sub.flush()
    pub = authenticated(broker)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(3):
            pub.sendall(
                b"".join(
                    proto.pub_frame(
                        proto.encode_topic((f"{batch}{n:04}" + "y" * 4090,)), b"\x80\x05}\x94."
                    )
                    for n in range(1000)
                )
            )
            target = 1000 * (batch + 1)
            wait_for(functools.partial(delivered, sub, count, target), what="the messages")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        pub.close()
    assert grown < 4 * MiB, f"grew by {grown / MiB:.1f} MiB"


def delivered(sub: NetPubSub, count: List[int], target: int) -> bool:
    sub.poll(0.05)
    return count[0] >= target


# --- 5. the handshake cannot be crowded out -------------------------------------------


ATTACKER = """
import socket, sys, selectors
path = sys.argv[1]
sel = selectors.DefaultSelector()
print("ready", flush=True)
while True:
    while len(sel.get_map()) < 4000:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError:
            s.close()
            break
        sel.register(s, selectors.EVENT_READ)
    for key, _ in sel.select(0.01):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the user nobody can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mpubsub-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_peer_without_the_key_cannot_crowd_out_the_others(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub], shared_dir: Path
) -> None:
    """nobody reopening connections as fast as it can keeps no one out, the broker nearly full.

    With 100 descriptors (84 connections) of which 76 are clients, a peer
    without the key made room for itself by closing others' handshakes.
    """
    needs.OTHER_USERS.check(needs.as_root(), needs.which("setpriv", "prlimit"))
    path = shared_dir / "broker.sock"
    broker = broker_factory(str(path), prefix=("prlimit", "--nofile=100:100"))
    path.chmod(0o777)
    for _ in range(76):
        connected(broker, clients)
    attacker = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            sys.executable,
            "-I",
            "-c",
            ATTACKER,
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert attacker.stdout is not None and attacker.stdout.readline() == "ready\n"
        wait_for(
            lambda: "to make room" in broker.output(),
            what="the attack to reach a cap",
        )
        for _ in range(3):
            pubsub = NetPubSub.from_file(broker.credentials, timeout=2.0)
            pubsub.connect()
            clients.append(pubsub)
            assert pubsub.flush()
    finally:
        stop_process(attacker)
        if attacker.stdout is not None:
            attacker.stdout.close()
    assert_serving(broker, clients)


def test_per_peer_cap_on_tcp(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Past its cap, a TCP peer's oldest handshakes are closed, with a log line."""
    broker = broker_factory("127.0.0.1:0")
    address, _ = broker.creds()
    socks = [socket.create_connection(address) for _ in range(20)]
    try:
        for sock in socks[:12]:
            sock.settimeout(10)
            sock.recv(256)  # the challenge
            assert sock.recv(256) == b""  # then closed
        wait_for(lambda: "8 from 127.0.0.1, the limit (max_handshakes_per_peer)" in broker.output())
    finally:
        for sock in socks:
            sock.close()


# --- 10. publish never waits for a reconnection ------------------------------------------


def test_publish_and_poll_never_wait_for_a_reconnection(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """While the writer reconnects to a broker that does not answer, publish and poll return."""
    broker = broker_factory(f"127.0.0.1:{free_port()}")
    address, authkey = broker.creds()
    pubsub = NetPubSub(address, authkey, timeout=30.0)
    pubsub.connect()
    accepted: List[socket.socket] = []
    broker.kill()
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(address)
    silent.listen(16)
    taker = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
    taker.start()

    def publish_some() -> None:
        for n in range(50):
            pubsub.publish("t", n=n)
            time.sleep(0.01)

    try:
        first = threading.Thread(target=publish_some, daemon=True)
        first.start()
        wait_for(lambda: accepted, what="a reconnection attempt, which the server never answers")
        wait_for(lambda: not first.is_alive(), what="the publishes to return")
        second = threading.Thread(target=publish_some, daemon=True)
        second.start()
        wait_for(lambda: not second.is_alive(), what="publishes during the reconnection to return")
        polls = threading.Thread(target=lambda: [pubsub.poll(0.1) for _ in range(5)], daemon=True)
        polls.start()
        wait_for(lambda: not polls.is_alive(), what="poll(0.1) during the reconnection to return")
        assert not pubsub.connected
    finally:
        silent.close()
        for sock in accepted:
            sock.close()
        pubsub.disconnect()


# --- what a client receives (THREATS.md 5) ---------------------------------------------


def test_odd_payloads_lose_nothing_else(broker: BrokerProcess, clients: List[NetPubSub]) -> None:
    """A payload that is not a mapping of strings is dropped; the rest of the read arrives."""
    sub = connected(broker, clients)
    got = subscribed(sub, "t")
    topic = proto.encode_topic(("t",))
    odd = [pickle.dumps([1, 2]), pickle.dumps({1: "x"}), b"not a pickle"]
    with authenticated(broker) as pub:
        pub.sendall(b"".join(proto.pub_frame(topic, p) for p in [*odd, pickle.dumps({"n": 1})]))
        pinged(pub)
    wait_for(lambda: sub.poll(0.05) or got, what="the good message")
    assert got == [{"n": 1}]


# --- caps that a group member could turn against the others ---------------------------


SMALL = ("--max-message-size", "1048576", "--max-input-buffer", "4194304")


def test_input_hogs_are_cut_not_the_client_that_crosses_the_line(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Clients holding frames open to fill max_input_buffer go; an honest large message passes.

    Spread over eight connections, each holds less than the honest message:
    the client whose frame began the longest ago is the one cut.
    """
    broker = broker_factory(None, *SMALL)
    hogs = [authenticated(broker) for _ in range(8)]
    for sock in hogs:  # each 100 bytes short of half a MiB, of a 1 MiB frame
        sock.sendall(proto.HEADER.pack(MiB, proto.PUB) + b"x" * (MiB // 2 - 100))
    with authenticated(broker) as sock:
        pinged(sock)
    pub, sub = connected(broker, clients), connected(broker, clients)
    got = subscribed(sub, "big")
    pub.publish("big", blob=b"y" * 900_000)
    wait_for(lambda: sub.poll(0.05) or got, what="the honest large message")
    assert pub.connected and got[0]["blob"] == b"y" * 900_000
    assert "(max_input_buffer)" in broker.output()
    for sock in hogs:
        sock.close()


def test_connections_that_never_authenticate_make_room(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """With max_connections taken by connections still authenticating, a client still gets in."""
    broker = broker_factory(
        "127.0.0.1:0", "--max-connections", "20", "--max-handshakes-per-peer", "100"
    )
    silent = challenged(broker, 20)
    try:
        pubsub = connected(broker, clients)
        assert pubsub.flush()
    finally:
        for sock in silent:
            sock.close()
    assert "to make room: 20 from all peers, the limit (max_connections)" in broker.output()


def test_unsent_tiny_frames_count_what_they_cost(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Clients that never read, sent 11-byte frames, are cut before they hold 4 x max_buffer."""
    broker = broker_factory(None, *SMALL, "--max-buffer", str(4 * MiB))
    before = broker_rss(broker)
    readers = [authenticated(broker) for _ in range(4)]
    topics = [proto.encode_topic((str(i),)) for i in range(4)]
    for sock, topic in zip(readers, topics):
        sock.sendall(proto.frame(proto.SUB, topic))
        pinged(sock)
    with authenticated(broker) as publisher:
        for topic in topics:
            batch = proto.pub_frame(topic, b"") * 6000
            for _ in range(100):  # 600,000 frames of 11 bytes for each
                publisher.sendall(batch)
        pinged(publisher)
        grown = broker_rss(broker, "VmHWM") - before
    for sock in readers:
        sock.close()
    assert broker.output().count("slow consumer") == 4
    assert grown < 4 * 4 * MiB, f"grew by {grown / MiB:.0f} MiB"  # 4 x max_buffer


def test_a_bridge_that_does_not_read_is_neither_bloated_nor_cut_by_churn(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Interest that changes while the bridge does not read is merged per topic, not queued.

    A group member subscribes and unsubscribes 10,000 long topics and 200,000
    short ones, and publishes past max_buffer: the broker's memory stays
    bounded, the bridge keeps its place, and once it reads it learns only
    the topics still wanted, then gets what is published next.
    """
    broker = broker_factory(None, *SMALL, "--max-buffer", str(4 * MiB))
    before = broker_rss(broker)
    bridge = authenticated(broker)
    bridge.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    bridge.sendall(proto.frame(proto.BRIDGE, BRIDGE_KEY))
    kept = proto.encode_topic(("kept",))
    with authenticated(broker) as churner:
        churner.sendall(proto.frame(proto.SUB, kept))
        for n in range(10_000):  # 80 MB of interest, twice max_buffer each second
            topic = proto.encode_topic((f"{n:05}" + "x" * 4000,))
            churner.sendall(proto.frame(proto.SUB, topic) + proto.frame(proto.UNSUB, topic))
        pairs = b"".join(
            proto.frame(proto.SUB, t) + proto.frame(proto.UNSUB, t)
            for t in (proto.encode_topic((f"s{n}",)) for n in range(200_000))
        )
        churner.sendall(pairs)
        churner.sendall(proto.pub_frame(proto.encode_topic(("p",)), b"x" * 60_000) * 100)
        pinged(churner)
        assert broker_rss(broker, "VmHWM") - before < 4 * MiB + 30 * MiB
        assert "slow consumer" not in broker.output()
        churner.sendall(proto.pub_frame(proto.encode_topic(("last",)), b"!"))
        pinged(churner)
        # Once it reads, the bridge learns what is wanted now (news merged: few
        # frames), and gets the messages queued since it stopped, the last too.
        decoder = proto.FrameDecoder(1 << 30)
        bridge.settimeout(10)
        wanted: Set[bytes] = set()
        changes = 0
        last = False
        while not (last and wanted == {kept}):
            for kind, frame in decoder.feed(bridge.recv(1 << 20)):
                if kind == proto.PUB:
                    last = last or frame[9:].startswith(proto.encode_topic(("last",)))
                else:
                    changes += 1
                    (wanted.add if kind == proto.SUB else wanted.discard)(frame[5:])
    assert changes < 2000  # of 420,001
    bridge.close()
    assert "the federation bridge is behind: dropped" in broker.output()
    assert_serving(broker, clients)


def test_a_bridge_without_the_brokers_key_is_refused(broker: BrokerProcess) -> None:
    """BRIDGE without the key, or with another, closes that connection and nothing else."""
    for key in (b"", BRIDGE_KEY[:-1] + b"?", BRIDGE_KEY + b"!"):
        with authenticated(broker) as claimer:
            claimer.sendall(proto.frame(proto.BRIDGE, key))
            assert closed_with_error(claimer) == (
                "BRIDGE refused: only mpubsubd's own bridge, with its key"
            )
    with authenticated(broker) as bridge:
        bridge.sendall(proto.frame(proto.BRIDGE, BRIDGE_KEY))
        pinged(bridge)


def test_a_broker_without_a_bridge_key_takes_no_bridge(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Without --bridge-key-file, every BRIDGE is refused, whatever key it shows."""
    broker = broker_factory(None, bridge_key=False)
    for key in (b"", BRIDGE_KEY):
        with authenticated(broker) as claimer:
            claimer.sendall(proto.frame(proto.BRIDGE, key))
            assert closed_with_error(claimer) == (
                "BRIDGE refused: this broker takes no federation bridge"
            )
    assert_serving(broker, clients)


def test_interest_queued_for_the_bridge_is_accounted(tmp_path: Path) -> None:
    """SUB/UNSUB frames queued for the bridge count in its buffer like any frame, and are
    queued about one send's worth at a time, however many topics wait."""
    broker = Broker(
        str(tmp_path / "b.sock"), b"k" * 32, bridge_key=BRIDGE_KEY, max_subscriptions=100_000
    )
    left, right = socket.socketpair()
    with left, right:
        bridge, other = (session_on(sock, n) for n, sock in enumerate((left, right)))
        exchange = broker._exchange
        topics = [proto.encode_topic((f"t{n}",)) for n in range(50_000)]
        subscriptions = [(proto.SUB, proto.frame(proto.SUB, topic)) for topic in topics]
        assert exchange.handle(other, subscriptions, budget=10**9) == len(subscriptions)
        exchange.handle(bridge, [(proto.BRIDGE, proto.frame(proto.BRIDGE, BRIDGE_KEY))], 10)
        assert exchange.bridge is bridge
        assert exchange.queue_interest(bridge)  # its feed: every topic, 50,000 SUB frames
        assert 0 < bridge.out_size < 300 * 1024  # about one send's worth
        assert bridge.out_size == sum(map(len, bridge.out))
        assert {proto.kind_of(frame) for frame in bridge.out} == {proto.SUB}
    broker.close()


@pytest.mark.parametrize(
    "report",
    [
        json.dumps({"state": {"nested": [[[]]]}}),
        "[" * 600 + "]" * 600,
        "[" * 100_000,
        json.dumps({f"k{n}": n for n in range(100)}),
        json.dumps({"state": "x" * 300}),
        json.dumps({"state": "connected", "pwned": 1}),
        json.dumps({"reconnects": True}),
        json.dumps({"reconnects": -1}),
        json.dumps({"reconnects": 1 << 70}),
        json.dumps({"reconnects": 1.5}),
        json.dumps({"server": 7}),
    ],
)
def test_a_bad_federation_report_closes_the_bridge_only(
    broker: BrokerProcess, clients: List[NetPubSub], report: str
) -> None:
    """A report that is not a small flat object is refused; statistics keep working."""
    with authenticated(broker) as bridge:
        bridge.sendall(
            proto.frame(proto.BRIDGE, BRIDGE_KEY) + proto.frame(proto.FEDERATION, report.encode())
        )
        assert closed_with_error(bridge).startswith("FEDERATION frame")
    stats = connected(broker, clients).broker_statistics()
    assert stats is not None and stats["federation"] is None


def test_only_the_bridge_reports_for_federation(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A FEDERATION frame from a client that is not the bridge closes it; nothing of it
    reaches the statistics."""
    report = json.dumps({"state": "forged"}).encode()
    with authenticated(broker) as forger:
        forger.sendall(proto.frame(proto.FEDERATION, report))
        assert closed_with_error(forger) == f"unexpected frame type {proto.FEDERATION}"
    stats = connected(broker, clients).broker_statistics()
    assert stats is not None and stats["federation"] is None


def test_a_client_with_subscriptions_cannot_become_the_bridge(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """Even with the key: the bridge gets everything, and a subscriber would get it twice."""
    with authenticated(broker) as claimer:
        claimer.sendall(
            proto.frame(proto.SUB, proto.encode_topic(("t",)))
            + proto.frame(proto.BRIDGE, BRIDGE_KEY)
        )
        assert closed_with_error(claimer) == "a client with subscriptions cannot become the bridge"
    assert_serving(broker, clients)


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00\x00"])
def test_a_truncated_pub_frame_is_a_protocol_error(
    broker: BrokerProcess, clients: List[NetPubSub], body: bytes
) -> None:
    """A PUB frame too short to hold its topic's length is refused as such, not as an
    internal error."""
    with authenticated(broker) as sender:
        sender.sendall(proto.frame(proto.PUB, body))
        assert closed_with_error(sender) == "truncated PUB frame"
    assert "internal error" not in broker.output()
    assert_serving(broker, clients)


def test_stats_show_a_bridges_text_escaped(broker: BrokerProcess) -> None:
    """What a bridge reports reaches `mpubsub stats` escaped: no terminal escapes, no new lines."""
    forged = "\x1b]0;pwned\x07connected\nfederation  forged\u202e"
    with authenticated(broker) as bridge:
        report = json.dumps({"state": forged, "name": forged, "server": forged})
        bridge.sendall(
            proto.frame(proto.BRIDGE, BRIDGE_KEY) + proto.frame(proto.FEDERATION, report.encode())
        )
        pinged(bridge)
        shown = subprocess.run(
            [sys.executable, "-m", "mpubsub", "stats", "-c", str(broker.credentials)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\u202e" not in shown.stdout
    assert "\\x1b]0;pwned\\x07connected\\x0afederation  forged\\u202e" in shown.stdout


# --- a broker as seen by its clients (THREATS.md 5) -------------------------------------


def fake_broker_credentials(tmp_path: Path) -> Tuple[str, Path]:
    """A socket path for a fake broker, and a credentials file naming it (key b"key")."""
    path, credentials = str(tmp_path / "fake.sock"), tmp_path / "fake.pckl"
    write_credentials(credentials, path, b"key", overwrite=True)
    return path, credentials


def cli(credentials: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpubsub", *args, "-c", str(credentials)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_brokers_refusal_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """An ERROR answer to HELLO is one escaped line, not a forged one or a retitled terminal."""
    path, credentials = fake_broker_credentials(tmp_path)
    reason = b"\x1b]0;pwned\x07\nmpubsub: FORGED LINE"
    fake = FakeBroker(path, b"key", lambda s: s.sendall(proto.frame(proto.ERROR, reason)), False)
    try:
        result = cli(credentials, "ping")
    finally:
        fake.close()
    assert result.returncode == 1
    assert result.stderr == (
        f"mpubsub: cannot reach the broker at {path}: the broker refused: "
        "\\x1b]0;pwned\\x07\\x0ampubsub: FORGED LINE\n"
    )


@pytest.mark.parametrize(
    ("command", "behave", "said"),
    [
        ("ping", lambda s: time.sleep(8), "the broker did not answer in time"),
        (
            "stats",
            lambda s: (s.recv(5), s.sendall(proto.frame(proto.STATS_REPLY, b"[[not json"))),
            "the broker's statistics are not JSON",
        ),
    ],
)
def test_a_broker_that_misbehaves_is_one_line_from_the_cli(
    tmp_path: Path, command: str, behave: Callable[[socket.socket], object], said: str
) -> None:
    """No answer, or a garbled one: `mpubsub` says so in one line, no traceback."""
    path, credentials = fake_broker_credentials(tmp_path)
    fake = FakeBroker(path, b"key", behave)
    try:
        result = cli(credentials, command)
    finally:
        fake.close()
    assert (result.returncode, result.stderr) == (1, f"mpubsub: {said}\n")


def test_a_handshake_trickled_byte_by_byte_times_out(tmp_path: Path) -> None:
    """A broker sending its challenge a byte at a time cannot hold connect() past its timeout."""
    path = str(tmp_path / "slow.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    challenge, _ = proto.new_challenge()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            for byte in challenge:
                conn.send(bytes([byte]))
                time.sleep(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    outcome: List[BaseException] = []

    def connect() -> None:
        try:
            NetPubSub(path, b"key", timeout=1.0).connect()
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    try:
        wait_for(lambda: outcome, timeout=15, what="connect() to give up")  # 30 s of trickle
    finally:
        listener.close()
    assert isinstance(outcome[0], TimeoutError)


def test_a_broker_slow_at_each_step_cannot_stretch_connect(tmp_path: Path) -> None:
    """*timeout* bounds the whole connect, not each read: three 0.5 s waits, timeout 1 s."""
    path = str(tmp_path / "slow.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    done = threading.Event()

    def slow() -> None:
        sock, _ = listener.accept()
        conn = Connection(os.dup(sock.fileno()))
        with contextlib.suppress(OSError, EOFError), sock, conn:
            time.sleep(0.5)
            deliver_challenge(conn, b"key")  # the challenge, late; then WELCOME
            time.sleep(0.5)
            answer_challenge(conn, b"key")  # the answer to the client's, late
            sock.recv(7)  # HELLO
            time.sleep(0.5)
            sock.sendall(proto.frame(proto.WELCOME, proto.welcome_body(proto.Limits())))
            done.wait(10)

    threading.Thread(target=slow, daemon=True).start()
    pubsub = NetPubSub(path, b"key", timeout=1.0)
    try:
        outcome = _within(10, pubsub.connect)
    finally:
        done.set()
        listener.close()
        with contextlib.suppress(RuntimeError):
            pubsub.disconnect()
    assert isinstance(outcome, TimeoutError), outcome


def test_a_flooding_broker_cannot_hold_flush_or_fill_memory(tmp_path: Path) -> None:
    """A broker that floods messages and never answers PING: flush() raises TimeoutError."""
    path, _ = fake_broker_credentials(tmp_path)
    burst = proto.pub_frame(proto.encode_topic(("t",)), b"x" * 60_000) * 16
    fake = FakeBroker(path, b"key", lambda s: for_seconds(20, s.sendall, burst))
    outcome: List[BaseException] = []
    pubsub = NetPubSub(path, b"key", timeout=2.0)

    def flush() -> None:
        try:
            pubsub.flush()
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    try:
        pubsub.connect()
        thread = threading.Thread(target=flush, daemon=True)
        thread.start()
        wait_for(lambda: outcome, timeout=15, what="flush() to give up")
        assert isinstance(outcome[0], TimeoutError)
        assert pubsub._link.inbox.size <= 65 * MiB
    finally:
        pubsub.disconnect()
        fake.close()


def test_sub_shows_a_message_that_reuses_one_list_in_bounded_space(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """384 bytes of plain data that would print as 2**60 values: one bounded line, promptly."""
    value: List[object] = [1]
    for _ in range(60):
        value = [value, value]
    sub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mpubsub",
            "sub",
            "t",
            "--count",
            "1",
            "-c",
            str(broker.credentials),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pub = connected(broker, clients)
        wait_for(lambda: broker_subscriptions(pub) == 1, what="mpubsub sub to subscribe")
        pub.publish("t", v=value)
        out, _ = sub.communicate(timeout=30)
    finally:
        stop_process(sub)
    assert out.startswith("t v=[[[[") and len(out) < 200_000 and "..." in out


def broker_subscriptions(pubsub: NetPubSub) -> int:
    stats = pubsub.broker_statistics()
    assert stats is not None
    return int(stats["subscriptions"])


# --- the caps, exactly --------------------------------------------------------------


def test_caps_hold_exactly_at_their_values(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """max_connections clients get in, one more is refused; unsubscribing gives room back."""
    broker = broker_factory(
        None, "--max-connections", "3", "--max-subscription-bytes", "100", *SMALL
    )
    first = connected(broker, clients)
    for topic in ("a" * 40, "b" * 40, "c" * 40, "d" * 40):  # 41 bytes each, two fit at a time
        first.add_subscriber(topic, logging.info)
        first.remove_subscriber(topic, logging.info)
    assert first.flush() and first.connected
    with authenticated(broker) as exact:  # topics of 100 bytes in all: the cap, not over it
        topics = [proto.encode_topic((letter * 49,)) for letter in "ab"]
        exact.sendall(b"".join(proto.frame(proto.SUB, t) for t in topics))
        pinged(exact)
        exact.sendall(proto.frame(proto.SUB, proto.encode_topic(("c",))))
        assert closed_with_error(exact) == (
            "subscribed topics over 100 bytes (max_subscription_bytes)"
        )
    connected(broker, clients)
    connected(broker, clients)
    with pytest.raises(OSError):
        connected(broker, clients)
    wait_for(  # the broker logs after it closes: the client may know first
        lambda: (
            "refusing a connection: 3 connections, the limit (max_connections)" in broker.output()
        ),
        what="the refusal logged",
    )


def test_handshakes_past_the_cap_close_exactly_one_each(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """At max_handshakes, each new connection closes one older one: no more, no less."""
    broker = broker_factory(
        "127.0.0.1:0", "--max-handshakes", "4", "--max-handshakes-per-peer", "100"
    )
    socks = challenged(broker, 5)
    try:
        assert socks[0].recv(256) == b""  # the oldest made room
        for sock in socks[1:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(256)  # still waiting for an answer
    finally:
        for sock in socks:
            sock.close()


def test_an_oversized_handshake_message_is_refused_at_its_header(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A peer announcing a 100 MB handshake message is closed at once, nothing buffered."""
    address, _ = broker.creds()
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.connect(address)
        sock.recv(256)
        sock.sendall(proto.MP_LEN.pack(100_000_000) + b"x" * 1000)
        assert closed_with_error(sock) == ""
    assert "handshake message of 100000000 bytes" in broker.output()
    assert_serving(broker, clients)


def test_a_client_that_refuses_the_brokers_key_gets_nothing(broker: BrokerProcess) -> None:
    """A peer that answers our challenge, then calls our answer wrong, is closed, not welcomed."""
    address, authkey = broker.creds()
    with connect_socket(address, 10) as sock:
        challenge = sock.recv(256)[4:]
        sock.sendall(proto.answer_challenge(authkey, challenge))
        assert sock.recv(256)[4:] == proto.WELCOME_MSG
        ours, _message = proto.new_challenge()
        sock.sendall(ours)
        sock.recv(256)  # the broker's answer
        sock.sendall(proto.mp_frame(b"#NOT WELCOME#"))
        sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(proto.VERSION)))
        assert closed_with_error(sock) == ""
    assert "the client refused the broker's key" in broker.output()


def test_a_subscribers_error_reraised_by_on_error_reaches_poll(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A TypeError a subscriber raises, re-raised by on_error, is not taken for a bad payload."""
    sub = connected(broker, clients)

    def reraise(topic: object, subscriber: object, exc: Exception) -> None:
        raise exc

    def fails(topic: object, **message: object) -> None:
        raise TypeError("the subscriber's own")

    sub.on_error = reraise
    sub.add_subscriber("t", fails, weak=False)
    assert sub.flush()
    connected(broker, clients).publish("t", n=1)
    with pytest.raises(TypeError, match=r"^the subscriber's own$"):
        wait_for(lambda: sub.poll(0.05), what="the message")


def test_a_brokers_error_text_is_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ERROR frame from the broker reaches the client's log with its controls escaped."""
    path, _ = fake_broker_credentials(tmp_path)
    reason = b"\x1b[2J\nFORGED: all fine"

    def refuse(sock: socket.socket) -> None:
        sock.sendall(proto.frame(proto.ERROR, reason))
        sock.recv(1)  # until the client goes

    fake = FakeBroker(path, b"key", refuse)
    pubsub = NetPubSub(path, b"key")
    try:
        pubsub.connect()
        wait_for(lambda: [pubsub.poll(0.05)] and "broker error" in caplog.text, what="the log")
    finally:
        pubsub.disconnect()
        fake.close()
    assert "broker error: \\x1b[2J\\x0aFORGED: all fine" in caplog.text


def test_a_largest_message_fits_when_max_input_buffer_equals_it(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """max_input_buffer = max_message_size: a largest frame arriving in two parts is not cut."""
    broker = broker_factory(None, "--max-message-size", "10000", "--max-input-buffer", "10000")
    sub = connected(broker, clients)
    got = subscribed(sub, "t")
    frame = proto.pub_frame(proto.encode_topic(("t",)), b"x" * (10000 - 4 - 2))
    with authenticated(broker) as sock:
        sock.sendall(frame[:-2])
        with authenticated(broker) as other:
            pinged(other)  # the broker holds 10,003 bytes of it
        sock.sendall(frame[-2:])
        pinged(sock)
    wait_for(lambda: sub.poll(0.05) or got, what="the largest message")
    assert "max_input_buffer" not in broker.output()


def test_a_late_pong_does_not_answer_the_next_flush(tmp_path: Path) -> None:
    """A PONG that comes after its flush() timed out is not taken for the next flush's."""
    path, _ = fake_broker_credentials(tmp_path)
    timed_out, pong_sent, done = threading.Event(), threading.Event(), threading.Event()

    def behave(sock: socket.socket) -> None:
        sock.recv(5)  # the first PING: answered once its flush() gave up
        timed_out.wait(10)
        sock.sendall(proto.frame(proto.PONG, b""))
        pong_sent.set()
        done.wait(10)  # the second PING: never answered

    fake = FakeBroker(path, b"key", behave)
    pubsub = NetPubSub(path, b"key", timeout=0.5)
    try:
        pubsub.connect()
        with pytest.raises(TimeoutError):
            pubsub.flush()
        timed_out.set()
        assert pong_sent.wait(10)
        with pytest.raises(TimeoutError):
            pubsub.flush()  # the late PONG is the first flush's
    finally:
        done.set()
        pubsub.disconnect()
        fake.close()


def test_what_a_dying_broker_read_is_not_sent_again(tmp_path: Path) -> None:
    """A broker that read part of a batch, then died: only what it did not get is re-sent."""
    path, _ = fake_broker_credentials(tmp_path)
    seen: List[List[int]] = [[], []]  # the n of each message, per connection
    end = threading.Event()

    def behave(sock: socket.socket) -> None:
        first = not seen[0]
        got = seen[0] if first else seen[1]
        decoder = proto.FrameDecoder(1 << 30)
        taken = 0
        while True:
            data = sock.recv(65536)
            if not data:
                return
            taken += len(data)
            for kind, frame in decoder.feed(data):
                if kind == proto.PUB:
                    n = pickle.loads(proto.pub_parts(frame)[1])["n"]
                    got.append(n)
                    if n == -1:
                        end.set()
                elif kind == proto.PING:
                    sock.sendall(proto.frame(proto.PONG, b""))
            if first and taken > 100_000:  # dies mid-batch, unread bytes and all
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return

    fake = FakeBroker(path, b"key", behave)
    pubsub = NetPubSub(path, b"key", timeout=5)
    try:
        pubsub.connect()
        for n in range(5000):  # 5 MB in batches of 1 MiB: the first one breaks
            pubsub.publish(("t",), n=n, pad=b"x" * 1000)
        pubsub.publish(("t",), n=-1)
        wait_for(end.is_set, 30, what="the last message")  # the writer thread re-sends
    finally:
        pubsub.disconnect()
        fake.close()
    first, second = seen
    assert len(first) > 50 and second[-1] == -1
    assert not set(first) & set(second), "sent again after the broker had it"
    assert second == [*sorted(second[:-1]), -1]  # in order


def test_stats_watch_against_a_broker_that_stops_answering_is_one_line(tmp_path: Path) -> None:
    """`mpubsub stats --watch`: figures while the broker answers, one line once it stops."""
    path, credentials = fake_broker_credentials(tmp_path)
    done = threading.Event()

    def behave(sock: socket.socket) -> None:
        sock.recv(5)  # the first STATS is answered, the second never
        sock.sendall(proto.frame(proto.STATS_REPLY, b'{"clients": 7}'))
        done.wait(30)

    fake = FakeBroker(path, b"key", behave)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mpubsub", "stats", "--watch", "0.1", "-c", str(credentials)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        done.set()
        fake.close()
    assert "clients" in result.stdout and " 7\n" in result.stdout
    assert (result.returncode, result.stderr) == (1, "mpubsub: the broker did not answer in time\n")


def test_refusals_and_slow_consumers_are_counted(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """The broker's figures count a wrong key, a bad frame and a cut slow consumer."""
    broker = broker_factory(None, *SMALL, "--max-buffer", str(MiB))
    address, _ = broker.creds()
    with pytest.raises(AuthenticationError):
        NetPubSub(address, b"not the key").connect()
    with authenticated(broker) as bad:
        bad.sendall(proto.frame(99, b""))
        assert "unknown frame type 99" in closed_with_error(bad)
    with authenticated(broker) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(proto.frame(proto.SUB, proto.encode_topic(("s",))))
        pinged(stuck)
        publisher = connected(broker, clients)
        for _ in range(100):  # 6 MB for a client that reads nothing
            publisher.publish(("s",), blob=b"x" * 60_000)
        assert publisher.flush()
        wait_for(lambda: "slow consumer" in broker.output(), what="the stuck client cut")
    stats = connected(broker, clients).broker_statistics()
    assert stats is not None
    assert (stats["refused"], stats["slow_consumers"]) == (2, 1)


def test_flush_waits_for_the_brokers_pong(tmp_path: Path) -> None:
    """flush() returns only after the broker answered its PING, however slowly."""
    path, _ = fake_broker_credentials(tmp_path)
    answered = threading.Event()

    def behave(sock: socket.socket) -> None:
        while True:
            frame = sock.recv(5)
            if not frame:
                return
            if frame[4] == proto.PING:
                threading.Event().wait(0.3)  # a slow broker
                answered.set()
                sock.sendall(proto.frame(proto.PONG, b""))

    fake = FakeBroker(path, b"key", behave)
    pubsub = NetPubSub(path, b"key", timeout=5)
    try:
        pubsub.connect()
        assert pubsub.flush() is True
        assert answered.is_set()
    finally:
        pubsub.disconnect()
        fake.close()


def _within(seconds: float, call: Callable[[], object]) -> object:
    """What *call* returns or raises, run in a thread; fails the test if it takes longer."""
    outcome: List[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(call, '__name__', call)} still waiting after {seconds} s")
    return outcome[0]


def _stalled(count: Callable[[], int]) -> Callable[[], bool]:
    """A condition true once *count* has not moved for 0.3 s."""
    seen = {"n": -1, "since": time.monotonic()}

    def still() -> bool:
        n, now = count(), time.monotonic()
        if n != seen["n"]:
            seen.update(n=n, since=now)
        return n > 0 and now - seen["since"] >= 0.3

    return still


@pytest.mark.parametrize("size", [1000, 64_000], ids=["batched", "large"])
def test_a_broker_that_stops_reading_blocks_publish_only(tmp_path: Path, size: int) -> None:
    """Backpressure blocks the publishing thread; poll, flush, disconnect keep deadlines."""
    path, _ = fake_broker_credentials(tmp_path)
    release, stop = threading.Event(), threading.Event()
    fake = FakeBroker(path, b"key", lambda sock: release.wait(60))  # reads nothing
    pubsub = NetPubSub(path, b"key", timeout=1.0)
    published = [0]

    def flood() -> None:
        while not stop.is_set():
            pubsub.publish(("t",), pad=b"x" * size)
            published[0] += 1

    publisher = threading.Thread(target=flood, daemon=True)
    try:
        pubsub.connect()
        publisher.start()
        wait_for(_stalled(lambda: published[0]), 20, what="the publisher to block")
        assert pubsub._link.outbox.size + pubsub._link.outbox.batched_size <= 2 * MiB + size
        assert _within(3, lambda: pubsub.poll(0)) is False
        assert isinstance(_within(4, pubsub.flush), TimeoutError)
        assert isinstance(_within(4, pubsub.broker_statistics), TimeoutError)
        stop.set()
        assert _within(4, pubsub.disconnect) is None
        publisher.join(4)  # disconnect() ends the blocked publish too
        assert not publisher.is_alive()
    finally:
        stop.set()
        release.set()
        fake.close()


def test_a_process_exits_while_its_broker_does_not_read(tmp_path: Path) -> None:
    """The exit-time flush gives up after the timeout: the process ends."""
    path, _ = fake_broker_credentials(tmp_path)
    release = threading.Event()
    fake = FakeBroker(path, b"key", lambda sock: release.wait(60))
    child = (
        "import sys, threading, time\n"
        "from mpubsub import NetPubSub\n"
        "pubsub = NetPubSub(sys.argv[1], b'key', timeout=1.0)\n"
        "pubsub.connect()\n"
        "count = [0]\n"
        "def flood():\n"
        "    while True:\n"
        "        pubsub.publish(('t',), pad=b'x' * 1000)\n"
        "        count[0] += 1\n"
        "threading.Thread(target=flood, daemon=True).start()\n"
        "last, since = -1, time.monotonic()\n"
        "while time.monotonic() - since < 0.3:\n"
        "    if count[0] != last:\n"
        "        last, since = count[0], time.monotonic()\n"
        "    time.sleep(0.01)\n"
        "print('blocked', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", child, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"blocked\n"
            _, stderr = proc.communicate(timeout=15)
            assert proc.returncode == 0
            assert b"Traceback" not in stderr
            assert b"the broker did not read in 1.0 s: dropped" in stderr  # said, not silent
        finally:
            stop_process(proc)
            release.set()
            fake.close()


@pytest.mark.parametrize("bad", [1, 2], ids=["connect", "reconnect"])
def test_a_connection_lost_as_it_is_made_is_made_again(tmp_path: Path, bad: int) -> None:
    """A broker gone right after WELCOME (the SUB write fails): the pub-sub reconnects."""
    path, _ = fake_broker_credentials(tmp_path)
    welcome = proto.frame(proto.WELCOME, proto.welcome_body(proto.Limits()))

    def behave(sock: socket.socket) -> None:
        number = fake.accepted
        if number == bad:
            sock.shutdown(socket.SHUT_RD)  # the client's first write fails: EPIPE
            sock.sendall(welcome)
            return
        sock.sendall(welcome)
        decoder = proto.FrameDecoder(1 << 20)
        while data := sock.recv(65536):
            for kind, _ in decoder.feed(data):
                if kind == proto.SUB and number < bad:
                    return  # gone once it has the subscription: a restart
                if kind == proto.PING:
                    sock.sendall(proto.frame(proto.PONG, b""))

    fake = FakeBroker(path, b"key", behave, welcome=False)
    pubsub = NetPubSub(path, b"key", timeout=1.0)
    keep = lambda topic, **message: None  # noqa: E731
    pubsub.add_subscriber("t", keep)
    try:
        pubsub.connect()
        wait_for(pubsub.flush, 20, what="a connection that answers")
        assert fake.accepted == bad + 1
    finally:
        pubsub.disconnect()
        fake.close()


def test_a_slow_publisher_to_a_broker_that_does_not_read_is_held_back(tmp_path: Path) -> None:
    """Under 1 MiB/s, a publisher is still held back: what waits stays about 1 MiB."""
    path, _ = fake_broker_credentials(tmp_path)
    release, stop = threading.Event(), threading.Event()
    fake = FakeBroker(path, b"key", lambda sock: release.wait(60))  # reads nothing
    pubsub = NetPubSub(path, b"key", timeout=1.0)
    published = [0]

    def trickle() -> None:  # about 0.9 MiB/s
        while not stop.is_set():
            for _ in range(90):
                pubsub.publish(("t",), pad=b"x" * 1000)
                published[0] += 1
            time.sleep(0.1)

    def waiting() -> int:
        with pubsub._link.lock:
            return pubsub._link.outbox.size + pubsub._link.outbox.batched_size

    publisher = threading.Thread(target=trickle, daemon=True)
    limit = 2 * MiB + 64 * 1024
    try:
        pubsub.connect()
        publisher.start()
        blocked = _stalled(lambda: published[0])
        wait_for(lambda: waiting() > limit or blocked(), 30, what="the publisher held back")
        assert waiting() <= limit, f"{waiting()} bytes wait for the broker"
    finally:
        stop.set()
        release.set()
        with contextlib.suppress(RuntimeError):
            pubsub.disconnect()
        fake.close()


def test_flush_while_reconnecting_keeps_one_deadline(tmp_path: Path) -> None:
    """flush() waits for the reconnection and the answer within one timeout, not two."""
    path, _ = fake_broker_credentials(tmp_path)
    gone, done = threading.Event(), threading.Event()
    welcome = proto.frame(proto.WELCOME, proto.welcome_body(proto.Limits()))

    def behave(sock: socket.socket) -> None:
        if fake.accepted == 1:
            sock.sendall(welcome)
            gone.wait(10)
            return  # closed: the client reconnects
        time.sleep(1.5)  # a slow handshake, within the timeout
        sock.sendall(welcome)
        done.wait(20)  # and no answer to PING

    fake = FakeBroker(path, b"key", behave, welcome=False)
    pubsub = NetPubSub(path, b"key", timeout=2.0)
    try:
        pubsub.connect()
        gone.set()
        wait_for(lambda: (pubsub.poll(0.1), not pubsub.connected)[1], what="the connection lost")
        outcome = _within(3.0, pubsub.flush)  # 1.5 s, then a whole timeout: 3.5 s
        assert isinstance(outcome, TimeoutError), outcome
    finally:
        done.set()
        pubsub.disconnect()
        fake.close()


def test_an_answer_nobody_asked_for_is_not_taken(tmp_path: Path) -> None:
    """A PONG before any PING: the next flush() does not take it for its own."""
    path, _ = fake_broker_credentials(tmp_path)
    done = threading.Event()

    def behave(sock: socket.socket) -> None:
        if fake.accepted == 1:
            sock.sendall(proto.frame(proto.PONG, b""))
        done.wait(10)  # and no answer to anything

    fake = FakeBroker(path, b"key", behave)
    pubsub = NetPubSub(path, b"key", timeout=1.0)
    try:
        pubsub.connect()
        pubsub.poll(0.5)  # reads it
        outcome = _within(5, pubsub.flush)
        assert outcome is not True
    finally:
        done.set()
        pubsub.disconnect()
        fake.close()


def test_cli_pub_of_a_large_message_to_a_broker_that_does_not_read_is_one_line(
    tmp_path: Path,
) -> None:
    """`mpubsub pub` of 1.5 MB that the broker never reads: one line, in bounded time."""
    path, credentials = fake_broker_credentials(tmp_path)
    done = threading.Event()
    fake = FakeBroker(path, b"key", lambda sock: done.wait(60))  # reads nothing
    pairs = [f"k{n}={'x' * 100_000}" for n in range(15)]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mpubsub", "pub", "a", *pairs, "-c", str(credentials)],
            capture_output=True,
            text=True,
            timeout=40,
        )
    finally:
        done.set()
        fake.close()
    assert (result.returncode, result.stderr) == (
        1,
        "mpubsub: the broker did not read the message in 5.0 s\n",
    )


def test_large_messages_to_many_stall_nobody(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """A member fanning two 16 MB messages out to 30 connections of its own: pings prompt.

    The broker copied what was left of a large frame after each partial
    send: 16 MB per subscriber per round, pings waited 0.6-1.3 s.
    """
    broker = broker_factory(None)
    pinger = connected(broker, clients)
    topic = proto.encode_topic(("big",))
    readers = [authenticated(broker) for _ in range(30)]
    for sock in readers:
        sock.sendall(proto.frame(proto.SUB, topic))
        pinged(sock)
    publisher = authenticated(broker)
    frame = proto.pub_frame(topic, b"p" * 16_000_000)
    stamp = Identity(  # before the first message: who sent it
        "unix",
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        user=pwd.getpwuid(os.getuid()).pw_name,
    ).stamp()
    everything = (2 * len(frame) + len(stamp)) * len(readers)
    received = [0]

    def read_all() -> None:
        selector = selectors.DefaultSelector()
        for sock in readers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while received[0] < everything and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                with contextlib.suppress(BlockingIOError):
                    received[0] += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]

    def fan_out() -> None:
        publisher.sendall(frame + frame)

    with contextlib.ExitStack() as stack:
        for sock in [*readers, publisher]:
            stack.enter_context(sock)
        worst = worst_ping_during(pinger, fan_out, read_all)
    assert received[0] == everything, "not all delivered"
    assert worst < 0.3, f"a ping waited {worst * 1000:.0f} ms"
