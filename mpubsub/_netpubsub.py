"""NetPubSub: a PubSub whose messages also travel through a Broker.

The pub-sub's side only: what to send the broker (publishes, subscription
changes, requests) and what to deliver of what it sent. The connection
itself, its reconnections and its queues are the Link's (``_link.py``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from . import _identity
from . import _protocol as proto
from ._client import DEFAULT_MAX_QUEUED, Client
from ._identity import set_sender
from ._link import Link, State, wait
from ._pubsub import PubSub
from ._remote import LOCAL_SUFFIX, is_local
from ._requests import Requests
from ._topics import as_topic
from ._types import Topic

logger = logging.getLogger("mpubsub.net")

__all__ = ["DEFAULT_MAX_QUEUED", "LOCAL_SUFFIX", "NetPubSub"]

# A payload this large goes out on its own, header and payload gathered by
# sendmsg: copying it into a frame and a batch costs more than a syscall.
_LARGE = 32 * 1024

_PING = proto.frame(proto.PING, b"")
_T = TypeVar("_T")
_STATS = proto.frame(proto.STATS, b"")
_CLIENTS = proto.frame(proto.CLIENTS, b"")


class NetPubSub(Client):
    """A PubSub connected to a Broker, so that pub-subs in other processes share messages.

    While connected, ``publish`` sends the message to the broker (which
    passes it to every other pub-sub subscribed to the topic, never back to
    this one) and then delivers it to the local subscribers. A topic whose
    last element is ``'*local'`` stays local (its subscribers still get
    broadcasts from other pub-subs, as every subscriber does). Messages from the broker are
    delivered by ``poll()`` or ``wait_forever()``, in the calling thread.

    If the broker goes away, the pub-sub keeps working locally and reconnects
    by itself (backing off from 50 ms to 5 s, re-reading its credentials
    file if it came from ``from_file``), then re-sends its subscriptions.
    Meanwhile up to *max_queued* published messages wait for the broker;
    past that the oldest are dropped, with one WARNING per outage. Delivery
    is at most once: what was in flight when the connection broke is lost.

    ``publish`` is thread-safe and blocks only while the broker does not
    read (backpressure); call ``poll`` from one thread at a time.
    """

    _link: Link

    def _set_up(self) -> None:
        self._requests = Requests(self._link)
        self._delivering = threading.Lock()  # held by the thread in poll() or wait_forever()
        self._poller: Optional[int] = None  # that thread

    def _new_link(
        self, address: Any, authkey: Optional[bytes], timeout: float, max_queued: int
    ) -> Link:
        return Link(address, authkey, timeout, max_queued, self._connected)

    def connect(self) -> None:
        """Connect to the broker, or raise (OSError, AuthenticationError, ProtocolError)."""
        self._link.connect()

    def disconnect(self) -> None:
        """Close the connection and stop reconnecting; RuntimeError if not connected.

        What was published before is sent first, unless the broker takes
        none of it for *timeout* seconds: then it is dropped, with a WARNING.
        """
        self._link.disconnect()

    def __enter__(self) -> NetPubSub:
        if self._link.state is State.OFFLINE:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._link.state is not State.OFFLINE:
            self.disconnect()

    def fileno(self) -> int:
        """A descriptor readable when ``poll()`` has work: for a selector or event loop.

        Readable when the broker sent something, or when messages already
        read (by ``flush()``, say) wait for ``poll()``. It stays the same
        across reconnections (an epoll descriptor, made at the first call).
        RuntimeError if the pub-sub is not connected.
        """
        link = self._link
        with link.lock:
            if link.state is State.OFFLINE:
                raise RuntimeError("Not connected")
            return link.inbox.fileno(link.sock)

    # --- publishing ------------------------------------------------------------

    def publish(self, topic: Topic, **message: Any) -> None:
        """Send *message* to the broker (unless the topic is local), then deliver it here.

        Raises before anyone gets the message if it cannot be pickled, or
        (ValueError) if it or its topic is larger than the broker accepts.
        Never waits for a reconnection: while the broker is away, the
        message is queued.
        """
        if topic.__class__ is not tuple:
            topic = as_topic(topic)
        link = self._link
        if link.state is not State.OFFLINE and not is_local(topic):
            encoded, payload = self._pub_parts(topic, message)
            if len(payload) >= _LARGE:
                wait = link.send(proto.pub_head(encoded, len(payload)), payload)
            else:
                wait = link.send(proto.pub_frame(encoded, payload))
            if wait is not None and not link.drain(wait, link.publish_timeout):
                raise TimeoutError(
                    f"the broker did not read the message in {link.publish_timeout} s"
                )
        if _identity.busy:  # a delivery from the broker, maybe this thread's
            self._publish_here(topic, message)
        else:
            PubSub.publish(self, topic, **message)

    def flush(self) -> bool:
        """Push what waits for the broker and wait until the broker has handled it.

        Once this returns True, the broker has every subscription change and
        every message published before the call. False if the broker is out
        of reach (messages stay queued); TimeoutError if it does not answer.
        PermissionError, naming the topic, if the broker's policy refused a
        publish or a subscription since the last flush (each also logged once
        per topic, at WARNING, when the broker says so): the refused message
        is lost, the refused subscription brings nothing.
        """
        answered = self._requests.ask(proto.PONG, _PING, self._sync_subscriptions) is not None
        self._raise_refusals()
        return answered

    def broker_clients(self) -> Optional[List[Dict[str, Any]]]:
        """Every connection to the broker, as ``mpubsub clients --json`` lists them, or
        None if the broker is out of reach.

        Needs the ``admin`` right on ``/`` in mpubsubd's policy: PermissionError
        without it. TimeoutError if the broker does not answer.
        """
        reply = self._requests.ask(proto.CLIENTS_REPLY, _CLIENTS, self._sync_subscriptions)
        return None if reply is None else proto.clients_figures(reply)

    def broker_statistics(self) -> Optional[Dict[str, Any]]:
        """The broker's figures (see ``BrokerStatistics``), or None if it is out of reach.

        TimeoutError if it does not answer, ProtocolError if its answer is not figures.
        """
        reply = self._requests.ask(proto.STATS_REPLY, _STATS, self._sync_subscriptions)
        return None if reply is None else proto.stats_figures(reply)

    # --- receiving -----------------------------------------------------------

    def poll(self, timeout: Optional[float] = 0) -> bool:
        """Deliver the messages that arrived from the broker; True if there were any.

        Waits up to *timeout* seconds (None: until something arrives) for the
        first one, never longer, even while the broker is away (a background
        thread reconnects meanwhile). RuntimeError if the pub-sub is not
        connected at all, or if another thread is in poll() or
        wait_forever() (call them from one thread at a time).
        """
        return self._claimed(self._poll, timeout)

    def _claimed(self, deliver: Callable[..., _T], *args: Any) -> _T:
        """Run *deliver* as the one thread delivering: another thread's poll() or
        wait_forever() raises meanwhile (trio's conflict detector); a subscriber's,
        inside a delivery, is this thread's and goes on."""
        me = threading.get_ident()
        if not self._delivering.acquire(False):
            if self._poller != me:
                raise RuntimeError(
                    "poll() is already running in another thread: call poll() and "
                    "wait_forever() from one thread at a time"
                )
            return deliver(*args)
        self._poller = me
        try:
            return deliver(*args)
        finally:
            self._poller = None
            self._delivering.release()

    def _poll(self, timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            frames, sock = self._receive(read=waited)
            if frames and self._dispatch(frames):
                return True
            if waited and deadline is not None and time.monotonic() >= deadline:
                return False
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if sock is None:
                self._link.wait_up(remaining)
            else:
                wait(sock, True, False, remaining)  # closed meanwhile? Reading next tells
            waited = True

    def _receive(self, read: bool) -> Tuple[List[bytes], Optional[socket.socket]]:
        """Sync if needed, read if asked; what waits to be delivered."""
        link = self._link
        with link.lock:
            if link.state is State.OFFLINE:
                raise RuntimeError("Not connected")
            if link.sock is not None and self._remote.unsent:
                self._sync_subscriptions()
            if read and link.sock is not None:
                link.read()
            return link.inbox.messages(), link.sock

    def wait_forever(self) -> None:
        """Deliver messages from the broker until ``disconnect()`` is called.

        By a subscriber, or by another thread: it returns at once then.

        RuntimeError if the pub-sub is not connected to begin with, or if
        another thread is in poll() or wait_forever().
        """
        self._claimed(self._wait_forever)

    def _wait_forever(self) -> None:
        self._poll(0)
        while not self._link.offline:
            try:
                self._poll(None)
            except RuntimeError:
                if not self._link.offline:
                    raise  # not ours: from a subscriber's error handler

    def _dispatch(self, frames: List[bytes]) -> bool:
        """Deliver *frames*, each message with its sender for ``current_sender()``;
        False if they held no message (only news of who sends the next)."""
        runs = self._runs(frames)  # before any subscriber runs, and maybe polls
        previous = set_sender(None)
        try:
            for sender, messages in runs:
                set_sender(sender)
                self._deliver(messages)
        finally:
            set_sender(previous)
        return any(messages for _, messages in runs)

    def _deliver(self, frames: List[bytes]) -> None:
        for frame in frames:
            decoded = self._message_of(frame)
            if decoded is None:
                continue
            topic, message = decoded
            try:
                PubSub.publish(self, topic, **message)
            except TypeError as exc:
                if exc.__traceback__ is None or exc.__traceback__.tb_next is not None:
                    raise  # from inside publish: a subscriber's, re-raised by on_error
                # Raised by the call itself: the payload is not a mapping of strings.
                logger.error("dropping a message that is not a mapping of strings: %r", topic)
