"""Load, faults and hostile input: one bad client cannot hurt the others.

Fast by default (part of ``make test``); ``make soak`` runs the same tests
with MPUBSUB_SOAK=1 and figures ten times larger (minutes).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from mpubsub import NetPubSub
from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket

from .conftest import BrokerProcess, broker_rss, stopped, subscribed, wait_for

SOAK = os.environ.get("MPUBSUB_SOAK") == "1"
SCALE = 10 if SOAK else 1


def broker_fds(broker: BrokerProcess) -> int:
    return len(os.listdir(f"/proc/{broker.pid}/fd"))


@pytest.fixture
def many_files() -> Iterator[None]:
    """Let this test process hold as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_many_clients_each_get_everything_once(
    broker_factory: Callable[..., BrokerProcess], many_files: None
) -> None:
    """500 clients on a shared topic and their own: a publisher reaches each exactly once."""
    broker = broker_factory()
    count = 500 * (2 if SOAK else 1)
    got: Dict[int, List[Tuple[Tuple[str, ...], int]]] = {i: [] for i in range(count)}
    clients: List[NetPubSub] = []
    callbacks = []
    try:
        for i in range(count):
            pubsub = NetPubSub.from_file(broker.credentials)
            pubsub.connect()

            def on_message(topic: Tuple[str, ...], n: int, i: int = i) -> None:
                got[i].append((topic, n))

            callbacks.append(on_message)
            pubsub.add_subscriber("shared", on_message)
            pubsub.add_subscriber(("own", str(i)), on_message)
            clients.append(pubsub)
        for pubsub in clients:
            assert pubsub.flush()
        assert "open file limit" in broker.output()
        with NetPubSub.from_file(broker.credentials) as publisher:
            for n in range(3):
                publisher.publish("shared", n=n)
            for i in range(count):
                publisher.publish(("own", str(i)), n=i)

        def everyone_has_all() -> bool:
            for pubsub in clients:
                pubsub.poll(0)
            return all(len(messages) >= 4 for messages in got.values())

        wait_for(everyone_has_all, timeout=60, what="every client to get its 4 messages")
        for i, messages in got.items():
            assert messages == [
                (("shared",), 0),
                (("shared",), 1),
                (("shared",), 2),
                (("own", str(i)), i),
            ]
    finally:
        for pubsub in clients:
            pubsub.disconnect()


def test_churn_returns_to_baseline(
    broker_factory: Callable[..., BrokerProcess], helpers: Callable[..., Any]
) -> None:
    """Clients that vanish without a goodbye leave no descriptor and no memory behind."""
    broker = broker_factory()
    address, _ = broker.creds()

    def churn(rounds: int) -> None:
        for _ in range(rounds):
            pubsub = NetPubSub.from_file(broker.credentials)
            pubsub.connect()
            pubsub.add_subscriber("t", print, weak=False)
            pubsub._link._close()  # the socket closes: no goodbye
            with connect_socket(address, 5):
                pass  # a connection that never authenticates
        killed = [helpers("subscriber", broker.credentials, "t", 1) for _ in range(rounds // 20)]
        for proc in killed:
            proc.kill()
            proc.wait()

    with NetPubSub.from_file(broker.credentials) as probe:

        def settled() -> bool:
            stats = probe.broker_statistics()
            return stats is not None and stats["clients"] == 1 and stats["subscriptions"] == 0

        churn(40)  # warm up: allocator pools, route caches
        wait_for(settled, what="the warm-up clients to be gone")
        fds, rss = broker_fds(broker), broker_rss(broker)
        churn(300 * SCALE)
        wait_for(lambda: settled() and broker_fds(broker) == fds, what=f"{fds} descriptors again")
        assert broker_rss(broker) - rss < 4 * 1024 * 1024


def test_steady_memory(
    broker_factory: Callable[..., BrokerProcess], helpers: Callable[..., Any]
) -> None:
    """250,000 messages through the broker: its memory stays flat after warm-up."""
    broker = broker_factory()
    total = 250_000 * SCALE
    sub = helpers(
        "subscriber", broker.credentials, "data", total, "--ack-every", 5000, "--seconds", 600
    )
    acked = [0]
    rss: List[int] = []

    def on_ack(topic: Tuple[str, ...], received: int) -> None:
        acked[0] = received

    with NetPubSub.from_file(broker.credentials) as pub:
        pub.add_subscriber("ack", on_ack)
        assert pub.flush()
        for seq in range(total):
            while seq - acked[0] > 20_000:  # a healthy subscriber keeps up
                pub.poll(0.05)
                assert sub.poll() is None, "the subscriber exited"
            pub.publish("data", seq=seq, blob=b"x" * 64)
            if seq == 50_000:
                rss.append(broker_rss(broker))
        out, _ = sub.communicate(timeout=600)
        rss.append(broker_rss(broker))
    assert out.endswith(f"received {total} in order\n")
    assert rss[1] - rss[0] < 20 * 1024 * 1024, f"grew by {(rss[1] - rss[0]) / 2**20:.1f} MiB"


def test_silent_crowd_and_replayed_handshake(broker_factory: Callable[..., BrokerProcess]) -> None:
    """200 silent peers delay no one and are dropped; a replayed answer is refused."""
    broker = broker_factory(None, "--handshake-timeout", "2")
    address, authkey = broker.creds()
    silent = [connect_socket(address, 5) for _ in range(200)]
    try:
        with NetPubSub(address, authkey, timeout=1.0) as pubsub:  # fails past a second
            assert pubsub.flush()
        # A replay: the right answer to one challenge, sent to another.
        with connect_socket(address, 5) as first, connect_socket(address, 5) as second:
            challenge = first.recv(256)[4:]
            answer = proto.answer_challenge(authkey, challenge)
            second.recv(256)
            second.sendall(answer)
            assert second.recv(256)[4:] == proto.FAILURE_MSG
            assert second.recv(256) == b""
        for sock in silent:
            sock.settimeout(10)
        wait_for(lambda: all(_dropped(s) for s in silent), what="the silent peers dropped")
    finally:
        for sock in silent:
            sock.close()
    log = broker.output()
    # Those that were not closed to make room for newer ones (max_handshakes_per_peer)
    # timed out.
    dropped = log.count("no complete handshake in time")
    assert dropped >= 1
    assert dropped + log.count("making room for a new connection") >= 200
    assert "authentication failed: digest received was wrong" in log


def _dropped(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except (TimeoutError, OSError):
        return False
    return True


def test_order_and_loss_beside_a_stuck_subscriber(
    broker_factory: Callable[..., BrokerProcess], helpers: Callable[..., Any]
) -> None:
    """Publisher and subscriber processes: all in each publisher's order; the stuck one is cut."""
    broker = broker_factory(None, "--max-message-size", "1048576", "--max-buffer", "4194304")
    publishers, per_publisher = 3, 2000 * SCALE
    subs = [
        helpers(
            "subscriber", broker.credentials, "data", publishers * per_publisher, "--seconds", 300
        )
        for _ in range(3)
    ]
    with (
        NetPubSub.from_file(broker.credentials) as stuck,
        NetPubSub.from_file(broker.credentials) as bulk,
    ):
        stuck.add_subscriber("data", print, weak=False)
        stuck.add_subscriber("bulk", print, weak=False)
        assert stuck.flush()  # and never reads again
        pubs = [
            helpers("publisher", broker.credentials, "data", per_publisher, f"p{i}")
            for i in range(publishers)
        ]
        for _ in range(10):  # 10 MiB that only the stuck subscriber wants
            bulk.publish("bulk", blob=b"y" * (1024 * 1024 - 100))
        for proc in pubs:
            assert proc.communicate(timeout=300)[0] == f"sent {per_publisher}\n"
        for proc in subs:
            out, _ = proc.communicate(timeout=300)
            assert out == f"received {publishers * per_publisher} in order\n"
        wait_for(lambda: "slow consumer" in broker.output(), what="the stuck subscriber cut off")


def test_broker_killed_under_load_and_restarted(
    broker_factory: Callable[..., BrokerProcess], helpers: Callable[..., Any], tmp_path: Any
) -> None:
    """Killed with SIGKILL mid-stream and restarted: clients reconnect and traffic resumes."""
    address = str(tmp_path / "restart.sock")
    first = broker_factory(address, name="restart")
    least = 500 * SCALE
    # Both run until told to stop: traffic goes on, however long the restart takes.
    sub = helpers("subscriber", first.credentials, "data", 0, "--gaps", "--seconds", 300)
    pub = helpers("publisher", first.credentials, "data", 0, "p", "--pause", 0.001)

    wait_for(lambda: delivered(first) > least, 60, what="traffic before the kill")
    first.kill(signal.SIGKILL)
    second = broker_factory(address, "--overwrite", name="restart")
    after = wait_for(
        lambda: (n := delivered(second)) > least and n, 60, what="traffic after the restart"
    )
    sent = stopped(pub, r"sent (\d+)")
    # What was in flight may be lost (at most once); nothing is reordered or repeated.
    # The subscriber is the only one: it has all the new broker delivered, and more.
    received = stopped(sub, r"stopped (\d+) in order")
    assert after <= received <= sent


def test_gigabyte_message_refused_before_sending(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """A 1 GiB message raises ValueError in publish; nothing is sent; all stays usable."""
    broker = broker_factory()
    with (
        NetPubSub.from_file(broker.credentials) as pub,
        NetPubSub.from_file(broker.credentials) as sub,
    ):
        got = subscribed(sub, "t")
        with pytest.raises(ValueError, match=r"exceeds the broker's limit of 16777216 bytes$"):
            pub.publish("t", blob=bytes(1 << 30))
        assert got == []
        pub.publish("t", ok=True)
        wait_for(lambda: sub.poll(0.05) or got, what="the next message")
        assert got == [{"ok": True}]
        stats = pub.broker_statistics()
        assert stats is not None and stats["messages_in"] == 1


def test_non_loopback_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Listening beyond loopback is logged as plain text on the wire; loopback is not."""
    from mpubsub._sockets import warn_if_exposed  # noqa: PLC0415

    warn_if_exposed("127.0.0.1")
    warn_if_exposed("::1")
    assert caplog.records == []
    warn_if_exposed("192.0.2.10")  # only looked at, never bound
    (record,) = caplog.records
    assert "plain text" in record.getMessage()


def test_broker_frozen_then_killed_under_a_flood_repeats_nothing(
    broker_factory: Callable[..., BrokerProcess], helpers: Callable[..., Any], tmp_path: Any
) -> None:
    """Frozen (SIGSTOP) mid-flood, then killed and restarted: no message arrives twice.

    The publisher is left blocked in backpressure with a batch partly
    written; what the broker had already read of it must not be sent again.
    """
    address = str(tmp_path / "frozen.sock")
    first = broker_factory(address, name="frozen")
    # A flood until told to stop: still under way when the broker freezes, and after.
    sub = helpers("subscriber", first.credentials, "flood", 0, "--gaps", "--seconds", 300)
    pub = helpers("publisher", first.credentials, "flood", 0, "p", "--size", 1024)

    wait_for(lambda: delivered(first) > 1000, what="the flood under way")
    os.kill(first.pid, signal.SIGSTOP)
    wait_for(lambda: waiting_to_write(pub.pid), what="the publisher held by backpressure")
    os.kill(pub.pid, signal.SIGSTOP)  # it finds the broker gone only once the subscriber is back
    first.kill(signal.SIGKILL)
    second = broker_factory(address, "--overwrite", name="frozen")
    wait_for(lambda: subscriptions(second) == 1, what="the subscriber back")
    os.kill(pub.pid, signal.SIGCONT)
    after = wait_for(
        lambda: (n := delivered(second)) > 1000 and n, 60, what="traffic after the restart"
    )
    sent = stopped(pub, r"sent (\d+)")
    received = stopped(sub, r"stopped (\d+) in order")  # nothing twice
    assert after <= received <= sent


def delivered(broker: BrokerProcess) -> int:
    return figure(broker, "messages_out")


def subscriptions(broker: BrokerProcess) -> int:
    return figure(broker, "subscriptions")


def figure(broker: BrokerProcess, key: str) -> int:
    """One of the broker's figures, asked by a client of its own (0 if out of reach)."""
    with NetPubSub.from_file(broker.credentials) as watcher:
        stats = watcher.broker_statistics()
    return 0 if stats is None else int(stats[key])


def waiting_to_write(pid: int) -> bool:
    """True while a thread of process *pid* waits in select() or poll() (Linux, x86-64)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "syscall").read_text().split()[0] in {"7", "23", "270", "271"}:
                return True
        except (OSError, IndexError):
            continue
    return False
