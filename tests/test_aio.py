"""Tests for mpubsub.aio: the asyncio NetPubSub against real broker processes and mpubsubd.

Each test runs its coroutine on a fresh event loop: asyncio's, and uvloop's
where the test is parametrized with ``loop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Dict, Iterator, List, Optional, Tuple

import pytest
import uvloop

import mpubsub
import mpubsub.aio
from mpubsub import AuthenticationError, NetPubSub, current_sender
from mpubsub import _protocol as proto
from mpubsub.aio import NetPubSub as AioPubSub

from .conftest import BrokerProcess, FakeBroker, old_broker, wait_for
from .processes import free_port
from .test_daemon import Daemon

Received = List[Tuple[Tuple[str, ...], Dict[str, Any]]]
Factory = Callable[..., BrokerProcess]


def run(main: Coroutine[Any, Any, Any], loop: str = "asyncio") -> Any:
    """Run *main* on a new event loop of *loop*'s kind."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Let the loop run until *condition* holds; fail past *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def until_figure(ps: AioPubSub, name: str, expected: int) -> None:
    """Wait until the broker's figure *name* is *expected* (its figures are 0.1 s old)."""
    deadline = time.monotonic() + 10
    while True:
        figures = await ps.broker_statistics()
        if figures is not None and figures[name] == expected:
            return
        assert time.monotonic() < deadline, f"{name}: {figures}, not {expected}"
        await asyncio.sleep(0.05)


async def subscriptions(ps: AioPubSub, expected: int) -> None:
    await until_figure(ps, "subscriptions", expected)


@contextlib.asynccontextmanager
async def two(credentials: Path, **options: Any) -> AsyncIterator[Tuple[AioPubSub, AioPubSub]]:
    """Two asyncio pub-subs of the broker of *credentials*, connected: (sub, pub)."""
    async with (
        AioPubSub.from_file(credentials, **options) as sub,
        AioPubSub.from_file(credentials, **options) as pub,
    ):
        yield sub, pub


def collect(got: Received) -> Callable[..., None]:
    def fn(topic: Tuple[str, ...], **message: Any) -> None:
        got.append((topic, message))

    return fn


def numbers(got: Received) -> List[int]:
    return [message["n"] for _, message in got]


# --- what users do ----------------------------------------------------------------------------


def test_from_file_publish_flush_and_subscribers_plain_and_async(
    broker: BrokerProcess, loop: str
) -> None:
    """Two pub-subs through a real broker (Unix and TCP): plain and coroutine subscribers
    get every message, and flush() means the broker has them."""

    async def main() -> None:
        plain: Received = []
        awaited: Received = []

        async def slow(topic: Tuple[str, ...], **message: Any) -> None:
            await asyncio.sleep(0.001)
            awaited.append((topic, message))

        fn = collect(plain)
        async with two(broker.credentials) as (sub, pub):
            assert sub.connected and pub.connected
            sub.add_subscriber("sensor", fn)
            sub.add_subscriber("sensor", slow)
            assert await sub.flush() is True
            for n in range(50):
                pub.publish(("sensor", "t"), n=n)
            assert await pub.flush() is True
            await until(lambda: len(awaited) == 50, "the coroutine subscriber's 50")
        assert numbers(plain) == list(range(50)) and numbers(awaited) == list(range(50))
        assert plain[0][0] == ("sensor", "t")
        assert not sub.connected

    run(main(), loop)


def test_connect_and_disconnect_by_hand(broker_factory: Factory, tmp_path: Path) -> None:
    """NetPubSub(address, authkey), connect(), disconnect(): errors as the threaded client."""
    b = broker_factory(str(tmp_path / "b.sock"))
    address, key = b.creds()

    async def main() -> None:
        ps = AioPubSub(address, key)
        assert not ps.connected
        with pytest.raises(RuntimeError, match="Not connected"):
            await ps.disconnect()
        await ps.connect()
        with pytest.raises(RuntimeError, match="Already connected"):
            await ps.connect()
        assert ps.address == address
        with pytest.raises(RuntimeError, match="connected pub-sub"):
            ps.set_broker(address, key)
        await ps.disconnect()
        assert not ps.connected
        await ps.connect()  # again, after a disconnect
        await ps.disconnect()
        with pytest.raises(AuthenticationError):
            await AioPubSub(address, b"not the key").connect()
        with pytest.raises(FileNotFoundError):
            await AioPubSub(str(tmp_path / "nothing.sock"), key).connect()

    run(main())


def test_coroutine_subscribers_are_awaited_in_order(broker: BrokerProcess, loop: str) -> None:
    """Each message's subscribers run in subscription order, a coroutine one awaited
    before the next subscriber and the next message: a publisher's order holds."""

    async def main() -> None:
        calls: List[Tuple[str, int]] = []

        async def first(topic: Tuple[str, ...], n: int) -> None:
            calls.append(("first", n))
            await asyncio.sleep(0.002 if n % 3 == 0 else 0)
            calls.append(("first done", n))

        def second(topic: Tuple[str, ...], n: int) -> None:
            calls.append(("second", n))

        async def third(topic: Tuple[str, ...], n: int) -> None:
            calls.append(("third", n))

        async with two(broker.credentials) as (sub, pub):
            for fn in (first, second, third):
                sub.add_subscriber("t", fn)
            await sub.flush()
            for n in range(30):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: ("third", 29) in calls, "the last message")
            expected = []
            for n in range(30):
                expected += [("first", n), ("first done", n), ("second", n), ("third", n)]
            assert calls == expected
            # A local publish goes after what waits for a coroutine, in order too.
            calls.clear()
            for n in range(3):
                sub.publish("t", n=n)
            await until(lambda: len(calls) == 12, "the local messages")
            assert [n for _, n in calls] == [0] * 4 + [1] * 4 + [2] * 4

    run(main(), loop)


def test_a_coroutine_subscriber_that_raises_is_logged_and_others_go_on(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a coroutine subscriber goes to on_error (logged), and the
    subscribers after it and the messages after it are delivered."""

    async def main() -> None:
        got: Received = []

        async def broken(topic: Tuple[str, ...], n: int) -> None:
            await asyncio.sleep(0)
            if n == 1:
                raise ValueError("subscriber broke on 1")

        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", broken)
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            for n in range(3):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: len(got) == 3, "three messages")
        assert numbers(got) == [0, 1, 2]

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "raised on topic ('t',)" in errors[0].getMessage()
    assert errors[0].exc_info is not None and "subscriber broke on 1" in str(errors[0].exc_info[1])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11's")
def test_a_coroutine_subscriber_cancelled_from_elsewhere_stops_nothing(
    broker: BrokerProcess, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A coroutine subscriber that ends in CancelledError not meant for the pub-sub
    (it awaited a future another task cancelled) is reported like one that raised:
    the subscribers after it and the messages behind it are delivered, in order."""

    async def main() -> None:
        got: Received = []
        shared = asyncio.get_running_loop().create_future()

        async def waits(topic: Tuple[str, ...], n: int) -> None:
            if n == 0:
                await asyncio.sleep(0.2)  # the others wait behind it
                shared.cancel()
                await shared

        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", waits)
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            for n in range(5):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: len(got) == 5, "the five messages")
        assert numbers(got) == [0, 1, 2, 3, 4]

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        run(main(), loop)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "raised on topic ('t',)" in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1].__cause__, asyncio.CancelledError)  # type: ignore[index,union-attr]


def test_the_backlog_counts_what_small_messages_cost(broker: BrokerProcess) -> None:
    """Messages behind a coroutine subscriber are held decoded, each much larger than
    its frame: reading pauses by what they cost, not by their frames' bytes alone."""

    async def main() -> None:
        held = asyncio.Event()

        async def waits(topic: Tuple[str, ...]) -> None:
            await held.wait()

        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", waits)
            await sub.flush()
            for n in range(600_000):  # 16-byte frames: 9.6 MB of them
                pub.publish("t")
                if n % 10_000 == 0:
                    await asyncio.sleep(0)
            await until(lambda: sub._link._paused, "reading to pause")
            assert len(sub._backlog) < 400_000  # about 160 MB of dicts and tuples
            held.set()

    run(main())


def test_an_error_handler_that_raises_stops_nothing(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """on_error raising for a message from the broker is logged; the others arrive."""

    def strict(topic: Tuple[str, ...], subscriber: Any, exc: Exception) -> None:
        raise exc

    async def main() -> None:
        got: Received = []

        def picky(topic: Tuple[str, ...], n: int) -> None:
            if n == 0:
                raise KeyError("no zero")
            got.append((topic, {"n": n}))

        async with (
            AioPubSub.from_file(broker.credentials, on_error=strict) as sub,
            AioPubSub.from_file(broker.credentials) as pub,
        ):
            sub.add_subscriber("t", picky)
            await sub.flush()
            for n in range(3):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: len(got) == 2, "the two good messages")
            with pytest.raises(KeyError):  # a local publish raises, as PubSub's does
                sub.publish("t", n=0)

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        run(main())
    assert any("error handler raised" in r.getMessage() for r in caplog.records)


def test_order_per_publisher_across_sync_and_async_clients(broker: BrokerProcess) -> None:
    """A threaded publisher's messages reach an asyncio subscriber in order, and the
    other way round, both at once, each delivery with the publisher's pid."""
    script = (
        "import sys, time\n"
        "from mpubsub import NetPubSub, current_sender\n"
        "got = []\n"
        "with NetPubSub.from_file(sys.argv[1]) as ps:\n"
        "    ps.add_subscriber('to-sync', lambda t, n: got.append((n, current_sender())),"
        " weak=False)\n"
        "    assert ps.flush()\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    for n in range(2000):\n"
        "        ps.publish('to-async', n=n)\n"
        "    assert ps.flush()\n"
        "    deadline = time.monotonic() + 30\n"
        "    while len(got) < 2000 and time.monotonic() < deadline:\n"
        "        ps.poll(0.1)\n"
        "    senders = {s for _, s in got}\n"
        "    pids = {s.pid for s in senders if s is not None and s.pid is not None}\n"
        "    print([n for n, _ in got] == list(range(2000)), len(senders), pids, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(broker.credentials)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"

        async def main() -> List[Tuple[int, Optional[mpubsub.Sender]]]:
            got: List[Tuple[int, Optional[mpubsub.Sender]]] = []

            async def fn(topic: Tuple[str, ...], n: int) -> None:
                got.append((n, current_sender()))

            async with AioPubSub.from_file(broker.credentials) as ps:
                ps.add_subscriber("to-async", fn)
                await ps.flush()
                proc.stdin.write("go\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                for n in range(2000):
                    ps.publish("to-sync", n=n)
                    if n % 100 == 0:
                        await asyncio.sleep(0)
                await ps.flush()
                await until(lambda: len(got) == 2000, "2000 messages from the sync client", 30)
            return got

        got = run(main())
        assert [n for n, _ in got] == list(range(2000))
        (sender,) = {sender for _, sender in got}  # the one publisher: on TCP, its address
        assert sender is not None
        unix = broker.creds()[0].__class__ is str
        assert sender.pid == (proc.pid if unix else None)
        said = proc.stdout.readline()
        assert said == (f"True 1 {{{os.getpid()}}}\n" if unix else "True 1 set()\n"), said
    finally:
        proc.kill()
        proc.communicate()


def test_current_sender_in_plain_and_coroutine_subscribers(broker: BrokerProcess) -> None:
    """current_sender() names the broker's publisher, in a coroutine subscriber across
    its awaits too; None for a local publish, and outside deliveries."""

    async def main() -> None:
        seen: List[Tuple[str, Any]] = []

        def plain(topic: Tuple[str, ...], n: int) -> None:
            seen.append(("plain", current_sender()))

        async def awaited(topic: Tuple[str, ...], n: int) -> None:
            await asyncio.sleep(0.001)
            seen.append(("awaited", current_sender()))

        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", plain)
            sub.add_subscriber("t", awaited)
            await sub.flush()
            pub.publish("t", n=1)
            await until(lambda: len(seen) == 2, "a delivery from the broker")
            assert current_sender() is None
            sub.publish("t", n=2)  # local: no sender
            await until(lambda: len(seen) == 4, "a local delivery")
        senders = [sender for _, sender in seen]
        assert senders[0] == senders[1] and senders[0] is not None
        if broker.creds()[0].__class__ is str:  # on TCP, the sender is its address
            assert senders[0].pid == os.getpid() and senders[0].uid == os.getuid()
        else:
            assert senders[0].address is not None and senders[0].pid is None
        assert senders[2:] == [None, None]

    run(main())


def test_local_topics_and_broadcasts(broker: BrokerProcess) -> None:
    """A '*local' topic stays in its pub-sub; a broadcast reaches every subscriber."""

    async def main() -> None:
        here: Received = []
        there: Received = []
        async with (
            AioPubSub.from_file(broker.credentials) as a,
            AioPubSub.from_file(broker.credentials) as b,
        ):
            a.add_subscriber(("x", mpubsub.aio.LOCAL_SUFFIX), collect(here), weak=False)
            b.add_subscriber(None, collect(there), weak=False)  # catch-all
            await a.flush()
            await b.flush()
            a.publish(("x", "*local"), n=1)
            a.publish(None, n=2)  # broadcast
            await a.flush()
            await until(lambda: len(there) == 1 and len(here) == 2, "the broadcast")
        assert numbers(here) == [1, 2] and numbers(there) == [2]
        assert there[0][0] == ()

    run(main())


# --- messages() ---------------------------------------------------------------------------


def test_messages_iterates_and_ends_cleanly_by_break(broker: BrokerProcess, loop: str) -> None:
    """async for over messages(): what is published on its topics, in order; break
    unsubscribes it at the broker."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):
            stream = sub.messages("sensor", "alarm")
            await subscriptions(sub, 2)
            pub.publish(("sensor", "a"), n=0)
            pub.publish("other", n=99)
            pub.publish("alarm", n=1)
            pub.publish("sensor", n=2)
            got = []
            async for topic, message in stream:
                got.append((topic, message["n"], stream.sender))
                if len(got) == 3:
                    break
            assert [(t, n) for t, n, _ in got] == [
                (("sensor", "a"), 0),
                (("alarm",), 1),
                (("sensor",), 2),
            ]
            assert got[0][2] is not None and got[0][2] == got[1][2]
            del stream
            await subscriptions(sub, 0)

    run(main(), loop)


def test_messages_drops_the_oldest_for_a_slow_consumer(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Past maxsize the oldest messages go, counted, with one WARNING."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):
            async with sub.messages("t", maxsize=10) as stream:
                await sub.flush()
                for n in range(100):
                    pub.publish("t", n=n)
                await pub.flush()
                await sub.flush()  # its PONG comes after the 100 messages
                assert stream.dropped == 90
                got = []
                async for _, message in stream:
                    got.append(message["n"])
                    if len(got) == 10:
                        break
                assert got == list(range(90, 100))
            # Left: the iteration ends, and nothing more is kept.
            assert [m async for m in stream] == []

    with caplog.at_level(logging.WARNING, logger="mpubsub"):
        run(main())
    warnings = [r for r in caplog.records if "behind" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    with pytest.raises(ValueError, match="maxsize"):
        AioPubSub("/nowhere", b"k").messages("t", maxsize=0)


def test_cancelling_messages_leaves_the_pub_sub_usable(broker: BrokerProcess, loop: str) -> None:
    """A task waiting in messages() is cancelled: its subscription goes, and the
    pub-sub goes on delivering to a new one."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):

            async def consume(into: List[int]) -> None:
                async for _, message in sub.messages("t"):
                    into.append(message["n"])

            first: List[int] = []
            task = asyncio.ensure_future(consume(first))
            await asyncio.sleep(0.01)  # waiting in __anext__
            await sub.flush()
            pub.publish("t", n=1)
            await until(lambda: first == [1], "the first consumer's message")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await sub.flush()
            st = await sub.broker_statistics()
            print("ST", st)
            assert (st or {})["subscriptions"] == 0
            second: List[int] = []
            task = asyncio.ensure_future(consume(second))
            await asyncio.sleep(0.01)
            await sub.flush()
            pub.publish("t", n=2)
            await until(lambda: second == [2], "the second consumer's message")
            task.cancel()
            assert first == [1]

    run(main(), loop)


# --- flush, failures, reconnection ------------------------------------------------------


def test_cancelling_flush_leaves_the_pub_sub_usable(
    broker_factory: Factory, tmp_path: Path
) -> None:
    """A flush() cancelled while the broker does not answer (stopped): the next one
    works once it answers again, and nothing published is lost."""
    b = broker_factory(str(tmp_path / "b.sock"))

    async def main() -> None:
        got: Received = []
        async with two(b.credentials) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            os.kill(b.pid, signal.SIGSTOP)
            try:
                pub.publish("t", n=1)
                flushing = asyncio.ensure_future(pub.flush())
                await asyncio.sleep(0.2)
                assert not flushing.done()
                flushing.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await flushing
            finally:
                os.kill(b.pid, signal.SIGCONT)
            pub.publish("t", n=2)
            assert await pub.flush() is True
            await until(lambda: len(got) == 2, "both messages")
        assert numbers(got) == [1, 2]

    run(main())


def test_reconnects_after_the_broker_is_killed(
    broker_factory: Factory, tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed and restarted with a new key, the broker gets its asyncio clients back:
    credentials read again, subscriptions made again, what was published meanwhile sent."""
    address = str(tmp_path / "r.sock")
    first = broker_factory(address, name="restart")

    async def main() -> None:
        got: Received = []
        async with two(first.credentials, timeout=1.0) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            pub.publish("t", n=0)
            await until(lambda: got, "the first message")
            first_key = first.creds()[1]
            first.kill()
            await until(lambda: not sub.connected and not pub.connected, "the loss noticed")
            pub.publish("t", n=1)  # queued, never waits
            assert await pub.flush() is False  # out of reach
            second = broker_factory(address, "--overwrite", name="restart")
            assert second.creds()[1] != first_key  # a new key, read again from the file
            await until(lambda: sub.connected and pub.connected, "both reconnected")
            assert await sub.flush() and await pub.flush()
            # The queued message went to the new broker (before sub's subscription,
            # maybe: which of them came back first is the backoff's jitter).
            await until_figure(pub, "messages_in", 1)
            pub.publish("t", n=2)
            await until(lambda: got[-1][1]["n"] == 2, "the new message")
        assert numbers(got) in ([0, 1, 2], [0, 2])

    with caplog.at_level(logging.WARNING, logger="mpubsub"):
        run(main(), loop)
    assert any("reconnected to the broker" in r.getMessage() for r in caplog.records)


def test_bad_input_as_the_threaded_client(broker: BrokerProcess) -> None:
    """The same errors as mpubsub.NetPubSub, each before anyone gets the message."""

    async def main() -> None:
        got: Received = []
        async with AioPubSub.from_file(broker.credentials) as ps:
            ps.add_subscriber("t", collect(got), weak=False)
            with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
                ps.publish("t", fn=lambda: None)
            limit = ps._link.limits.max_message
            with pytest.raises(ValueError, match="exceeds the broker's limit"):
                ps.publish("t", blob=b"x" * limit)
            with pytest.raises(TypeError):
                ps.publish(("t", 3), n=1)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                ps.add_subscriber(("t", 3), collect(got))  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="limit"):
                ps.add_subscriber("x" * 5000, collect(got))
            assert got == []
            ps.publish("t", n=1)
            assert await ps.flush() and numbers(got) == [1]

    run(main())


def test_flush_raises_what_the_policy_refused(mpubsubd_access: Daemon) -> None:
    """Through a real mpubsubd with a policy: a refused publish makes flush() raise
    PermissionError naming the topic; the others carry on."""

    async def main() -> None:
        async with AioPubSub.from_file(mpubsubd_access.credentials) as ps:
            ps.publish(("secret", "plans"), n=1)
            with pytest.raises(PermissionError, match="publish on secret/plans"):
                await ps.flush()
            ps.publish("open", n=2)
            assert await ps.flush() is True
            with pytest.raises(PermissionError):
                await ps.broker_clients()

    run(main())


@pytest.fixture
def mpubsubd_access() -> Iterator[Daemon]:
    """mpubsubd, run as a daemon on TCP (where even root is its address, bound by the
    policy), with a policy that refuses 'secret' and the admin right to TCP peers."""
    base = Path(tempfile.mkdtemp(prefix="mpubsubd-aio-"))
    daemon = Daemon(base)
    daemon.configure(address=f"127.0.0.1:{free_port()}")
    text = daemon.config.read_text()
    daemon.config.write_text(
        text + "\n[access]\ndefault = allow\ntcp publish = !secret\ntcp admin = !/\n"
    )
    try:
        daemon.started()
        yield daemon
    finally:
        daemon.stop_all()
        with contextlib.suppress(OSError):
            for path in sorted(base.rglob("*"), reverse=True):
                path.unlink() if not path.is_dir() else path.rmdir()
            base.rmdir()


def test_through_mpubsubd_with_the_threaded_client(mpubsubd_access: Daemon, loop: str) -> None:
    """An asyncio client and a threaded one pass messages through a real mpubsubd."""

    async def main() -> None:
        got: Received = []
        sync = NetPubSub.from_file(mpubsubd_access.credentials)
        with sync:
            sync_got: Received = []
            sync.add_subscriber("to-sync", collect(sync_got), weak=False)
            assert sync.flush()
            async with AioPubSub.from_file(mpubsubd_access.credentials) as ps:
                ps.add_subscriber("to-async", collect(got), weak=False)
                await ps.flush()
                sync.publish("to-async", n=1)
                assert sync.flush()
                await until(lambda: got, "the threaded client's message")
                ps.publish("to-sync", n=2)
                await ps.flush()
                wait_for(lambda: sync.poll(0.05) or sync_got, what="the asyncio client's message")
        assert numbers(got) == [1] and numbers(sync_got) == [2]

    run(main(), loop)


def test_comes_back_when_mpubsubd_is_killed_and_started_again(mpubsubd_access: Daemon) -> None:
    """mpubsubd killed (SIGKILL) and started again, with a new key in its credentials
    file: the asyncio clients come back by themselves and subscribe again."""

    async def main() -> None:
        got: Received = []
        credentials = mpubsubd_access.credentials
        async with two(credentials, timeout=1.0) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            key = credentials.read_bytes()
            os.kill(mpubsubd_access.pid(), signal.SIGKILL)
            await until(lambda: not sub.connected and not pub.connected, "the loss noticed")
            mpubsubd_access.started()
            assert credentials.read_bytes() != key
            await until(lambda: sub.connected and pub.connected, "both reconnected")
            assert await sub.flush()
            pub.publish("t", n=1)
            await until(lambda: got, "a message through the new mpubsubd")
        assert numbers(got) == [1]

    run(main())


def test_a_pub_sub_dropped_while_connected_closes_its_connection(broker: BrokerProcess) -> None:
    """Collected without disconnect(), an asyncio pub-sub leaves no socket open and
    no task reconnecting: the broker sees the client go."""

    async def main() -> None:
        async with AioPubSub.from_file(broker.credentials) as watcher:
            dropped = AioPubSub.from_file(broker.credentials)
            await dropped.connect()
            await until_figure(watcher, "clients", 2)
            del dropped
            gc.collect()
            await until_figure(watcher, "clients", 1)
            assert [t for t in asyncio.all_tasks() if "_reconnect" in repr(t)] == []

    run(main())


def test_flush_and_figures_when_not_connected_as_the_threaded_client(
    broker: BrokerProcess,
) -> None:
    """Before connect() and after disconnect(), flush() is False and the figures None,
    as mpubsub.NetPubSub's (the broker is out of reach), not RuntimeError."""
    address, key = broker.creds()
    threaded = NetPubSub(address, key)
    assert threaded.flush() is False and threaded.broker_statistics() is None

    async def main() -> None:
        ps = AioPubSub(address, key)
        assert await ps.flush() is False
        assert await ps.broker_statistics() is None
        assert await ps.broker_clients() is None
        await ps.connect()
        assert await ps.flush() is True
        await ps.disconnect()
        assert await ps.flush() is False
        assert await ps.broker_statistics() is None

    run(main())


def test_messages_holds_no_more_than_max_bytes(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow consumer holds no more than max_bytes of large messages (their frames),
    the oldest dropped, counted, with one WARNING."""

    async def main() -> None:
        async with (
            two(broker.credentials) as (sub, pub),
            sub.messages("big", max_bytes=MiB) as big,
        ):
            await sub.flush()
            for n in range(20):
                pub.publish("big", n=n, blob=b"x" * (256 * 1024))
            await pub.flush()
            await sub.flush()  # its PONG comes after the messages
            assert big.dropped == 17  # a fourth 256 KiB message overflows 1 MiB
            left = [message["n"] async for _, message in _first(big, 3)]
            assert left == [17, 18, 19]

    with caplog.at_level(logging.WARNING, logger="mpubsub"):
        run(main())
    behind = [r.getMessage() for r in caplog.records if "fell behind" in r.getMessage()]
    assert len(behind) == 1 and behind[0].startswith(
        "a messages() consumer fell behind (3 messages, "
    ), behind


MiB = 1024 * 1024


async def _first(stream: mpubsub.aio.Messages, count: int) -> AsyncIterator[Any]:
    """The first *count* items of *stream*."""
    async for item in stream:
        yield item
        count -= 1
        if not count:
            return


def test_the_loop_reads_in_a_context_of_its_own(broker: BrokerProcess, tmp_path: Path) -> None:
    """A pub-sub connected from inside a coroutine subscriber (whose context names the
    broker's sender) does not deliver its own messages with that sender: a message no
    SENDER frame names (an older broker's) has none."""
    frame = proto.pub_frame(proto.encode_topic(("old",)), pickle.dumps({"n": 1}))

    def behave(sock: socket.socket) -> None:
        sock.sendall(frame)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass

    old = FakeBroker(str(tmp_path / "old.sock"), b"old key", behave)

    async def main() -> List[Optional[mpubsub.Sender]]:
        seen: List[Optional[mpubsub.Sender]] = []
        held: List[AioPubSub] = []

        def on_old(topic: Tuple[str, ...], n: int) -> None:
            seen.append(current_sender())

        async def connect_there(topic: Tuple[str, ...], n: int) -> None:
            there = AioPubSub(str(tmp_path / "old.sock"), b"old key")
            there.add_subscriber("old", on_old)
            await there.connect()  # inside a delivery: its context names the sender
            held.append(there)

        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("go", connect_there)
            await sub.flush()
            pub.publish("go", n=0)
            await until(lambda: seen, "the old broker's message")
            await held[0].disconnect()
        return seen

    try:
        assert run(main()) == [None]
    finally:
        old.close()


def test_a_pub_sub_connected_in_another_loop_says_so(broker: BrokerProcess) -> None:
    """Left connected when its loop ended, a pub-sub used from a new loop raises a
    RuntimeError that says why, instead of a future's or a closed loop's."""
    ps = AioPubSub.from_file(broker.credentials)
    run(ps.connect())
    message = "^this pub-sub is connected in another event loop: disconnect"
    with pytest.raises(RuntimeError, match=message):
        run(ps.flush())
    with pytest.raises(RuntimeError, match=message):
        run(ps.disconnect())


# --- what the mutation audit found untested ---------------------------------------------------


async def subscribed_at_broker(ps: AioPubSub) -> List[int]:
    """Each connection's subscriptions, as the broker counts them now (a live listing)."""
    listed = await ps.broker_clients()
    assert listed is not None
    return sorted(client["subscriptions"] for client in listed)


def test_broker_clients_and_statistics_answer(broker: BrokerProcess) -> None:
    """broker_clients() lists each connection (a local client has the admin right), and
    broker_statistics() gives the broker's figures."""

    async def main() -> None:
        async with (
            AioPubSub.from_file(broker.credentials) as a,
            AioPubSub.from_file(broker.credentials) as b,
        ):
            a.add_subscriber("t", collect([]), weak=False)
            a.add_subscriber("u", collect([]), weak=False)
            await a.flush()
            assert await subscribed_at_broker(b) == [0, 2]
            await until_figure(b, "subscriptions", 2)

    run(main())


def test_messages_without_topics_is_the_catch_all(broker: BrokerProcess) -> None:
    """messages() with no topic gets every message, of any topic."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):
            async with sub.messages() as stream:
                await sub.flush()
                pub.publish("x", n=1)
                pub.publish(("y", "z"), n=2)
                got = [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(2)]
            assert [(topic, message["n"]) for topic, message in got] == [
                (("x",), 1),
                (("y", "z"), 2),
            ]

    run(main())


def test_aclose_tells_the_broker_and_ends_a_waiting_consumer(broker: BrokerProcess) -> None:
    """aclose() from another task: the consumer waiting in ``async for`` ends, what the
    iterator held is dropped, and the broker learns of it with no flush() by its pub-sub."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):
            waiting = sub.messages("t")
            holding = sub.messages("u")
            await sub.flush()
            got: List[int] = []

            async def consume() -> None:
                async for _, message in waiting:
                    got.append(message["n"])

            task = asyncio.ensure_future(consume())
            pub.publish("t", n=1)
            pub.publish("u", n=2)
            await until(lambda: got == [1], "the consumer's message")  # and it waits again
            await sub.flush()  # holding holds n=2
            await waiting.aclose()
            await asyncio.wait_for(task, 10)
            await holding.aclose()
            assert [m async for m in holding] == []
            # Only pub asks: sub's UNSUBs went at aclose(), not at its next request.
            await until_figure(pub, "subscriptions", 0)

    run(main())


def test_a_messages_that_cannot_subscribe_leaves_no_subscription(broker: BrokerProcess) -> None:
    """messages() raising for a bad topic unsubscribes the good ones it had subscribed."""

    async def main() -> None:
        async with AioPubSub.from_file(broker.credentials) as sub:
            with pytest.raises(TypeError):
                sub.messages("good", ("bad", 3))  # type: ignore[arg-type]
            assert await subscribed_at_broker(sub) == [0]

    run(main())


def test_messages_arriving_together_wake_the_consumer_without_errors(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Many messages read at once while a consumer waits: all given, no error logged."""

    async def main() -> List[int]:
        async with two(broker.credentials) as (sub, pub):
            got: List[int] = []

            async def consume() -> None:
                async for _, message in sub.messages("t"):
                    got.append(message["n"])

            task = asyncio.ensure_future(consume())
            await subscriptions(sub, 1)
            for n in range(200):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: len(got) == 200, "the 200 messages")
            task.cancel()
            return got

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        assert run(main()) == list(range(200))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_consumer_that_falls_behind_again_is_warned_again(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING each time a consumer falls behind, once it has caught up in between."""

    async def main() -> None:
        async with two(broker.credentials) as (sub, pub):
            stream = sub.messages("t", maxsize=2)
            await sub.flush()
            for burst in range(2):
                for n in range(5):
                    pub.publish("t", n=n)
                await pub.flush()
                await sub.flush()  # its PONG comes after the messages
                assert stream.dropped == 3 * (burst + 1)
                got = [(await stream.__anext__())[1]["n"] for _ in range(2)]
                assert got == [3, 4]

    with caplog.at_level(logging.WARNING, logger="mpubsub"):
        run(main())
    assert len([r for r in caplog.records if "behind" in r.getMessage()]) == 2


def test_an_error_handler_that_raises_for_a_coroutine_subscriber_stops_nothing(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """on_error raising for an awaited subscriber's exception is logged; the subscribers
    after it, and the messages after it, are delivered."""

    def strict(topic: Tuple[str, ...], subscriber: Any, exc: Exception) -> None:
        raise exc

    async def main() -> None:
        got: Received = []

        async def broken(topic: Tuple[str, ...], n: int) -> None:
            await asyncio.sleep(0)
            if n == 1:
                raise ValueError("subscriber broke on 1")

        async with (
            AioPubSub.from_file(broker.credentials, on_error=strict) as sub,
            AioPubSub.from_file(broker.credentials) as pub,
        ):
            sub.add_subscriber("t", broken)
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            for n in range(3):
                pub.publish("t", n=n)
            await pub.flush()
            await until(lambda: len(got) == 3, "three messages")
        assert numbers(got) == [0, 1, 2]

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        run(main())
    handled = [r for r in caplog.records if "error handler raised" in r.getMessage()]
    assert len(handled) == 1 and "subscriber broke on 1" in str(handled[0].exc_info)


def test_a_subscriber_collected_while_an_earlier_one_is_awaited(broker: BrokerProcess) -> None:
    """A weak subscriber collected while a coroutine before it is awaited is skipped:
    the subscribers after it still get the message."""

    class Holder:
        def on(self, topic: Tuple[str, ...], n: int) -> None:
            raise AssertionError("called after it was collected")

    async def main() -> None:
        got: Received = []
        started = asyncio.Event()
        release = asyncio.Event()

        async def first(topic: Tuple[str, ...], n: int) -> None:
            started.set()
            await release.wait()

        holder = Holder()
        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", first)
            sub.add_subscriber("t", holder.on)
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            pub.publish("t", n=1)
            await asyncio.wait_for(started.wait(), 10)
            del holder
            gc.collect()
            release.set()
            await until(lambda: got, "the message past the collected subscriber")
        assert numbers(got) == [1]

    run(main())


def test_a_plain_subscriber_may_return_a_value(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """What a plain subscriber returns, if not awaitable, is ignored (not awaited)."""

    def answers(topic: Tuple[str, ...], n: int) -> Any:
        return f"done {n}"

    async def main() -> None:
        got: Received = []
        async with AioPubSub.from_file(broker.credentials) as ps:
            ps.add_subscriber("t", answers)
            ps.add_subscriber("t", collect(got), weak=False)
            ps.publish("t", n=1)
            await until(lambda: got, "the message")

    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_local_publish_made_while_delivering_the_brokers_has_no_sender(
    broker: BrokerProcess,
) -> None:
    """Published here from a plain subscriber of a broker's message, or from a task a
    coroutine subscriber started (its context), a message has no sender."""

    async def main() -> None:
        seen: List[Tuple[int, Optional[mpubsub.Sender]]] = []
        tasks = []

        def record(topic: Tuple[str, ...], n: int) -> None:
            seen.append((n, current_sender()))

        async with two(broker.credentials) as (sub, pub):

            def plain(topic: Tuple[str, ...], n: int) -> None:
                sub.publish("echo", n=n)

            async def spawner(topic: Tuple[str, ...], n: int) -> None:
                async def later() -> None:  # runs once the delivery is over
                    sub.publish("echo", n=n + 1)

                tasks.append(asyncio.ensure_future(later()))

            sub.add_subscriber("echo", record)
            sub.add_subscriber("t", plain)
            sub.add_subscriber("t", spawner)
            await sub.flush()
            pub.publish("t", n=1)
            await until(lambda: len(seen) == 2, "both local publishes")
        assert seen == [(1, None), (2, None)]

    run(main())


def test_a_flush_under_way_when_the_broker_dies_is_answered_by_the_next(
    broker_factory: Factory, tmp_path: Path
) -> None:
    """flush() waiting on a broker that is killed: it reconnects to the restarted one and
    asks it again (True), rather than time out or answer False."""
    address = str(tmp_path / "r.sock")
    first = broker_factory(address, name="restart")

    async def main() -> None:
        async with AioPubSub.from_file(first.credentials, timeout=15.0) as pub:
            os.kill(first.pid, signal.SIGSTOP)
            flushing = asyncio.ensure_future(pub.flush())
            await asyncio.sleep(0.1)
            assert not flushing.done()
            first.kill()
            await until(lambda: not pub.connected, "the loss noticed")
            assert not flushing.done()
            broker_factory(address, "--overwrite", name="restart")
            assert await flushing is True

    run(main())


def test_a_lone_publish_after_a_burst_goes_after_it(broker: BrokerProcess) -> None:
    """A publish after a pause, in the turn of the loop where a burst is batched, goes
    out after the burst: the publisher's order holds."""

    async def main() -> None:
        got: Received = []
        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            for n in range(200):
                pub.publish("t", n=n)
            time.sleep(0.005)  # the loop blocked: no turn between the burst and the next
            pub.publish("t", n=200)
            assert await pub.flush()
            await until(lambda: len(got) == 201, "the 201 messages")
        assert numbers(got) == list(range(201))

    run(main())


def test_publish_raises_buffererror_for_a_broker_that_does_not_read(
    broker_factory: Factory, tmp_path: Path
) -> None:
    """64 MiB waiting for a stopped broker: publish raises BufferError; once the broker
    reads again, everything published before it arrives, in order."""
    b = broker_factory(str(tmp_path / "b.sock"))

    async def main() -> None:
        got: List[int] = []
        blob = b"x" * (1024 * 1024)
        async with two(b.credentials, timeout=30.0) as (sub, pub):
            sub.add_subscriber("t", lambda topic, n, blob: got.append(n), weak=False)
            await sub.flush()
            os.kill(b.pid, signal.SIGSTOP)
            try:
                sent = 0
                with pytest.raises(BufferError, match="await flush"):
                    for sent in range(200):
                        pub.publish("t", n=sent, blob=blob)
                        await asyncio.sleep(0)
                assert 64 <= sent < 200
            finally:
                os.kill(b.pid, signal.SIGCONT)
            assert await pub.flush() is True
            await until(lambda: len(got) == sent, f"the {sent} messages", 30)
        assert got == list(range(sent))

    run(main())


def test_a_broker_of_protocol_1_is_spoken_to_in_protocol_1(tmp_path: Path) -> None:
    """dial_async as dial: a broker that refuses HELLO 2 is dialled again with HELLO 1."""
    old = old_broker(str(tmp_path / "old.sock"), b"key")

    async def main() -> None:
        async with AioPubSub(str(tmp_path / "old.sock"), b"key") as ps:
            assert await ps.flush()

    try:
        run(main())
        assert old.hellos == [2, 1]
    finally:
        old.close()


def test_a_broker_that_hangs_up_in_the_handshake_is_an_error_at_once(tmp_path: Path) -> None:
    """connect() to a peer that closes during the handshake: ConnectionResetError, not
    a wait for the timeout."""
    path = str(tmp_path / "rude.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            listener.accept()[0].close()

    peer = threading.Thread(target=serve)
    peer.start()

    async def main() -> None:
        with pytest.raises(ConnectionResetError):  # not TimeoutError, 5 s later
            await AioPubSub(path, b"key", timeout=5).connect()

    run(main())
    peer.join(10)


def test_connect_twice_at_once_is_refused(broker: BrokerProcess) -> None:
    """A second connect() while the first is under way: RuntimeError, one connection."""

    async def main() -> None:
        ps = AioPubSub.from_file(broker.credentials)
        results = await asyncio.gather(ps.connect(), ps.connect(), return_exceptions=True)
        try:
            assert results[0] is None and isinstance(results[1], RuntimeError)
            assert len(await ps.broker_clients() or []) == 1
        finally:
            await ps.disconnect()

    run(main())


def test_flush_sends_the_batched_publishes_before_its_ping(mpubsubd_access: Daemon) -> None:
    """flush() asks after what was published before it, batched too: the broker's
    refusal of a batched publish comes before its PONG, and flush() raises it."""

    async def main() -> None:
        async with AioPubSub.from_file(mpubsubd_access.credentials) as ps:
            for n in range(10):
                ps.publish("open", n=n)
            ps.publish(("secret", "plans"), n=1)  # batched behind the others
            with pytest.raises(PermissionError, match="publish on secret/plans"):
                await ps.flush()

    run(main())


def test_every_burst_goes_out_with_no_flush(broker: BrokerProcess) -> None:
    """Each burst of publishes is sent at the next turn of the loop, with no flush():
    the second as the first."""

    async def main() -> None:
        got: Received = []
        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            for burst in range(1, 4):
                for n in range(5):
                    pub.publish("t", n=n)
                await until(lambda: len(got) == 5 * burst, f"burst {burst}")  # noqa: B023
        assert numbers(got) == list(range(5)) * 3

    run(main())


def test_a_lone_large_publish_arrives_whole(broker: BrokerProcess) -> None:
    """A lone publish larger than the socket takes at once is sent at once in part,
    the rest as the broker reads: it arrives whole, and the next one after it."""

    async def main() -> None:
        got: Received = []
        async with two(broker.credentials) as (sub, pub):
            sub.add_subscriber("t", collect(got), weak=False)
            await sub.flush()
            blob = os.urandom(4 * MiB)
            os.kill(broker.pid, signal.SIGSTOP)  # reads nothing: the socket fills
            try:
                pub.publish("t", n=1, blob=blob)  # lone: written by publish itself
                assert pub._link.outbox.size > 0  # the socket took part of it
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await pub.flush()
            pub.publish("t", n=2, blob=b"")
            await until(lambda: len(got) == 2, "both messages")
        assert got[0][1]["blob"] == blob and numbers(got) == [1, 2]

    run(main())


def test_disconnect_drops_what_waits_for_an_absent_broker(
    broker_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages queued while the broker is away are dropped, with a WARNING, by
    disconnect(): a later connection never sends them."""
    b = broker_factory(str(tmp_path / "b.sock"))

    async def main() -> None:
        ps = AioPubSub.from_file(b.credentials, timeout=1.0)
        await ps.connect()
        b.kill()
        await until(lambda: not ps.connected, "the loss noticed")
        ps.publish("t", n=1)
        await ps.disconnect()

    with caplog.at_level(logging.WARNING, logger="mpubsub"):
        run(main())
    assert any(
        r.getMessage() == "disconnected with 1 messages still waiting for the broker: dropped"
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_two_tasks_on_one_messages_iterator_share_it(broker: BrokerProcess) -> None:
    """Two tasks iterating the same messages() both wait, and between them get every
    message: neither is left waiting for one the other was woken for."""

    async def main() -> None:
        taken: List[Tuple[str, int]] = []
        async with (
            two(broker.credentials) as (sub, pub),
            sub.messages("t") as stream,
        ):

            async def consume(name: str) -> None:
                async for _, message in stream:
                    taken.append((name, message["n"]))
                    await asyncio.sleep(0.005)  # let the other take the next

            tasks = [asyncio.ensure_future(consume(name)) for name in ("a", "b")]
            await asyncio.sleep(0.01)  # both waiting
            await sub.flush()
            for n in range(10):
                pub.publish("t", n=n)
                await pub.flush()
            await until(lambda: len(taken) == 10, "ten messages between the two")
            for task in tasks:
                task.cancel()
        assert sorted(n for _, n in taken) == list(range(10))
        assert {name for name, _ in taken} == {"a", "b"}

    run(main())


def test_a_coroutine_subscriber_outside_a_loop_is_a_clear_error() -> None:
    """Published to outside a running loop, a coroutine subscriber is refused with a
    RuntimeError that says why, and leaves no coroutine never awaited behind."""
    ps = AioPubSub("/nowhere", b"key")

    async def on_t(topic: Tuple[str, ...], n: int) -> None:
        """Never runs."""

    ps.add_subscriber("t", on_t)
    with pytest.raises(RuntimeError, match=r"^a coroutine subscriber needs a running event loop"):
        ps.publish("t", n=1)
    gc.collect()  # a coroutine never awaited would warn here (an error in these tests)


def test_disconnect_ends_a_flush_waiting_for_the_broker(
    broker_factory: Factory, tmp_path: Path
) -> None:
    """A flush() waiting for a broker that does not come back ends, False, when
    disconnect() is called: not at its timeout."""
    b = broker_factory(str(tmp_path / "b.sock"))

    async def main() -> None:
        ps = AioPubSub.from_file(b.credentials, timeout=60.0)
        await ps.connect()
        b.kill()
        await until(lambda: not ps.connected, "the loss noticed")
        flushing = asyncio.ensure_future(ps.flush())
        await asyncio.sleep(0.1)  # waiting for a reconnection
        assert not flushing.done()
        await ps.disconnect()
        assert await asyncio.wait_for(flushing, 10) is False

    run(main())


# --- a hostile broker, as the asyncio client sees it (THREATS.md, attacker 5) ----------------


def test_a_broker_that_never_completes_the_handshake(tmp_path: Path) -> None:
    """connect() gives up at its timeout with TimeoutError, and leaves nothing behind."""
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(path)
        mute.listen()

        async def main() -> None:
            ps = AioPubSub(path, b"key", timeout=0.5)
            with pytest.raises(TimeoutError, match="did not complete the handshake in time"):
                await ps.connect()
            assert not ps.connected
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

        run(main())


def test_a_broker_that_sends_garbage_is_left_and_dialled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown frame type after WELCOME: one WARNING, the connection dropped and
    made again with backoff, the loop free meanwhile."""

    def garbage(sock: socket.socket) -> None:
        sock.sendall(b"\x00\x00\x00\x01\xee!")

    fake = FakeBroker(str(tmp_path / "bad.sock"), b"key", garbage)

    async def main() -> None:
        ps = AioPubSub(str(tmp_path / "bad.sock"), b"key")
        await ps.connect()
        ticks = 0
        while fake.accepted < 3:  # the loop runs on: this coroutine keeps ticking
            await asyncio.sleep(0.01)
            ticks += 1
            assert ticks < 1000, "no reconnection"
        await ps.disconnect()

    try:
        with caplog.at_level(logging.WARNING, logger="mpubsub"):
            run(main())
    finally:
        fake.close()
    lost = [r.getMessage() for r in caplog.records if "lost the broker" in r.getMessage()]
    assert lost and "protocol error: unknown frame type 238" in lost[0], lost


def test_a_broker_that_never_reads_gets_buffer_error(tmp_path: Path) -> None:
    """publish never blocks on a broker that reads nothing: past 64 MiB waiting, it
    raises BufferError, and flush() times out instead of waiting for ever."""
    released = threading.Event()
    fake = FakeBroker(str(tmp_path / "deaf.sock"), b"key", lambda sock: released.wait(30))

    async def main() -> None:
        ps = AioPubSub(str(tmp_path / "deaf.sock"), b"key", timeout=0.5)
        await ps.connect()
        blob = b"x" * MiB
        with pytest.raises(BufferError, match="wait for a broker that does not read them"):
            for _ in range(100):
                ps.publish("t", blob=blob)
        with pytest.raises(TimeoutError):
            await ps.flush()
        released.set()
        await ps.disconnect()

    try:
        run(main())
    finally:
        released.set()
        fake.close()


def test_wait_forever_until_a_subscriber_disconnects(broker: BrokerProcess) -> None:
    """await wait_forever() delivers until a subscriber calls disconnect(), then
    returns; RuntimeError when not connected, as the threaded client's."""

    async def main() -> None:
        got: Received = []
        async with AioPubSub.from_file(broker.credentials) as pub:
            sub = AioPubSub.from_file(broker.credentials)
            with pytest.raises(RuntimeError, match=r"^Not connected$"):
                await sub.wait_forever()
            await sub.connect()

            async def on_t(topic: Tuple[str, ...], n: int) -> None:
                got.append((topic, {"n": n}))
                if n == 2:
                    await sub.disconnect()

            sub.add_subscriber("t", on_t)
            await sub.flush()
            for n in range(3):
                pub.publish("t", n=n)
            await asyncio.wait_for(sub.wait_forever(), 10)
        assert numbers(got) == [0, 1, 2] and not sub.connected

    run(main())
