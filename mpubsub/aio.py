"""The pub-sub for asyncio programs: ``mpubsub.NetPubSub``'s behaviour, with no threads.

::

    async with mpubsub.aio.NetPubSub.from_file("/run/mpubsub/broker.pckl") as ps:
        ps.add_subscriber("alarm", on_alarm)          # a plain function or an async def
        ps.publish("sensor", temperature=21.5)        # never waits
        await ps.flush()                              # the broker has it
        async for topic, message in ps.messages("sensor"):
            ...

It speaks the same protocol through the same code as the threaded client
(the handshake, frames, subscriptions, senders, reconnection's backoff):
only the waiting is the event loop's. Use it from the loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import weakref
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Deque,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    cast,
)

from . import _identity
from . import _protocol as proto
from ._aiolink import AioLink
from ._client import DEFAULT_MAX_QUEUED, Client
from ._identity import Sender, awaited_sender, current_sender, set_sender
from ._inbox import MAX_INBOX
from ._link import State
from ._pubsub import PubSub, _Ref
from ._remote import LOCAL_SUFFIX, is_local
from ._topics import as_topic
from ._types import Subscriber, Topic

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_QUEUED",
    "LOCAL_SUFFIX",
    "Messages",
    "NetPubSub",
]

logger = logging.getLogger("mpubsub.aio")

#: Messages a ``messages()`` iterator holds for a slow consumer; past it the oldest go.
DEFAULT_MAX_MESSAGES = 10_000
#: Bytes of them it holds (their frames', and ``_HELD`` each), likewise.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# What a message behind a coroutine subscriber costs beyond its frame's bytes, about
# (its dict, its entry in the backlog): small messages cost mostly that.
_HELD = 256

_PING = proto.frame(proto.PING, b"")
_STATS = proto.frame(proto.STATS, b"")
_CLIENTS = proto.frame(proto.CLIENTS, b"")


class _Delivery(NamedTuple):
    """A message whose subscribers are still to be called, or awaited, in order."""

    size: int  # its frame's bytes (0: a local publish)
    sender: Optional[Sender]
    topic: Tuple[str, ...]
    message: Dict[str, Any]
    # Where its delivery stands, once it has begun: its subscriptions, the one
    # awaited and what it returned, what the ones before it raised.
    refs: Optional[Tuple[_Ref, ...]] = None
    at: int = -1  # the index in refs of the subscriber awaited
    awaitable: Optional[Awaitable[Any]] = None
    failures: Optional[List[Tuple[Subscriber, Exception]]] = None


#: A subscriber here: a plain function, or an ``async def`` (its coroutine is awaited).
AnySubscriber = Callable[..., Optional[Awaitable[Any]]]
# What _step found: the index of a subscriber, and the awaitable it returned.
_Step = Optional[Tuple[int, Awaitable[Any]]]


class NetPubSub(Client):
    """A PubSub connected to a Broker, for an asyncio program.

    As ``mpubsub.NetPubSub`` (topics, ``*local``, broadcasts, reconnection
    and its backoff, credentials read again from ``from_file``'s file, the
    errors), but every wait is awaited: ``connect()``, ``disconnect()``,
    ``flush()``, ``broker_statistics()``, ``broker_clients()``. The broker's
    messages are delivered by the event loop as they come, with no poll().

    ``publish`` never waits: a lone publish is sent at once, publishes close
    together are sent together (each 64 KiB, and at the loop's next turn).
    While the broker is away, up to
    *max_queued* messages wait for it (past that the oldest go, with one
    WARNING per outage); while it does not read, BufferError once 64 MiB
    wait (``await flush()`` lets it catch up).

    A subscriber is a plain function or an ``async def``. Each message's
    subscribers are called in subscription order, and a coroutine
    subscriber is awaited before the next subscriber and the next message:
    the order of each publisher's messages holds. One that raises is
    reported to *on_error* (logged by default), and the others go on.
    """

    _link: AioLink

    def _set_up(self) -> None:
        # Messages behind a coroutine subscriber, in order, and the task awaiting them.
        self._backlog: Deque[_Delivery] = collections.deque()
        self._backlog_bytes = 0  # of the broker's messages in it
        self._size = 0  # of the broker's message being delivered (0: a local one)
        self._awaiting: Optional[asyncio.Task[None]] = None
        # Dropped while connected (no disconnect()): its socket closes, no task lingers.
        weakref.finalize(self, self._link.abandon)

    def _new_link(
        self, address: Any, authkey: Optional[bytes], timeout: float, max_queued: int
    ) -> AioLink:
        link = AioLink(address, authkey, timeout, max_queued, self._connected)
        link.deliver_to(self._received)
        return link

    # --- connection ----------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the broker, or raise (OSError, AuthenticationError, ProtocolError)."""
        await self._link.connect()

    async def disconnect(self) -> None:
        """Close the connection and stop reconnecting; RuntimeError if not connected.

        What was published before is sent first, unless the broker takes
        none of it for *timeout* seconds: then it is dropped, with a WARNING.
        Messages still waiting for a coroutine subscriber are delivered still.
        """
        await self._link.disconnect()

    async def wait_forever(self) -> None:
        """Wait until ``disconnect()`` is called (by a subscriber, or another task).

        Messages are delivered meanwhile, as they always are. RuntimeError if
        the pub-sub is not connected to begin with.
        """
        await self._link.wait_offline()

    async def __aenter__(self) -> NetPubSub:
        if self._link.state is State.OFFLINE:
            await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._link.state is not State.OFFLINE:
            await self.disconnect()

    # --- subscriptions -------------------------------------------------------

    def add_subscriber(self, topic: Topic, subscriber: AnySubscriber, *, weak: bool = True) -> None:
        """As ``mpubsub.NetPubSub.add_subscriber``; *subscriber* may be an ``async def``."""
        super().add_subscriber(topic, cast(Subscriber, subscriber), weak=weak)

    def remove_subscriber(self, topic: Topic, subscriber: AnySubscriber) -> None:
        """As ``mpubsub.NetPubSub.remove_subscriber``."""
        super().remove_subscriber(topic, cast(Subscriber, subscriber))

    # --- publishing ------------------------------------------------------------

    def publish(self, topic: Topic, **message: Any) -> None:
        """Send *message* to the broker (unless the topic is local), then deliver it here.

        Never waits. Raises before anyone gets the message if it cannot be
        pickled, or (ValueError) if it or its topic is larger than the broker
        accepts; BufferError while 64 MiB wait for a broker that does not
        read. Coroutine subscribers here are awaited later, in order.
        """
        if topic.__class__ is not tuple:
            topic = as_topic(topic)
        link = self._link
        if link.state is not State.OFFLINE and not is_local(topic):
            link.send(proto.pub_frame(*self._pub_parts(topic, message)))
        if self._awaiting is not None:  # behind a coroutine subscriber: after it
            self._backlog.append(_Delivery(0, None, topic, message))
        elif _identity.busy or awaited_sender.get() is not None:
            self._publish_here(topic, message)  # inside a delivery: with no sender
        else:
            self._offer(None, topic, message)

    def _deliver_here(self, topic: Tuple[str, ...], message: Dict[str, Any]) -> None:
        self._offer(None, topic, message)

    async def flush(self) -> bool:
        """Send what waits for the broker and wait until the broker has handled it.

        As ``mpubsub.NetPubSub.flush``: True once the broker has every
        subscription change and message published before the call; False if
        it is out of reach (messages stay queued); TimeoutError if it does
        not answer; PermissionError if its policy refused something since
        the last flush. Cancelling it leaves the pub-sub as it was.
        """
        answered = await self._link.ask(proto.PONG, _PING, self._sync_subscriptions) is not None
        self._raise_refusals()
        return answered

    async def broker_statistics(self) -> Optional[Dict[str, Any]]:
        """As ``mpubsub.NetPubSub.broker_statistics``."""
        reply = await self._link.ask(proto.STATS_REPLY, _STATS, self._sync_subscriptions)
        return None if reply is None else proto.stats_figures(reply)

    async def broker_clients(self) -> Optional[List[Dict[str, Any]]]:
        """As ``mpubsub.NetPubSub.broker_clients`` (needs the ``admin`` right)."""
        reply = await self._link.ask(proto.CLIENTS_REPLY, _CLIENTS, self._sync_subscriptions)
        return None if reply is None else proto.clients_figures(reply)

    # --- receiving -----------------------------------------------------------

    def messages(
        self,
        *topics: Topic,
        maxsize: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Messages:
        """An asynchronous iterator of ``(topic, message)`` published on *topics*.

        It subscribes at once, and holds up to *maxsize* messages for its
        consumer; past that the oldest go, counted in ``dropped``, with one
        WARNING each time it falls behind. ``break``, cancellation,
        ``aclose()`` or leaving ``async with`` ends it (and its
        subscriptions); ``break`` only if nothing else holds the iterator
        (one kept in a variable stays subscribed until ``aclose()``), and
        ``disconnect()`` does not. No topic: every message (the catch-all).
        """
        return Messages(self, topics or (None,), maxsize, max_bytes)

    def _received(self, frames: List[bytes]) -> None:
        """The broker's messages, just read: deliver them, in order, with their senders."""
        runs = self._runs(frames)
        previous = set_sender(None)
        try:
            for sender, run in runs:
                set_sender(sender)
                for frame in run:
                    decoded = self._message_of(frame)
                    if decoded is None:
                        continue
                    topic, message = decoded
                    try:
                        message = dict(**message)  # what a subscriber's ** takes, checked once
                    except TypeError:
                        logger.error(
                            "dropping a message that is not a mapping of strings: %r", topic
                        )
                        continue
                    if self._awaiting is None:
                        self._size = len(frame)
                        try:
                            self._offer(sender, topic, message)
                        except Exception:  # on_error's: the other messages go on
                            logger.exception("the error handler raised for a message on %r", topic)
                    else:
                        self._backlog.append(_Delivery(len(frame), sender, topic, message))
                        self._backlog_bytes += len(frame) + _HELD
        finally:
            self._size = 0
            set_sender(previous)
        if self._backlog_bytes > MAX_INBOX:
            self._link.pause_reading(True)  # the broker keeps the rest, or cuts us

    def _offer(self, sender: Optional[Sender], topic: Tuple[str, ...], message: Any) -> None:
        """Call *message*'s subscribers until one returns an awaitable: the rest is the
        task's that awaits it. Their errors go to on_error, which may raise."""
        refs = self._routes[topic]
        if not refs:
            return
        failures: List[Tuple[Subscriber, Exception]] = []
        step = self._step(topic, message, refs, 0, failures)
        if step is not None:
            index, awaitable = step
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                if isinstance(awaitable, Coroutine):
                    awaitable.close()  # never to be awaited: no warning that it was not
                raise RuntimeError(
                    "a coroutine subscriber needs a running event loop: publish from "
                    "the loop's thread"
                ) from None
            begun = _Delivery(self._size, sender, topic, message, refs, index, awaitable, failures)
            self._backlog.append(begun)
            # In a context of its own: not the one of whoever published or read.
            self._awaiting = contextvars.Context().run(loop.create_task, self._await_backlog())
        elif failures:
            self._handle_failures(topic, message, failures)

    def _step(
        self,
        topic: Tuple[str, ...],
        message: Dict[str, Any],
        refs: Sequence[_Ref],
        start: int,
        failures: List[Tuple[Subscriber, Exception]],
    ) -> _Step:
        """Call the subscribers of *refs* from *start*, until one returns an awaitable."""
        for index in range(start, len(refs)):
            subscriber = refs[index]()
            if subscriber is None:
                continue
            try:
                result = subscriber(topic, **message)
            except Exception as exc:  # reported once everyone has the message
                failures.append((subscriber, exc))
                continue
            if result is not None and hasattr(result, "__await__"):
                return index, result
        return None

    async def _await_backlog(self) -> None:
        """Deliver the backlog in order, awaiting each coroutine subscriber."""
        backlog = self._backlog
        try:
            while backlog:
                delivery = backlog.popleft()
                self._size = delivery.size
                token = awaited_sender.set(delivery.sender)
                try:
                    await self._deliver(delivery)
                finally:
                    awaited_sender.reset(token)
                    self._size = 0
        finally:
            self._awaiting = None
            self._backlog_bytes = 0
            self._link.pause_reading(False)

    async def _deliver(self, delivery: _Delivery) -> None:
        """Call or await the subscribers of one message, from where its delivery stands."""
        topic, message = delivery.topic, delivery.message
        failures = delivery.failures if delivery.failures is not None else []
        refs = delivery.refs
        if refs is None:
            refs = self._routes[topic]
            step = self._step(topic, message, refs, 0, failures)
        else:
            assert delivery.awaitable is not None
            step = delivery.at, delivery.awaitable
        while step is not None:
            index, awaitable = step
            try:
                await awaitable
            except asyncio.CancelledError as exc:
                if _cancelling():  # this task is: the loop is closing
                    raise
                # The subscriber's own (it awaited what another task cancelled):
                # a failure like any other, not the end.
                failure = RuntimeError("the subscriber was cancelled")
                failure.__cause__ = exc
                failures.append((refs[index]() or _gone, failure))
            except Exception as exc:
                failures.append((refs[index]() or _gone, exc))
            step = self._step(topic, message, refs, index + 1, failures)
        if failures:
            self._report(topic, message, failures)

    def _report(
        self,
        topic: Tuple[str, ...],
        message: Dict[str, Any],
        failures: List[Tuple[Subscriber, Exception]],
    ) -> None:
        """Hand *failures* to on_error; what it raises is logged, and delivery goes on."""
        try:
            self._handle_failures(topic, message, failures)
        except Exception:
            logger.exception("the error handler raised for a message on %r", topic)


def _cancelling() -> bool:
    """True if the current task is being cancelled (always, before Python 3.11, which
    cannot tell: a subscriber's CancelledError then ends its message's delivery)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or bool(cancelling())


def _gone(*args: Any, **kwargs: Any) -> None:
    """Stands for a coroutine subscriber that was collected while it was awaited."""


class _Queue:
    """What a Messages iterator holds, apart from it: its subscription refers to this,
    so that the iterator itself is collected (and unsubscribes) once dropped."""

    def __init__(self, pubsub: NetPubSub, maxsize: int, max_bytes: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.items: Deque[Tuple[Tuple[str, ...], Dict[str, Any], Optional[Sender], int]] = (
            collections.deque()
        )
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self.bytes = 0
        self.dropped = 0
        self.behind = False  # dropping since it last caught up (warned once)
        self.waiters: List[asyncio.Future[None]] = []  # of the tasks in __anext__
        self.closed = False
        self._pubsub = weakref.ref(pubsub)  # for the size of what it delivers

    def put(self, topic: Tuple[str, ...], /, **message: Any) -> None:
        pubsub = self._pubsub()
        size = (pubsub._size if pubsub is not None else 0) + _HELD
        items = self.items
        items.append((topic, message, current_sender(), size))
        self.bytes += size
        while len(items) > self.maxsize or (self.bytes > self.max_bytes and len(items) > 1):
            self.bytes -= items.popleft()[3]
            self.dropped += 1
            if not self.behind:
                self.behind = True
                logger.warning(
                    "a messages() consumer fell behind (%d messages, %d bytes held): "
                    "dropping the oldest",
                    len(items),
                    self.bytes,
                )
        self.wake()

    def take(self) -> Tuple[Tuple[str, ...], Dict[str, Any], Optional[Sender]]:
        topic, message, sender, size = self.items.popleft()
        self.bytes -= size
        if not self.items:
            self.behind = False
        return topic, message, sender

    def close(self) -> None:
        """No more: what it holds goes, and its consumers end."""
        self.closed = True
        self.items.clear()
        self.bytes = 0
        self.wake()

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


class Messages(AsyncIterator[Tuple[Tuple[str, ...], Dict[str, Any]]]):
    """``NetPubSub.messages()``: the messages of some topics, for ``async for``.

    ``dropped`` counts the messages lost to a slow consumer; ``sender`` is
    who published the last message it gave (``current_sender()``'s, None
    for a local one).
    """

    def __init__(
        self, pubsub: NetPubSub, topics: Sequence[Topic], maxsize: int, max_bytes: int
    ) -> None:
        self._queue = queue = _Queue(pubsub, maxsize, max_bytes)
        self.topics = tuple(as_topic(topic) for topic in topics)
        self.sender: Optional[Sender] = None
        subscribed: List[Tuple[str, ...]] = []
        try:
            for topic in self.topics:
                pubsub.add_subscriber(topic, queue.put, weak=False)
                subscribed.append(topic)
        except BaseException:
            _unsubscribe(weakref.ref(pubsub), subscribed, queue)
            raise
        self._finalizer = weakref.finalize(
            self, _unsubscribe, weakref.ref(pubsub), self.topics, queue
        )

    @property
    def dropped(self) -> int:
        """Messages lost because the consumer fell *maxsize* behind."""
        return self._queue.dropped

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
        queue = self._queue
        while not queue.items:
            if queue.closed:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            queue.waiters.append(waiter)
            try:
                await waiter
            finally:
                queue.waiters.remove(waiter)
        topic, message, self.sender = queue.take()
        return topic, message

    async def aclose(self) -> None:
        """Unsubscribe, and end the iteration (what it holds is dropped)."""
        self._finalizer()

    async def __aenter__(self) -> Messages:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _unsubscribe(
    ref: weakref.ReferenceType[NetPubSub], topics: Sequence[Tuple[str, ...]], queue: _Queue
) -> None:
    queue.close()
    pubsub = ref()
    if pubsub is not None:
        for topic in topics:
            PubSub.remove_subscriber(pubsub, topic, queue.put)
        pubsub._sync_subscriptions()
