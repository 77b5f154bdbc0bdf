"""Tests for mpubsub._netpubsub: NetPubSub against real broker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import pwd
import resource
import selectors
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

import pytest

import mpubsub
import mpubsub.broker
import mpubsub.net
from mpubsub import AuthenticationError, Broker, CredentialsError, NetPubSub
from mpubsub import _protocol as proto
from mpubsub._credentials import write_credentials
from mpubsub.errors import MPubSubError

from .conftest import BrokerProcess, FakeBroker, connected, old_broker, subscribed, wait_for

Received = List[Tuple[Tuple[str, ...], Dict[str, Any]]]


class Recording(NetPubSub):
    """A NetPubSub that also records every message the broker sent it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire: List[bytes] = []

    def _dispatch(self, frames: List[bytes]) -> bool:
        self.wire.extend(f for f in frames if proto.kind_of(f) == proto.PUB)
        return super()._dispatch(frames)


@pytest.fixture
def connect(broker: BrokerProcess) -> Iterator[Callable[..., NetPubSub]]:
    """Make connected pub-subs for the broker; all are disconnected at the end."""
    made: List[NetPubSub] = []

    def make(cls: Type[NetPubSub] = NetPubSub) -> NetPubSub:
        pubsub = cls.from_file(broker.credentials)
        pubsub.connect()
        made.append(pubsub)
        return pubsub

    yield make
    for pubsub in made:
        with contextlib.suppress(RuntimeError):  # disconnected by the test already
            pubsub.disconnect()


def collect(received: Received) -> Callable[..., None]:
    def subscriber(topic: Tuple[str, ...], **message: Any) -> None:
        received.append((topic, message))

    return subscriber


def poll_until(pubsub: NetPubSub, condition: Callable[[], Any], what: str = "messages") -> None:
    """Deliver what arrives until *condition* holds (or fail after a deadline)."""

    def step() -> Any:
        pubsub.poll(0.05)
        return condition()

    wait_for(step, what=what)


def test_public_names() -> None:
    """The 0.0.1 names exist: mpubsub.net.PubSub is NetPubSub, mpubsub.broker has Broker, main."""
    assert mpubsub.net.PubSub is NetPubSub
    assert mpubsub.broker.Broker is mpubsub.Broker
    assert callable(mpubsub.broker.main)
    assert issubclass(NetPubSub, mpubsub.PubSub)
    assert issubclass(CredentialsError, MPubSubError)


def test_current_sender_names_the_publisher_of_each_message(
    connect: Callable[..., NetPubSub], tmp_path: Path
) -> None:
    """Inside a delivery from the broker, current_sender() is who published that message, as
    the broker says; None for a local publish, even inside such a delivery, and outside."""
    sub, first = connect(), connect()
    seen: List[Tuple[Any, ...]] = []

    def on_message(topic: Tuple[str, ...], **message: Any) -> None:
        sender = mpubsub.current_sender()
        seen.append((message["n"], sender))
        if message["n"] == 2:
            sub.publish("inner", n=-1)  # delivered here, from no broker: no sender

    def on_inner(topic: Tuple[str, ...], **message: Any) -> None:
        seen.append(("inner", mpubsub.current_sender()))

    sub.add_subscriber("t", on_message)
    sub.add_subscriber("inner", on_inner)
    assert sub.flush()
    script = tmp_path / "publish.py"
    script.write_text(
        "import sys\n"
        "from mpubsub import NetPubSub\n"
        "with NetPubSub.from_file(sys.argv[1]) as pubsub:\n"
        "    pubsub.publish('t', n=2)\n"
        "    pubsub.flush()\n"
    )
    first.publish("t", n=1)
    assert first.flush()
    other = subprocess.run(
        [sys.executable, str(script), str(sub._link.credentials)], check=True, timeout=30
    )
    first.publish("t", n=3)
    assert first.flush()
    wait_for(lambda: (sub.poll(0.05), len(seen) >= 4)[1], what="the three messages")
    assert [n for n, _ in seen] == [1, 2, "inner", 3]
    senders = [sender for _, sender in seen]
    assert senders[2] is None and mpubsub.current_sender() is None
    assert senders[0] == senders[3] and senders[0] != senders[1]
    for sender in (senders[0], senders[1]):
        assert isinstance(sender, mpubsub.Sender) and sender.host is None
        if sender.address is None:  # Unix socket: the kernel's word
            assert (sender.uid, sender.gid) == (os.getuid(), os.getgid())
            assert sender.user == pwd.getpwuid(os.getuid()).pw_name
        else:
            assert sender.uid is None and sender.address[0] == "127.0.0.1"
    if senders[0] is not None and senders[0].address is None:
        assert senders[0].pid == os.getpid() and senders[1].pid != os.getpid()
    assert other.returncode == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        senders[0].uid = 0


def test_delivery_no_echo(connect: Callable[..., NetPubSub]) -> None:
    """A message reaches the other pub-sub once, and local subscribers once, never echoed."""
    alice, bob = connect(Recording), connect()
    assert isinstance(alice, Recording)
    here: Received = []
    there: Received = []
    sub_here, sub_there = collect(here), collect(there)
    alice.add_subscriber("news", sub_here)
    bob.add_subscriber("news", sub_there)
    assert bob.flush()
    alice.publish("news", n=1)
    poll_until(bob, lambda: there)
    assert there == [(("news",), {"n": 1})]
    assert here == [(("news",), {"n": 1})]
    bob.publish("news", n=2)  # alice's sentinel: after it, nothing else may arrive
    poll_until(alice, lambda: len(here) == 2)
    assert here == [(("news",), {"n": 1}), (("news",), {"n": 2})]
    assert len(alice.wire) == 1  # bob's message only: alice's own never came back


def test_local_topic_stays_local(connect: Callable[..., NetPubSub]) -> None:
    """A topic ending in '*local' is delivered in its pub-sub only."""
    alice, bob = connect(), connect(Recording)
    assert isinstance(bob, Recording)
    here: Received = []
    there: Received = []
    sub_here, sub_there = collect(here), collect(there)
    alice.add_subscriber(None, sub_here)
    bob.add_subscriber(None, sub_there)
    assert bob.flush()
    alice.publish(("x", "*local"), secret=1)
    alice.publish("done")
    poll_until(bob, lambda: there)
    assert there == [(("done",), {})]
    assert here == [(("x", "*local"), {"secret": 1}), (("done",), {})]


def test_routing_by_subscription(connect: Callable[..., NetPubSub]) -> None:
    """Hierarchy, catch-all and broadcast hold across the network; others get nothing."""
    pub = connect()
    parent, catch_all, other = connect(), connect(), connect(Recording)
    assert isinstance(other, Recording)
    got: Dict[str, Received] = {"parent": [], "all": [], "other": []}
    subs = {name: collect(lst) for name, lst in got.items()}
    parent.add_subscriber("a", subs["parent"])
    catch_all.add_subscriber(None, subs["all"])
    other.add_subscriber(("z", "y"), subs["other"])
    for p in (parent, catch_all, other):
        assert p.flush()
    pub.publish(("a", "b"), n=1)
    pub.publish("z", n=2)  # a parent of ('z', 'y'): not for 'other'
    pub.publish(None, n=3)  # broadcast: everyone
    poll_until(other, lambda: got["other"])
    poll_until(parent, lambda: len(got["parent"]) == 2)
    poll_until(catch_all, lambda: len(got["all"]) == 3)
    assert got["parent"] == [(("a", "b"), {"n": 1}), ((), {"n": 3})]
    assert got["all"] == [(("a", "b"), {"n": 1}), (("z",), {"n": 2}), ((), {"n": 3})]
    assert got["other"] == [((), {"n": 3})]
    assert len(other.wire) == 1  # the broker did not send it the others


def test_unsubscribe_stops_remote_delivery(connect: Callable[..., NetPubSub]) -> None:
    """After the last subscriber of a topic goes, the broker stops sending it."""
    pub, sub = connect(), connect(Recording)
    assert isinstance(sub, Recording)
    got: Received = []
    fn = collect(got)
    sub.add_subscriber("t", fn)
    sub.add_subscriber("sentinel", fn)
    assert sub.flush()
    pub.publish("t", n=0)
    poll_until(sub, lambda: got)  # the broker sends 't' while it has a subscriber
    sub.remove_subscriber("t", fn)
    assert sub.flush()  # the broker has the UNSUB
    pub.publish("t", n=1)
    pub.publish("sentinel")
    poll_until(sub, lambda: len(got) == 2)
    assert got == [(("t",), {"n": 0}), (("sentinel",), {})]
    assert len(sub.wire) == 2


def test_unpicklable_raises_before_delivery(connect: Callable[..., NetPubSub]) -> None:
    """A message that cannot be pickled raises and reaches no subscriber."""
    alice = connect()
    got: Received = []
    fn = collect(got)
    alice.add_subscriber("t", fn)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        alice.publish("t", f=lambda: None)
    assert got == []
    alice.publish("t", ok=True)
    assert got == [(("t",), {"ok": True})]


def test_oversized_message_is_refused(connect: Callable[..., NetPubSub]) -> None:
    """publish raises ValueError for a message over the broker's limit; all stays usable."""
    alice, bob = connect(), connect()
    got: Received = []
    fn = collect(got)
    bob.add_subscriber("t", fn)
    assert bob.flush()
    with pytest.raises(ValueError, match=r"^message of \d+ bytes exceeds the broker's limit"):
        alice.publish("t", blob=b"x" * (17 * 1024 * 1024))
    alice.publish("t", small=1)
    poll_until(bob, lambda: got)
    assert got == [(("t",), {"small": 1})]


def test_wrong_key(broker: BrokerProcess, connect: Callable[..., NetPubSub]) -> None:
    """A wrong key raises AuthenticationError; connected clients carry on."""
    address, _ = broker.creds()
    good, other = connect(), connect()
    got: Received = []
    fn = collect(got)
    other.add_subscriber("t", fn)
    assert other.flush()
    with pytest.raises(AuthenticationError):
        NetPubSub(address, b"wrong key").connect()
    good.publish("t")
    poll_until(other, lambda: got)


def test_from_file_refuses_unsafe_credentials(broker: BrokerProcess, tmp_path: Path) -> None:
    """Credentials that group or others can write are refused with a clear error."""
    unsafe = tmp_path / "unsafe.pckl"
    unsafe.write_bytes(broker.credentials.read_bytes())
    unsafe.chmod(0o662)
    with pytest.raises(CredentialsError, match=r"others can write it \(mode 662\)$"):
        NetPubSub.from_file(unsafe)
    with pytest.raises(CredentialsError, match=r"No such file or directory$"):
        NetPubSub.from_file(tmp_path / "missing.pckl")


def test_from_file_refuses_pickled_code(tmp_path: Path) -> None:
    """A credentials file that would run code when unpickled is refused, not run."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Tuple[Any, Tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pckl"
    path.write_bytes(pickle.dumps((Evil(), b"key")))
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match="is not an"):
        NetPubSub.from_file(path)
    assert not marker.exists()


def test_fileno_drives_a_selector(connect: Callable[..., NetPubSub]) -> None:
    """fileno() is readable when poll() has messages to deliver."""
    alice, bob = connect(), connect()
    got: Received = []
    fn = collect(got)
    bob.add_subscriber("t", fn)
    assert bob.flush()
    with selectors.DefaultSelector() as sel:
        sel.register(bob.fileno(), selectors.EVENT_READ)
        alice.publish("t", n=1)
        assert sel.select(timeout=10)
    assert bob.poll() is True
    assert got == [(("t",), {"n": 1})]
    assert bob.poll() is False


def test_context_manager_and_states(broker: BrokerProcess) -> None:
    """The context manager connects and disconnects; misuse raises RuntimeError."""
    address, authkey = broker.creds()
    pubsub = NetPubSub(address, authkey)
    with pytest.raises(RuntimeError, match=r"^Not connected$"):
        pubsub.poll()
    with pubsub:
        assert pubsub.connected
        with pytest.raises(RuntimeError, match=r"^Already connected$"):
            pubsub.connect()
        with pytest.raises(RuntimeError, match=r"^Cannot change broker on a connected pub-sub$"):
            pubsub.set_broker(address, authkey)
    assert not pubsub.connected
    with pytest.raises(RuntimeError, match=r"^Not connected$"):
        pubsub.disconnect()


def test_disconnected_publish_is_local(broker: BrokerProcess) -> None:
    """Before connect(), publish delivers locally only, as in 0.0.1."""
    pubsub = NetPubSub.from_file(broker.credentials)
    got: Received = []
    fn = collect(got)
    pubsub.add_subscriber("t", fn)
    pubsub.publish("t", n=1)
    assert got == [(("t",), {"n": 1})]


def test_subscriber_publishing_from_poll(connect: Callable[..., NetPubSub]) -> None:
    """A subscriber may publish while poll delivers (an echo service)."""
    client, echo = connect(), connect()
    replies: Received = []
    reply_fn = collect(replies)

    def echo_fn(topic: Tuple[str, ...], **message: Any) -> None:
        echo.publish("pong", **message)

    echo.add_subscriber("ping", echo_fn)
    client.add_subscriber("pong", reply_fn)
    assert echo.flush() and client.flush()
    stop = threading.Event()
    server = threading.Thread(target=lambda: [echo.poll(0.05) for _ in iter(stop.is_set, True)])
    server.start()
    try:
        for i in range(50):
            client.publish("ping", i=i)
            poll_until(client, lambda i=i: len(replies) == i + 1)  # type: ignore[misc]
    finally:
        stop.set()
        server.join(timeout=10)
    assert [m["i"] for _, m in replies] == list(range(50))


def test_reconnects_after_broker_restart(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Killed and restarted with a new key, the broker gets its clients back by themselves."""
    address = str(tmp_path / "r.sock")
    first = broker_factory(address, name="restart")
    sub, pub = NetPubSub.from_file(first.credentials), NetPubSub.from_file(first.credentials)
    got: Received = []
    fn = collect(got)
    sub.add_subscriber("t", fn)
    with sub, pub:
        assert sub.flush()
        pub.publish("t", n=0)
        poll_until(sub, lambda: got)
        first.kill()
        poll_until(sub, lambda: not sub.connected, "the loss noticed")
        pub.publish("local-only-while-down", n=1)  # queued, must not raise
        first_key = first.creds()[1]
        second = broker_factory(address, "--overwrite", name="restart")
        assert second.creds()[1] != first_key  # a new key, read again from the file
        n = [1]

        def resumed() -> bool:
            n[0] += 1
            pub.publish("t", n=n[0])
            sub.poll(0.05)
            return len(got) > 1

        wait_for(resumed, what="traffic to resume")
        assert sub.connected and pub.connected


def test_wait_forever_until_disconnect(connect: Callable[..., NetPubSub]) -> None:
    """wait_forever delivers until a subscriber disconnects, then returns."""
    pub, sub = connect(), connect()
    got: Received = []

    def until_stop(topic: Tuple[str, ...], **message: Any) -> None:
        got.append((topic, message))
        if topic == ("stop",):
            sub.disconnect()

    sub.add_subscriber(None, until_stop)
    assert sub.flush()
    pub.publish("data", n=1)
    pub.publish("stop")
    sub.wait_forever()
    assert got == [(("data",), {"n": 1}), (("stop",), {})]
    with pytest.raises(RuntimeError, match=r"^Not connected$"):
        sub.wait_forever()


def test_broadcast_goes_only_where_someone_listens(connect: Callable[..., NetPubSub]) -> None:
    """A broadcast reaches every pub-sub with a subscriber, and is not sent to one without."""
    pub, sub, idle = connect(), connect(), connect()
    got: Received = []
    fn = collect(got)
    sub.add_subscriber("anything", fn)
    assert sub.flush() and idle.flush()
    before = pub.broker_statistics()
    pub.publish(None, n=1)
    poll_until(sub, lambda: got)
    assert before is not None and got == [((), {"n": 1})]

    def deliveries() -> int:  # the broker refreshes its figures every 0.1 s
        after = pub.broker_statistics()
        assert after is not None
        return int(after["messages_out"] - before["messages_out"])

    wait_for(lambda: deliveries() == 1, what="one delivery counted: sub only, not idle")


def test_reconnect_survives_the_key_changing_under_it(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new broker listens before its credentials file says its key: clients retry, not raise."""
    address = str(tmp_path / "k.sock")
    first = broker_factory(address, name="keys")
    pub = NetPubSub.from_file(first.credentials)
    with pub:
        first.kill()
        pub.poll(0.1)  # notices the loss
        second = Broker(address, b"the new key")  # listening; the file still holds the old key
        thread = threading.Thread(target=second.start)
        thread.start()
        try:

            def refused() -> bool:
                pub.publish("t", n=0)  # may try to reconnect, with the old key: must not raise
                return "authentication failed" in caplog.text

            with caplog.at_level(logging.WARNING, logger="mpubsub.broker"):
                wait_for(refused, what="a reconnection with the old key")
            write_credentials(first.credentials, address, b"the new key", overwrite=True)
            sub = NetPubSub(address, b"the new key")
            got: Received = []
            sub.add_subscriber("t", collect(got), weak=False)
            with sub:
                assert sub.flush()

                def resumed() -> bool:
                    pub.publish("t", n=1)
                    sub.poll(0.05)
                    return bool(got)

                wait_for(resumed, what="the client to reconnect with the new key")
        finally:
            second.stop()
            thread.join(10)


def test_large_and_small_messages_keep_their_order(connect: Callable[..., NetPubSub]) -> None:
    """Large payloads go out on their own (gathered, not copied), after what was batched."""
    pub, sub = connect(), connect()
    got: Received = []
    sub.add_subscriber("mixed", collect(got), weak=False)
    assert sub.flush()
    count = 300
    for seq in range(count):  # a burst: small ones batch, every third is large
        pub.publish("mixed", seq=seq, blob=b"x" * (40_000 if seq % 3 == 0 else 100))
    poll_until(sub, lambda: len(got) == count)
    assert [m["seq"] for _, m in got] == list(range(count))
    assert all(len(m["blob"]) == (40_000 if m["seq"] % 3 == 0 else 100) for _, m in got)


def test_subscriptions_past_the_brokers_cap_raise(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """A subscription the broker would refuse raises ValueError; the connection stays up."""
    broker = broker_factory(str(tmp_path / "b.sock"), "--max-subscriptions", "5")
    with NetPubSub.from_file(broker.credentials) as pubsub:
        for n in range(5):
            pubsub.add_subscriber(("t", str(n)), print)
        pubsub.add_subscriber(("t", "0"), logging.info)  # a topic it has: no new subscription
        with pytest.raises(
            ValueError,
            match=r"^more than 5 topics subscribed to: the broker's limit \(max_subscriptions\)$",
        ):
            pubsub.add_subscriber(("t", "5"), print)
        pubsub.add_subscriber(("t", "5", "*local"), print)  # local: no limit
        pubsub.remove_subscriber(("t", "4"), print)
        pubsub.add_subscriber(("t", "6"), print)  # room again
        assert pubsub.flush()
        assert pubsub.connected
    assert "max_subscriptions" not in broker.output()


def test_topics_before_connecting_follow_the_brokers_limits(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Before it connects, a pub-sub does not know the limits: a broker may allow larger topics."""
    broker = broker_factory(str(tmp_path / "b.sock"), "--max-topic-size", "8192")
    long = ("q" * 5000,)
    got: Received = []
    sub = NetPubSub.from_file(broker.credentials)
    sub.add_subscriber(long, lambda topic, **m: got.append((topic, m)), weak=False)
    with sub, NetPubSub.from_file(broker.credentials) as pub:
        assert sub.flush()
        pub.publish(long, n=1)
        wait_for(lambda: sub.poll(0.05) or got, what="a message on a 5,000-byte topic")
    assert got == [(long, {"n": 1})]


def polled(pubsub: NetPubSub, condition: bool) -> bool:
    pubsub.poll(0.05)
    return condition


def test_a_broker_that_cuts_at_once_makes_no_reconnection_loop(tmp_path: Path) -> None:
    """Reconnections to a broker that cuts each connection at once back off as failures do."""
    broker = FakeBroker(str(tmp_path / "b.sock"), b"key", lambda sock: None)
    pubsub = NetPubSub(str(tmp_path / "b.sock"), b"key")
    try:
        pubsub.connect()
        wait_for(lambda: polled(pubsub, broker.accepted >= 3), what="three reconnections")
        first = broker.accepted
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # poll() notices each cut
            pubsub.poll(0.05)
        # 50 ms, 100 ms, 200 ms... between attempts: a handful in 2 s, not dozens.
        assert broker.accepted - first <= 6
    finally:
        pubsub.disconnect()
        broker.close()


def test_a_flush_to_a_broker_that_cuts_at_once_makes_no_reconnection_loop(
    tmp_path: Path,
) -> None:
    """A flush hurries one reconnection, not one per cut: it waits out the backoff after."""
    broker = FakeBroker(str(tmp_path / "b.sock"), b"key", lambda sock: sock.recv(64))
    pubsub = NetPubSub(str(tmp_path / "b.sock"), b"key", timeout=2)
    try:
        pubsub.connect()
        first = broker.accepted
        assert pubsub.flush() is False  # cut at its PING, each time
        # 50 ms, 100 ms, 200 ms... between attempts: a handful in 2 s, not hundreds.
        assert broker.accepted - first <= 8
    finally:
        pubsub.disconnect()
        broker.close()


def orphaned(broker_factory: Callable[..., BrokerProcess], address: str) -> NetPubSub:
    """A pub-sub whose broker was killed under it, and which noticed."""
    broker = broker_factory(address)
    pubsub = NetPubSub.from_file(broker.credentials)
    pubsub.connect()
    broker.kill()
    pubsub.publish("t", n=0)  # finds the broker gone
    wait_for(lambda: not pubsub.connected, what="the loss noticed")
    return pubsub


def test_flush_that_finds_the_broker_gone_waits_for_it_to_come_back(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """An idle pub-sub whose broker restarted finds out in flush() itself: flush() then
    reconnects within its timeout and answers True, not False at once."""
    address = str(tmp_path / "b.sock")
    first = broker_factory(address)
    pubsub = NetPubSub.from_file(first.credentials)
    pubsub.connect()
    try:
        first.kill()
        broker_factory(address, "--overwrite")  # the same credentials file, a new key
        assert pubsub.flush()
        assert pubsub.connected
    finally:
        pubsub.disconnect()


def test_flush_while_reconnecting_tries_at_once(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """flush() right after the broker comes back reconnects then, whatever the backoff says."""
    address = str(tmp_path / "b.sock")
    pubsub = orphaned(broker_factory, address)
    try:
        wait_for(
            lambda: pubsub._link.redial.backoff >= 1.0, what="the backoff to grow past a second"
        )
        broker_factory(address, "--overwrite")  # the same credentials file
        assert pubsub.flush()
        assert pubsub.connected
    finally:
        pubsub.disconnect()


def test_queued_messages_over_a_new_brokers_limits_are_dropped(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages queued while the broker was away that its successor refuses are dropped, alone."""
    address = str(tmp_path / "b.sock")
    pub = orphaned(broker_factory, address)
    try:
        pub.publish(("x" * 200,), n=1)
        pub.publish("t", n=2)
        # The successor is elsewhere until its subscriber is in place: then its
        # credentials replace the old ones, and pub finds it at its next attempt.
        restarted = broker_factory(str(tmp_path / "c.sock"), "--max-topic-size", "100", name="c")
        with NetPubSub.from_file(restarted.credentials) as sub:
            got = subscribed(sub, "t")
            shutil.copy(restarted.credentials, tmp_path / "moved.pckl")
            os.replace(tmp_path / "moved.pckl", tmp_path / "broker.pckl")
            assert pub.flush()
            wait_for(lambda: sub.poll(0.05) or got, what="the queued message that fits")
            assert pub.connected
        assert "dropped 1 queued messages over the new broker's limits" in caplog.text
    finally:
        pub.disconnect()


def test_a_burst_after_reconnecting_by_hand_is_sent(connect: Callable[..., NetPubSub]) -> None:
    """connect(), disconnect(), connect(): a burst of publishes still leaves without a flush."""
    subscriber = connect()
    got = subscribed(subscriber, ("burst",))
    publisher = connect()
    publisher.disconnect()
    publisher.connect()
    for n in range(5):  # closer together than the burst window: batched
        publisher.publish(("burst",), n=n)
    poll_until(subscriber, lambda: len(got) == 5, "the whole burst")
    assert got == [{"n": n} for n in range(5)]


def test_disconnect_from_another_thread_ends_wait_forever(
    connect: Callable[..., NetPubSub],
) -> None:
    """wait_forever() in one thread returns when another thread calls disconnect()."""
    pubsub = connect()
    subscribed(pubsub, ("never",))
    waiting = threading.Thread(target=pubsub.wait_forever, daemon=True)
    waiting.start()
    wait_for(lambda: blocked(waiting), what="wait_forever to block in select()")
    pubsub.disconnect()
    waiting.join(5)
    assert not waiting.is_alive()


def test_poll_from_a_second_thread_is_refused(connect: Callable[..., NetPubSub]) -> None:
    """While one thread delivers in wait_forever(), another's poll() raises a clear error,
    and the first delivers on, in order."""
    pubsub = connect()
    got = subscribed(pubsub, "t")
    waiting = threading.Thread(target=pubsub.wait_forever, daemon=True)
    waiting.start()

    def refused() -> bool:
        try:
            pubsub.poll(0)
        except RuntimeError as exc:
            assert str(exc) == (
                "poll() is already running in another thread: call poll() and "
                "wait_forever() from one thread at a time"
            )
            return True
        return False

    wait_for(refused, what="a second thread's poll() refused")
    publisher = connect()
    for n in range(100):
        publisher.publish("t", n=n)
    wait_for(lambda: len(got) == 100, what="the waiting thread to deliver")
    assert got == [{"n": n} for n in range(100)]
    pubsub.disconnect()
    waiting.join(5)
    assert not waiting.is_alive()
    with pytest.raises(RuntimeError, match=r"^Not connected$"):
        pubsub.poll(0)  # the claim is released: the usual error, not the conflict


def blocked(thread: threading.Thread) -> bool:
    """True while *thread* waits in select(), poll() or their p- variants (Linux, x86-64)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            number = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return number in {"7", "23", "270", "271"}


def test_local_only_subscribers_get_broadcasts(connect: Callable[..., NetPubSub]) -> None:
    """A pub-sub whose subscribers are all *local still gets broadcasts, and nothing else."""
    pub, sub = connect(), connect()
    got: Received = []
    local = collect(got)
    sub.add_subscriber(("x", "*local"), local)
    assert sub.flush()
    pub.publish(("y",), n=0)  # nobody here wants it
    pub.publish(("*local",), n=1)  # local to pub: never travels
    pub.publish(None, n=2)
    poll_until(sub, lambda: got)
    assert got == [((), {"n": 2})]
    remote: Received = []
    on_z = collect(remote)
    sub.add_subscriber(("z",), on_z)  # a real topic: broadcasts come through it
    assert sub.flush()
    pub.publish(None, n=3)
    poll_until(sub, lambda: len(got) == 2 and remote)
    assert got[1] == ((), {"n": 3}) and remote == [((), {"n": 3})]
    stats = pub.broker_statistics()
    assert stats is not None and stats["subscriptions"] == 1  # ('z',) only, now


def test_fileno_is_readable_for_messages_flush_read(connect: Callable[..., NetPubSub]) -> None:
    """Messages read by flush() (waiting for its PONG) still make fileno() readable."""
    alice, bob = connect(), connect()
    got: Received = []
    fn = collect(got)
    bob.add_subscriber("t", fn)
    assert bob.flush()
    for n in range(5):
        alice.publish("t", n=n)
    assert alice.flush()  # the broker has routed them to bob
    assert bob.flush()  # reads them, with its PONG
    with selectors.DefaultSelector() as sel:
        sel.register(bob.fileno(), selectors.EVENT_READ)
        assert sel.select(timeout=2), "poll() has work, fileno() says nothing"
        assert bob.poll(0) is True
        assert len(got) == 5
        assert not sel.select(timeout=0)  # delivered: nothing more to do


@pytest.mark.parametrize("ending", ["disconnect", "exit", "multiprocessing"])
def test_a_process_that_publishes_and_ends_loses_nothing(
    broker: BrokerProcess, connect: Callable[..., NetPubSub], ending: str
) -> None:
    """10,000 publishes (batched), then disconnect() or a plain exit: all 10,000 arrive.

    A multiprocessing child (forked) ends with os._exit(), past atexit.
    """
    sub = connect()
    got = subscribed(sub, ("end",))
    code = (
        "import sys, multiprocessing; from mpubsub import NetPubSub\n"
        "def main():\n"
        "    p = NetPubSub.from_file(sys.argv[1]); p.connect()\n"
        "    for n in range(10_000): p.publish(('end',), n=n)\n"
        + ("    p.disconnect()\n" if ending == "disconnect" else "")
        + (
            "child = multiprocessing.get_context('fork').Process(target=main)\n"
            "child.start(); child.join(); sys.exit(child.exitcode)\n"
            if ending == "multiprocessing"
            else "main()\n"
        )
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(broker.credentials)], capture_output=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    poll_until(sub, lambda: len(got) == 10_000, "every message")
    assert [m["n"] for m in got] == list(range(10_000))


def test_messages_queued_while_the_broker_is_away_arrive_newest_first_kept(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the broker is away, the newest max_queued messages wait; they arrive after it."""
    address = str(tmp_path / "q.sock")
    first = broker_factory(address, name="queue")
    own = tmp_path / "publisher.pckl"  # the publisher's copy: it follows once sub is back
    shutil.copy(first.credentials, own)
    own.chmod(0o600)
    sub = NetPubSub.from_file(first.credentials)
    pub = NetPubSub.from_file(own, max_queued=3)
    got: Received = []
    fn = collect(got)
    sub.add_subscriber("q", fn)
    with sub, pub:
        assert sub.flush()
        first.kill()
        poll_until(sub, lambda: not sub.connected, "the loss noticed")
        for n in range(5):
            pub.publish("q", n=n)  # queued: the two oldest are dropped
        second = broker_factory(address, "--overwrite", name="queue")
        wait_for(sub.flush, what="the subscriber back")
        shutil.copy(second.credentials, own)  # now the publisher reconnects
        wait_for(pub.flush, what="the publisher back")
        poll_until(sub, lambda: len(got) == 3, "the queued messages")
        assert got == [(("q",), {"n": n}) for n in (2, 3, 4)]
    assert sum("dropping the oldest" in r.getMessage() for r in caplog.records) == 1  # once


def test_waits_do_not_spin_on_a_descriptor_over_1023(
    broker: BrokerProcess, clients: List[NetPubSub]
) -> None:
    """select() cannot watch descriptor 1024 or above: poll() and flush() still sleep."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        pubsub = connected(broker, clients)
        assert pubsub._link.sock is not None and pubsub._link.sock.fileno() >= 1024
        got = subscribed(pubsub, "t")
        started = time.process_time()
        assert pubsub.poll(1.0) is False  # nothing comes: it sleeps, not spins
        assert time.process_time() - started < 0.5
        publisher = connected(broker, clients)
        publisher.publish("t", n=1)
        assert publisher.flush()
        assert pubsub.poll(5.0) and got == [{"n": 1}]
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_forked_child_leaves_its_parents_batch_alone(
    broker: BrokerProcess, connect: Callable[..., NetPubSub]
) -> None:
    """A child forked with publishes batched exits: the parent's messages arrive once each."""
    sub = connect()
    got = subscribed(sub, ("f",))
    code = (
        "import os, sys; from mpubsub import NetPubSub\n"
        "p = NetPubSub.from_file(sys.argv[1]); p.connect()\n"
        "with p._link.lock:  # the writer thread cannot send the batch before the fork\n"
        "    for n in range(1000): p.publish(('f',), n=n)\n"
        "    if os.fork() == 0:\n"
        "        sys.exit(0)  # its atexit runs, in a copy of the parent\n"
        "os.wait()\n"
        "p.publish(('f',), n=-1)\n"
        "p.disconnect()\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(broker.credentials)], capture_output=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    poll_until(sub, lambda: got and got[-1]["n"] == -1, "the last message")
    assert [m["n"] for m in got] == [*range(1000), -1]


def test_disconnect_leaves_nothing_for_the_next_connection(tmp_path: Path) -> None:
    """What is published while disconnect() sends is dropped, not kept for the next broker."""
    path, credentials = str(tmp_path / "stuck.sock"), tmp_path / "stuck.pckl"
    write_credentials(credentials, path, b"key", overwrite=True)
    done, stop = threading.Event(), threading.Event()
    fake = FakeBroker(path, b"key", lambda sock: done.wait(30))  # reads nothing
    pub = NetPubSub(path, b"key", timeout=2.5)  # not a multiple of the writer's 1 s rounds

    def trickle() -> None:  # batched behind what waits, never blocked: under 1 MiB waits
        while not stop.wait(0.001):
            pub.publish("t", n=1)

    thread = threading.Thread(target=trickle)
    try:
        pub.connect()
        for _ in range(600):
            pub.publish("t", pad=b"x" * 1000)  # the socket's buffer full, the rest waits
        thread.start()
        pub.disconnect()  # 2.5 s of sending nothing, publishes batched meanwhile
        stop.set()
        thread.join(10)
        wait_for(lambda: pub._link._writer is None, what="the writer thread to end")
        assert not pub._link.outbox.batched and not pub._link.outbox, "kept for the next one"
    finally:
        stop.set()
        done.set()
        fake.close()


def test_a_subscriber_may_poll_inside_a_delivery(connect: Callable[..., NetPubSub]) -> None:
    """poll() from a subscriber, in the thread that delivers, is not a second thread: it
    delivers what waits, and the outer delivery goes on."""
    pubsub, publisher = connect(), connect()
    got: List[int] = []
    refused: List[Exception] = []

    def nested(topic: Tuple[str, ...], n: int) -> None:
        got.append(n)
        if n == 0:
            try:
                pubsub.poll(0)
            except RuntimeError as exc:
                refused.append(exc)

    pubsub.add_subscriber("t", nested, weak=False)
    assert pubsub.flush()
    publisher.publish("t", n=0)
    publisher.publish("t", n=1)
    assert publisher.flush()
    poll_until(pubsub, lambda: len(got) == 2, "both messages")
    assert got == [0, 1]
    assert refused == []


def test_broker_clients_lists_some_topics_of_each(connect: Callable[..., NetPubSub]) -> None:
    """Each connection, its subscriptions counted, and at most 64 of its topics shown
    escaped, sorted, then how many more: a listing costs what the connections do."""
    many, few = connect(), connect()
    for n in range(100):
        many.add_subscriber(("t", f"{n:03}"), lambda topic, **message: None, weak=False)
    few.add_subscriber(("a\nb",), lambda topic, **message: None, weak=False)
    assert many.flush() and few.flush()
    listed = {c["id"]: c for c in few.broker_clients() or []}
    assert len(listed) == 2
    big, small = sorted(listed.values(), key=lambda c: -c["subscriptions"])
    assert big["subscriptions"] == 100 and len(big["topics"]) == 65
    assert big["topics"][-1] == "... 36 more"
    assert big["topics"][:-1] == sorted(big["topics"][:-1])
    assert all(t.startswith("t/") for t in big["topics"][:-1])
    assert small["topics"] == ["a\\x0ab"]


def test_a_nested_poll_names_the_senders_of_what_it_delivers(
    connect: Callable[..., NetPubSub],
) -> None:
    """A subscriber that polls inside a delivery gets the right sender for what it delivers,
    though the batch around it has not reached its own news of that sender yet."""
    sub, alice, bob = connect(), connect(), connect()
    senders: Dict[str, Any] = {}

    def on_message(topic: Tuple[str, ...], who: str) -> None:
        senders[who] = mpubsub.current_sender()
        if who == "alice":
            bob.publish("t", who="bob 2")
            assert bob.flush()
            wait_for(lambda: (sub.poll(0.05), "bob 2" in senders)[1], what="bob's second")

    sub.add_subscriber("t", on_message)
    assert sub.flush()
    alice.publish("t", who="alice")
    assert alice.flush()
    bob.publish("t", who="bob 1")
    assert bob.flush()
    wait_for(lambda: (sub.poll(0.05), len(senders) == 3)[1], what="the three messages")
    if senders["alice"].address is None:  # on the Unix socket, one process is one sender
        assert {s.pid for s in senders.values()} == {os.getpid()}
    else:  # on TCP, each connection is its own
        assert senders["bob 1"] == senders["bob 2"] != senders["alice"]


def test_a_broker_of_protocol_1_is_spoken_to_in_protocol_1(tmp_path: Path) -> None:
    """A broker that refuses HELLO 2 (mpubsubd before senders) is dialled again with
    HELLO 1: an upgraded application keeps working with the host's older broker."""
    old = old_broker(str(tmp_path / "old.sock"), b"key")
    pubsub = NetPubSub(str(tmp_path / "old.sock"), b"key", timeout=5)
    try:
        pubsub.connect()
        assert pubsub.flush()
        assert old.hellos == [2, 1]
    finally:
        pubsub.disconnect()
        old.close()
