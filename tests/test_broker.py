"""Tests for mpubsub._broker: a broker no client can stall or break."""

from __future__ import annotations

import functools
import glob
import hmac
import json
import multiprocessing.connection as mpc
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from mpubsub import AuthenticationError, Broker, NetPubSub, ProtocolError
from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake

from . import needs
from .conftest import (
    HELPERS,
    BrokerProcess,
    RawBridge,
    assert_serving,
    connected,
    subscribed,
    wait_for,
)

Received = List[Dict[str, Any]]


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed: reads reach EOF (or a reset)."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_stuck_subscriber_beside_fast_one(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """A fast subscriber process gets all 20,000 1 KiB messages; the stuck one is cut off."""
    broker = broker_factory(None, "--max-message-size", "1048576", "--max-buffer", "8388608")
    stuck, pub = connected(broker, clients), connected(broker, clients)
    stuck.add_subscriber("data", lambda topic, **message: None, weak=False)
    assert stuck.flush()  # and never polls
    acked = [0]

    def on_ack(topic: Tuple[str, ...], received: int) -> None:
        acked[0] = received

    pub.add_subscriber("ack", on_ack)
    assert pub.flush()
    fast = subprocess.Popen(
        [
            sys.executable,
            str(HELPERS / "subscriber.py"),
            str(broker.credentials),
            "data",
            "20000",
            "--ack-every",
            "500",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fast.stdout is not None
        assert fast.stdout.readline() == "ready\n"
        blob = b"x" * 1024
        for seq in range(20_000):
            # A healthy subscriber keeps up: stay at most 2,000 messages ahead of it.
            while seq - acked[0] > 2000:
                pub.poll(0.05)
                assert fast.poll() is None, "the fast subscriber exited"
            pub.publish("data", seq=seq, blob=blob)
        out, _ = fast.communicate(timeout=60)
    finally:
        if fast.poll() is None:
            fast.kill()
            fast.wait()
    assert out == "received 20000 in order\n"
    wait_for(lambda: "slow consumer" in broker.output(), what="the slow consumer log line")
    assert_serving(broker, clients)


def test_silent_peers_do_not_delay_others(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Silent unauthenticated connections never block a connect, and are dropped in time."""
    broker = broker_factory("127.0.0.1:0", "--handshake-timeout", "1")
    address, _ = broker.creds()
    silent = [socket.create_connection(address) for _ in range(50)]
    try:
        assert_serving(broker, clients)  # while all 50 are connected and silent
        for sock in silent:
            sock.setblocking(False)
        wait_for(lambda: all(closed_by_peer(s) for s in silent), what="silent peers dropped")
    finally:
        for sock in silent:
            sock.close()
    assert "no complete handshake in time" in broker.output()


def test_out_of_descriptors(
    broker_factory: Callable[..., BrokerProcess], clients: List[NetPubSub]
) -> None:
    """Near its descriptor limit, the broker refuses new clients with a log line; serves others."""
    needs.LIMITS.check(needs.which("prlimit"))
    broker = broker_factory(None, prefix=("prlimit", "--nofile=40:40"))
    pub = connected(broker, clients)
    sub = connected(broker, clients)
    got = subscribed(sub, "t")
    refused = 0
    while refused < 2 and len(clients) < 60:
        extra = NetPubSub.from_file(broker.credentials, timeout=0.5)
        try:
            extra.connect()
        except OSError:
            refused += 1
            continue
        clients.append(extra)
    assert refused > 0
    assert "max_connections lowered to 24 to fit the open file limit of 40" in broker.output()
    assert "refusing a connection: 24 connections, the limit (max_connections)" in broker.output()
    pub.publish("t", n=1)
    wait_for(lambda: sub.poll(0.05) or got, what="delivery while out of descriptors")
    for extra in clients[2:]:
        extra.disconnect()
    del clients[2:]
    wait_for(lambda: _connects(broker, clients), what="accepting to resume")


def _connects(broker: BrokerProcess, made: List[NetPubSub]) -> bool:
    pubsub = NetPubSub.from_file(broker.credentials, timeout=0.5)
    try:
        pubsub.connect()
    except OSError:
        return False
    made.append(pubsub)
    return True


def test_port_scan_does_not_kill_the_broker(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """Connections closed at once, politely or with a reset, leave the broker serving."""
    address, _ = broker.creds()
    for i in range(100):
        sock = connect_socket(address, 5)
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert_serving(broker, clients)


@pytest.mark.parametrize(
    "garbage",
    [os.urandom(4096), b"\x7f\xff\xff\xff" + b"x" * 100, b"\x00\x00\x00\x05abc"],
    ids=["random", "huge-length", "truncated"],
)
def test_garbage_before_auth(
    broker: BrokerProcess, clients: List[NetPubSub], garbage: bytes
) -> None:
    """Bytes that are no handshake close that connection only."""
    address, _ = broker.creds()
    with connect_socket(address, 5) as sock:
        sock.sendall(garbage)
        if len(garbage) < 20:
            sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        wait_for(lambda: closed_by_peer(sock), what="the broker to close the connection")
    assert_serving(broker, clients)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x00\x00\x03\x63abc", "unknown frame type 99"),
        (proto.HEADER.pack(1 << 30, proto.PUB), "exceeds the limit"),
        (proto.frame(proto.PUB, b"\x00\x00\x01\x00ab"), "PUB frame topic overruns the frame"),
        (proto.pub_frame(b"no separator", b"x"), "malformed topic"),
        (proto.frame(proto.HELLO, b"\x00\x01"), "unexpected frame type 1"),
    ],
    ids=["unknown-type", "oversized", "overrun", "bad-topic", "second-hello"],
)
def test_bad_frames_after_auth(
    broker: BrokerProcess, clients: List[NetPubSub], frame: bytes, reason: str
) -> None:
    """A malformed frame from an authenticated client closes it alone, with a log line."""
    bystander = connected(broker, clients)
    got = subscribed(bystander, None)
    offender = connected(broker, clients)
    with offender._link.lock:
        offender._link.write(frame)
    wait_for(lambda: reason in broker.output(), what=f"the log line {reason!r}")
    connected(broker, clients).publish("after", n=1)  # behind anything the offender got through
    wait_for(lambda: bystander.poll(0.05) or got, what="the message after the bad frame")
    assert got == [{"n": 1}]
    assert_serving(broker, clients)


def test_wrong_protocol_version(
    broker: BrokerProcess, clients: List[NetPubSub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client speaking another version gets a clear ProtocolError; the broker carries on."""
    monkeypatch.setattr(proto, "VERSION", 99)
    pubsub = NetPubSub.from_file(broker.credentials)
    with pytest.raises(
        ProtocolError,
        match=r"^the broker refused: unsupported protocol version 99; this broker speaks 1 and 2$",
    ):
        pubsub.connect()
    monkeypatch.undo()
    assert_serving(broker, clients)


def test_malicious_pickle_is_never_run_by_the_broker(
    broker: BrokerProcess, clients: List[NetPubSub], tmp_path: Path
) -> None:
    """A pickle that runs code when loaded, sent to a topic nobody wants, runs nowhere."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Tuple[Any, Tuple[str]]:
            return (os.system, (f"touch {marker}",))

    attacker = connected(broker, clients)
    frame = proto.pub_frame(proto.encode_topic(("nobody",)), pickle.dumps(Evil()))
    with attacker._link.lock:
        attacker._link.write(frame)
    assert attacker.flush()  # the broker has handled the frame
    assert not marker.exists()
    assert_serving(broker, clients)


def test_large_message_arrives_intact(broker: BrokerProcess, clients: List[NetPubSub]) -> None:
    """A 4 MiB message below the limit travels unchanged."""
    pub, sub = connected(broker, clients), connected(broker, clients)
    got = subscribed(sub, "big")
    blob = os.urandom(4 * 1024 * 1024)
    pub.publish("big", blob=blob)
    wait_for(lambda: sub.poll(0.1) or got, what="the large message")
    assert got == [{"blob": blob}]


# --- multiprocessing compatibility --------------------------------------------


def test_multiprocessing_client_authenticates(broker: BrokerProcess) -> None:
    """multiprocessing.connection.Client passes the handshake; with a wrong key it fails."""
    address, authkey = broker.creds()
    mpc.Client(address, authkey=authkey).close()
    with pytest.raises(AuthenticationError):
        mpc.Client(address, authkey=b"wrong")


def find_python(version: str) -> Optional[str]:
    """A working interpreter of that version, from pyenv or the PATH."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3")))
    candidates.append(shutil.which(f"python{version}") or "")
    for python in candidates:
        if python and subprocess.run([python, "-c", ""], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.parametrize("version", ["3.9", "3.12", "3.13"])
def test_other_pythons_authenticate(broker: BrokerProcess, version: str) -> None:
    """Python 3.12+'s {sha256} handshake and older Pythons' MD5 one are both accepted."""
    python = find_python(version)
    needs.OTHER_PYTHONS.check(python)
    assert python is not None
    address, authkey = broker.creds()
    code = (
        "import multiprocessing.connection as c\n"
        f"c.Client({address!r}, authkey={authkey!r}).close()\n"
        "print('good key accepted')\n"
        "try:\n"
        f"    c.Client({address!r}, authkey=b'bad')\n"
        "except c.AuthenticationError:\n"
        "    print('bad key refused')\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
    assert (result.stdout, result.stderr) == ("good key accepted\nbad key refused\n", "")


def test_challenge_forms() -> None:
    """Answers to legacy and {digest} challenges are the HMACs multiprocessing expects."""
    key = b"secret"
    legacy = os.urandom(20)
    framed = proto.answer_challenge(key, proto.CHALLENGE + legacy)
    assert framed[4:] == hmac.new(key, legacy, "md5").digest()
    modern = b"{sha256}" + os.urandom(40)
    framed = proto.answer_challenge(key, proto.CHALLENGE + modern)
    assert framed[4:] == b"{sha256}" + hmac.new(key, modern, "sha256").digest()
    proto.verify_answer(key, modern, hmac.new(key, modern, "md5").digest())
    with pytest.raises(AuthenticationError):
        proto.verify_answer(b"other", modern, framed[4:])


def test_raw_handshake_then_hello(broker: BrokerProcess) -> None:
    """The sequence a client speaks: authenticate, HELLO, WELCOME with the size limits."""
    address, authkey = broker.creds()
    # multiprocessing's own Client authenticates: the broker speaks its handshake.
    with (
        mpc.Client(address, authkey=authkey) as conn,
        socket.socket(fileno=os.dup(conn.fileno())) as sock,
    ):
        sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(proto.VERSION)))
        header = sock.recv(5 + proto.WELCOME_BODY.size, socket.MSG_WAITALL)
    _size, kind = proto.HEADER.unpack_from(header)
    assert kind == proto.WELCOME
    assert proto.WELCOME_BODY.unpack_from(header, 5) == (2, 16 * 2**20, 128, 4096, 10_000, 2**20)


@pytest.mark.parametrize("version", [1, 2])
def test_senders_are_named_to_version_2_clients_only(
    broker: BrokerProcess, clients: List[NetPubSub], version: int
) -> None:
    """A client that said HELLO 2 gets a SENDER frame before each publisher's messages (once
    per change); one that said HELLO 1, as before, only the messages."""
    address, authkey = broker.creds()
    with (
        mpc.Client(address, authkey=authkey) as conn,
        socket.socket(fileno=os.dup(conn.fileno())) as sock,
    ):
        sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(version)))
        decoder = proto.FrameDecoder(1 << 30)
        frames: List[proto.Frame] = []

        def until(kind: int, count: int) -> List[int]:
            while sum(k == kind for k, _ in frames) < count:
                frames.extend(decoder.feed(sock.recv(65536)))
            return [k for k, _ in frames]

        until(proto.WELCOME, 1)
        sock.sendall(proto.frame(proto.SUB, proto.encode_topic(("t",))) + _PING)
        until(proto.PONG, 1)
        first, second = connected(broker, clients), connected(broker, clients)
        for pubsub in (first, first, second, first):
            pubsub.publish("t", n=1)
            assert pubsub.flush()
        kinds = until(proto.PUB, 4)[2:]
    pub, sender = proto.PUB, proto.SENDER
    if version == 1:
        assert kinds == [pub] * 4
    else:
        assert kinds == [sender, pub, pub, sender, pub, sender, pub]
        named = [json.loads(f[5:]) for k, f in frames if k == sender]
        assert [n.get("pid") for n in named] == [os.getpid()] * 3 or all(
            n["address"][0] == "127.0.0.1" for n in named
        )


_PING = proto.frame(proto.PING, b"")


def test_in_process_broker_stops_and_cleans_up(tmp_path: Path) -> None:
    """Broker() binds at once, start() serves until stop(), then its socket file is gone."""
    path = str(tmp_path / "inproc.sock")
    broker = Broker(path, b"key")
    assert broker.address == path and os.path.exists(path)
    thread = threading.Thread(target=broker.start)
    thread.start()
    try:
        with NetPubSub(path, b"key") as pubsub:
            assert pubsub.flush()
    finally:
        broker.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert not os.path.exists(path)


def test_default_address_is_private_unix_socket() -> None:
    """Broker() with no address listens on a fresh Unix socket, removed with its directory."""
    broker = Broker(authkey=b"k")
    path = broker.address
    assert isinstance(path, str) and os.path.exists(path)
    broker.stop()
    broker.start()  # returns at once: already stopped
    assert not os.path.exists(os.path.dirname(path))


def test_live_socket_is_not_stolen(tmp_path: Path) -> None:
    """A second broker on a live socket path fails; a stale one is replaced."""
    path = str(tmp_path / "s.sock")
    first = Broker(path, b"k")
    with pytest.raises(OSError, match="already listening"):
        Broker(path, b"k")
    first.stop()
    first.start()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file with nobody listening
    stale.close()
    second = Broker(path, b"k")
    second.stop()
    second.start()


def test_bridge_gets_everything_and_the_interest(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A bridge learns the topics subscribed (first and last holder only) and every message."""
    early = connected(broker, clients)

    def on_a(topic: Tuple[str, ...], **message: Any) -> None:
        pass

    early.add_subscriber(("a",), on_a)
    assert early.flush()
    bridge = RawBridge(broker)
    try:
        assert bridge.receive(1) == [(proto.SUB, proto.encode_topic(("a",)))]  # the current set
        late = connected(broker, clients)
        subscribed(late, ("a",))  # a second holder: nothing new for the bridge
        subscribed(late, ("b", "c"))
        late.publish(("z",), n=1)  # nobody here wants it; the bridge does
        assert late.flush()
        early.remove_subscriber(("a",), on_a)
        assert early.flush()
        frames = bridge.receive(4)[1:]
        assert frames[0] == (proto.SUB, proto.encode_topic(("b", "c")))
        assert frames[1][0] == proto.SENDER  # who published what follows
        sender = json.loads(frames[1][1])
        assert sender.get("pid") == os.getpid() or sender["address"][0] == "127.0.0.1"
        assert frames[2][0] == proto.PUB and frames[2][1][4:].startswith(proto.encode_topic(("z",)))
        assert len(frames) == 3  # ('a',) still has a holder: no UNSUB
        late.disconnect()
        kinds = set(bridge.receive(6)[4:])
        assert kinds == {(proto.UNSUB, proto.encode_topic(t)) for t in [("a",), ("b", "c")]}
        # Messages from the bridge reach local subscribers, and never come back to it.
        got = subscribed(early, ("x",))
        bridge.sock.sendall(proto.pub_frame(proto.encode_topic(("x",)), pickle.dumps({"n": 2})))
        wait_for(lambda: early.poll(0.05) or got, what="the bridge's message")
        assert got == [{"n": 2}]
        assert [k for k, _ in bridge.receive(7)[6:]] == [proto.SUB]  # ('x',) by early
    finally:
        bridge.sock.close()


def test_one_bridge_at_a_time_and_its_figures(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """A second bridge is refused; the bridge's figures appear in the stats, then its absence."""
    first = RawBridge(broker)
    try:
        first.sock.sendall(
            proto.frame(proto.FEDERATION, b'{"state": "connected", "reconnects": 1}')
        )
        first.sock.sendall(proto.frame(proto.PING, b""))
        assert first.receive(1)[-1][0] == proto.PONG
        observer = connected(broker, clients)
        stats = observer.broker_statistics()
        assert stats is not None
        assert stats["federation"] == {"state": "connected", "reconnects": 1, "dropped_behind": 0}
        assert stats["clients"] == 1  # the observer: the bridge is counted apart
        second = RawBridge(broker)
        with second.sock:
            second.sock.setblocking(False)
            wait_for(lambda: closed_by_peer(second.sock), what="the second bridge refused")
        assert "is already the federation bridge" in broker.output()
    finally:
        first.sock.close()
    wait_for(
        lambda: (
            (observer.broker_statistics() or {}).get("federation", {}).get("state")
            == "bridge not running"
        ),
        what="the broker to notice the bridge is gone",
    )


def test_a_burst_over_a_rounds_budget_is_delivered_whole(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """Frames a client sent past its share of one round wait for the next rounds, and
    every one of them is handled, in order: 3,000 messages read at once, fanned out
    to 40 subscribers (far more work than a round allows), arrive whole everywhere."""
    subscribers = [connected(broker, clients) for _ in range(40)]
    received = [subscribed(sub, "t") for sub in subscribers]
    address, authkey = broker.creds()
    topic = proto.encode_topic(("t",))
    burst = b"".join(proto.pub_frame(topic, pickle.dumps({"n": n})) for n in range(3000))
    with connect_socket(address, 5) as publisher:
        handshake(publisher, authkey)
        publisher.sendall(burst)
        for sub, got in zip(subscribers, received):
            wait_for(functools.partial(_delivered, sub, got, 3000), 60, what="the whole burst")
            assert got == [{"n": n} for n in range(3000)]


def _delivered(sub: NetPubSub, got: List[Dict[str, Any]], count: int) -> bool:
    """Deliver what arrived; True once *count* messages were."""
    sub.poll(0.05)
    return len(got) >= count
