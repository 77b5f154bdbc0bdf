"""NetPubSub: a PubSub whose messages also travel through a Broker."""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import random
import select
import socket
import threading
import time
import typing
import weakref
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple, Type, Union

from . import _protocol as proto
from ._connect import connect_socket, handshake
from ._credentials import read_credentials
from ._memo import Memo
from ._pubsub import ErrorHandler, PubSub, as_topic
from ._text import printable
from .errors import AuthenticationError, CredentialsError, MPubSubError, ProtocolError
from .typing import Subscriber, Topic

logger = logging.getLogger("mpubsub.net")

#: A topic whose last element is this is delivered locally only.
LOCAL_SUFFIX = "*local"

#: Messages kept for the broker while reconnecting; past it the oldest go.
DEFAULT_MAX_QUEUED = 10_000

_RECV_SIZE = 64 * 1024
# Publishes closer together than this are batched and sent by a writer
# thread (fewer syscalls and wake-ups along the way); a lone publish is sent
# at once by the publishing thread, so it never waits.
_BURST_WINDOW = 0.0001
# Batched bytes past which publish sends them itself (and so blocks while
# the broker does not read: backpressure).
_BATCH_LIMIT = 1024 * 1024
# A payload this large goes out on its own, header and payload gathered by
# sendmsg: copying it into a frame and a batch costs more than a syscall.
_LARGE = 32 * 1024
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0
# Messages read and not yet delivered by poll() past which nothing more is read.
_MAX_INBOX = 64 * 1024 * 1024
# A connection that lasted less than this was cut, not lost: back off more.
_STABLE = 1.0
# Subscription changes remembered one by one; past it, all are sent again.
_MAX_CHANGED = 1000

_PING = proto.frame(proto.PING, b"")
# Subscribed to at the broker for broadcasts only (see _want_broadcasts).
_BROADCASTS = proto.encode_topic((LOCAL_SUFFIX,))
_STATS = proto.frame(proto.STATS, b"")

# Connection states. OFFLINE: never connected, or disconnect() was called.
_OFFLINE, _CONNECTED, _RECONNECTING = "offline", "connected", "reconnecting"


class NetPubSub(PubSub):
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

    def __init__(
        self,
        address: Any,
        authkey: Optional[bytes] = None,
        *,
        timeout: float = 5.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        on_error: Optional[ErrorHandler] = None,
    ) -> None:
        super().__init__(on_error=on_error)
        self._timeout = timeout
        self._io = threading.RLock()
        self._sock: Optional[socket.socket] = None
        self._state = _OFFLINE
        self._decoder = proto.FrameDecoder(proto.DEFAULT_MAX_MESSAGE)
        self._inbox: Deque[bytes] = collections.deque()  # read, not yet delivered by poll()
        self._ready: Optional[_Readiness] = None  # behind fileno(), once asked for
        self._inbox_size = 0
        self._queue: Deque[bytes] = collections.deque(maxlen=max_queued)
        self._dropped = 0
        self._replies: Dict[int, bytes] = {}  # the last answer of each kind
        # Requests sent and answers read on this connection, by kind of
        # answer: the broker answers in order, so the Nth answer is the Nth
        # request's, however late (a timed-out flush's PONG is not the next's).
        self._asked: typing.Counter[int] = collections.Counter()
        self._answered: typing.Counter[int] = collections.Counter()
        self._pending: List[bytes] = []  # batched publishes, for the writer thread
        self._pending_size = 0
        # Bytes handed over for the broker that the socket has not taken yet, in
        # order (see _Chunk); _out_offset of the first chunk are already sent.
        self._out: Deque[_Chunk] = collections.deque()
        self._out_offset = 0
        self._out_size = 0  # what is left to send of them
        self._last_send = 0.0
        self._kick = threading.Event()
        self._writer: Optional[threading.Thread] = None
        self._subs_changed = False
        self._changed: Set[Tuple[str, ...]] = set()  # topics to tell the broker about
        self._resync = True  # tell it every topic instead
        self._remote: Set[bytes] = set()
        self._limits = proto.Limits()
        self._max_message = self._limits.max_message
        self._backoff = _BACKOFF_MIN
        self._next_attempt = 0.0
        self._dialing = False  # a reconnection is under way (outside the lock)
        self._up = threading.Event()  # set while connected, or once disconnect() is called
        self._up_since = 0.0
        self._limits_known = False  # the limits are a broker's, not our defaults
        self._remote_bytes = 0  # the bytes of the topics in _remote
        self._refused_credentials = False  # warned of it in this outage
        self._encoded: Memo[Tuple[str, ...], bytes] = Memo(self._encode, weigh=_weigh)
        self._decoded: Memo[bytes, Tuple[str, ...]] = Memo(proto.decode_topic, weigh=_weigh)
        self._credentials: Optional[Union[str, os.PathLike[str]]] = None
        # How payloads from the broker become messages (the CLI restricts it).
        self._loads: Callable[[bytes], Any] = pickle.loads
        self._address: Any = None
        self._authkey = b""
        self._pid = 0  # the process that connected
        self._publish_timeout: Optional[float] = None  # backpressure's (the CLI sets one)
        self.set_broker(address, authkey)
        _LIVE.add(self)

    @classmethod
    def from_file(
        cls: Type[NetPubSub], path: Union[str, os.PathLike[str]], **kwargs: Any
    ) -> NetPubSub:
        """A pub-sub for the broker whose ``(address, authkey)`` pickle is at *path*.

        The file is read again at each reconnection. It must be a regular
        file (not a symbolic link) owned by root or by the calling user, and
        not writable by group or others: otherwise CredentialsError (while
        reconnecting: one WARNING per outage, and no connection).
        """
        address, authkey = read_credentials(path)
        pubsub = cls(address, authkey, **kwargs)
        pubsub._credentials = path
        return pubsub

    # --- connection ----------------------------------------------------------

    def set_broker(self, address: Any, authkey: Optional[bytes] = None) -> None:
        """Use another broker from the next ``connect()``; RuntimeError while connected."""
        if self._state != _OFFLINE:
            raise RuntimeError("Cannot change broker on a connected pub-sub")
        self._address = address
        self._authkey = (
            authkey if authkey is not None else multiprocessing.current_process().authkey
        )
        self._credentials = None

    @property
    def address(self) -> Any:
        """The broker's address (re-read from the credentials file at each reconnection)."""
        return self._address

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is up."""
        return self._sock is not None

    def connect(self) -> None:
        """Connect to the broker, or raise (OSError, AuthenticationError, ProtocolError)."""
        with self._io:
            if self._state != _OFFLINE:
                raise RuntimeError("Already connected")
            dialed = self._dial()
            self._state = _CONNECTED  # first: a connection lost at once is made again
            self._pid = os.getpid()  # the process whose exit sends what it left
            _flush_at_exit_of_this_process()
            self._install(dialed)

    def disconnect(self) -> None:
        """Close the connection and stop reconnecting; RuntimeError if not connected.

        What was published before is sent first, unless the broker takes
        none of it for *timeout* seconds: then it is dropped, with a WARNING.
        """
        with self._io:
            if self._state == _OFFLINE:
                raise RuntimeError("Not connected")
        self._send_the_rest(self._timeout)
        with self._io:
            if self._state == _OFFLINE:  # another thread disconnected meanwhile
                return
            self._drop_unsent("disconnected")
            self._state = _OFFLINE
            if self._queue:
                logger.warning(
                    "disconnected with %d messages still waiting for the broker: dropped",
                    len(self._queue),
                )
            self._queue.clear()
            self._close()
            self._kick.set()  # the writer thread ends
            self._up.set()  # poll() waiting for a reconnection ends

    def _send_the_rest(self, timeout: float) -> None:
        """Send what is batched and what waits, for up to *timeout* s (without the lock)."""
        with self._io:
            self._write_pending()
        self._drain(0, timeout)

    def _drop_unsent(self, doing: str) -> None:
        """Drop what the broker did not read in time, with a WARNING (lock held).

        Publishes batched meanwhile go too: kept, they would reach the
        next connection's broker first, whichever it is.
        """
        unsent = self._unwritten() + self._pending
        self._pending, self._pending_size = [], 0
        if unsent:
            logger.warning(
                "%s with %d messages the broker did not read in %s s: dropped",
                doing,
                len(unsent),
                self._timeout,
            )

    def __enter__(self) -> NetPubSub:
        if self._state == _OFFLINE:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._state != _OFFLINE:
            self.disconnect()

    def fileno(self) -> int:
        """A descriptor readable when ``poll()`` has work: for a selector or event loop.

        Readable when the broker sent something, or when messages already
        read (by ``flush()``, say) wait for ``poll()``. It stays the same
        across reconnections (an epoll descriptor, made at the first call).
        RuntimeError if the pub-sub is not connected.
        """
        with self._io:
            if self._state == _OFFLINE:
                raise RuntimeError("Not connected")
            if self._ready is None:
                self._ready = _Readiness()
                if self._sock is not None:
                    self._ready.watch(self._sock)
                if self._inbox:
                    self._ready.wake()
            return self._ready.fileno()

    def _dial(self) -> _Dialed:
        """Connect and authenticate (blocking: never called with the lock held on reconnect)."""
        address, authkey = self._address, self._authkey
        if self._credentials is not None:
            address, authkey = read_credentials(self._credentials)
        deadline = time.monotonic() + self._timeout  # for all of it, not each step
        sock = connect_socket(address, self._timeout)
        try:
            limits = handshake(sock, authkey, deadline)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return _Dialed(sock, limits, address, authkey)

    def _install(self, dialed: _Dialed) -> None:
        """Start using a new connection (called with the lock held)."""
        self._sock, limits, self._address, self._authkey = dialed
        if limits != self._limits or not self._limits_known:
            self._limits, self._limits_known = limits, True
            self._encoded.clear()  # checked against other limits, or none
        self._max_message = limits.max_message
        self._decoder = proto.FrameDecoder(limits.max_message)
        self._remote, self._remote_bytes = set(), 0
        self._asked.clear()  # what was asked of the last connection is not answered here
        self._answered.clear()
        self._resync = True
        self._up_since = time.monotonic()
        self._up.set()
        if self._ready is not None:
            self._ready.watch(self._sock)
        self._sync_subscriptions()
        logger.debug("connected to broker at %s", self._address)

    def _encode(self, topic: Tuple[str, ...]) -> bytes:
        """A topic's encoding; TypeError, or ValueError if over the broker's limits.

        Before the first connection, the broker's limits are not known: a
        topic over them stays local when it connects, with a WARNING.
        """
        encoded = proto.encode_topic(topic)
        if self._limits_known:
            self._limits.check_topic(encoded)
        return encoded

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # shutdown() wakes a thread waiting on the socket in select(),
            # as in poll() or wait_forever(); close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _lost(self, reason: str) -> None:
        """The connection broke under us: carry on locally and reconnect."""
        self._close()
        self._up.clear()
        if self._state == _CONNECTED:
            logger.warning("lost the broker at %s (%s); reconnecting", self._address, reason)
            self._state = _RECONNECTING
            now = time.monotonic()
            # A connection the broker cuts at once (this client goes past one
            # of its caps?) must not make a reconnection loop: back off more.
            stable = now - self._up_since >= _STABLE
            self._backoff = _BACKOFF_MIN if stable else min(self._backoff * 2, _BACKOFF_MAX)
            self._next_attempt = now + self._backoff
            self._dropped = 0
            self._refused_credentials = False
            self._start_writer()  # it reconnects, so that publish never waits for it
        frames, self._pending, self._pending_size = self._pending, [], 0
        for frame in self._unwritten() + frames:
            self._enqueue(frame)

    def _reconnect(self) -> bool:
        """One reconnection attempt if one is due; True if connected.

        Called without the lock, which it holds only to look and to install
        the new connection: whoever publishes meanwhile does not wait.
        """
        with self._io:
            if self._state is not _RECONNECTING or self._sock is not None:
                return self._sock is not None
            if self._dialing or time.monotonic() < self._next_attempt:
                return False
            self._dialing = True
        try:
            dialed = self._dial()
        except (OSError, MPubSubError, AuthenticationError, ValueError) as exc:
            # A wrong key too: a restarted broker listens before it writes
            # its new key to the credentials file, read again next time.
            self._failed_attempt(exc)
            return False
        finally:
            self._dialing = False
        with self._io:
            if self._state is not _RECONNECTING or self._sock is not None:  # meanwhile
                dialed.sock.close()
                return False
            self._state = _CONNECTED  # first: a connection lost at once is made again
            self._install(dialed)
            if self._sock is None:
                return False
            logger.warning("reconnected to the broker at %s", self._address)
            queued = self._fitting_frames(list(self._queue))
            self._queue.clear()
            self._hand_over(queued)
            return self._sock is not None

    def _fitting_frames(self, frames: List[bytes]) -> List[bytes]:
        """The queued frames the new broker accepts (a WARNING for the others)."""
        limits = self._limits
        kept = [
            f
            for f in frames
            if len(f) - 5 <= limits.max_message and not limits.topic_excess(proto.pub_topic(f))
        ]
        if len(kept) < len(frames):
            logger.warning(
                "dropped %d queued messages over the new broker's limits", len(frames) - len(kept)
            )
        return kept

    def _failed_attempt(self, exc: Exception) -> None:
        with self._io:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            self._next_attempt = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
            if isinstance(exc, CredentialsError) and not self._refused_credentials:
                self._refused_credentials = True  # once per outage: it may be an attack
                logger.warning("cannot reconnect: %s", exc)
            else:
                logger.debug("reconnection failed: %s", exc)

    # --- subscriptions -------------------------------------------------------

    def add_subscriber(self, topic: Topic, subscriber: Subscriber, *, weak: bool = True) -> None:
        """As PubSub.add_subscriber; the broker learns of new topics at once.

        TypeError if the topic cannot travel, ValueError if it is deeper or
        longer than the broker accepts, or if the broker would take no more
        subscriptions from this pub-sub (unless the topic is local).
        """
        topic = as_topic(topic)
        if _is_local(topic):
            proto.encode_topic(topic)  # TypeError for the same topics as elsewhere
        else:
            encoded = self._encoded[topic]  # now, not when it travels
            if self._limits_known and encoded not in self._remote:
                self._check_room(encoded)
        super().add_subscriber(topic, subscriber, weak=weak)
        self._sync_subscriptions()

    def remove_subscriber(self, topic: Topic, subscriber: Subscriber) -> None:
        """As PubSub.remove_subscriber; the broker learns of unused topics at once."""
        super().remove_subscriber(topic, subscriber)
        self._sync_subscriptions()

    def clear_subscribers(self) -> None:
        """As PubSub.clear_subscribers; the broker stops sending anything."""
        super().clear_subscribers()
        self._sync_subscriptions()

    def _subscriptions_changed(self, topic: Optional[Tuple[str, ...]]) -> None:
        # With PubSub's lock held. Garbage-collected subscribers change them too.
        if topic is None or len(self._changed) >= _MAX_CHANGED:
            self._resync = True
            self._changed.clear()
        elif not self._resync:
            self._changed.add(topic)
        self._subs_changed = True

    def _sync_subscriptions(self) -> None:
        """Send the broker SUB/UNSUB for what changed (all topics after a reconnection)."""
        with self._io:
            self._subs_changed = False
            if self._sock is None:
                return
            with self._lock:
                resync, self._resync = self._resync, False
                changed, self._changed = self._changed, set()
                topics = self._subscribed_topics() if resync else changed
                topics = {t for t in topics if not _is_local(t)}
                present = {t for t in topics if self._has_subscribers(t)}
            wanted = self._encodings(present)
            if resync:
                gone = self._remote - wanted - {_BROADCASTS}
            else:
                gone = self._encodings(topics - present) & self._remote
            self._remote -= gone
            self._remote_bytes -= sum(map(len, gone))
            new = self._fitting(wanted - self._remote)
            self._want_broadcasts(gone, new)
            # UNSUB first: the broker counts them against its caps in order.
            frames = [proto.frame(proto.UNSUB, t) for t in gone]
            frames += [proto.frame(proto.SUB, t) for t in new]
            if frames:
                self._write(b"".join(frames))

    def _want_broadcasts(self, gone: Set[bytes], new: Set[bytes]) -> None:
        """Subscribe to _BROADCASTS while only *local topics have subscribers here.

        The broker sends a broadcast only to clients subscribed to something;
        without a topic to travel, this pub-sub's local subscribers would miss
        broadcasts. Nothing is published to _BROADCASTS itself (a topic
        ending in '*local' never leaves its pub-sub), so it brings broadcasts
        only. *gone* and *new* get the UNSUB or SUB it takes.
        """
        # With no topic that travels subscribed, any subscriber is a local one.
        others = len(self._remote) - (_BROADCASTS in self._remote)
        wanted = not others and self._has_any_subscribers()
        if wanted and _BROADCASTS not in self._remote:
            self._remote.add(_BROADCASTS)
            self._remote_bytes += len(_BROADCASTS)
            new.add(_BROADCASTS)
        elif not wanted and _BROADCASTS in self._remote:
            self._remote.discard(_BROADCASTS)
            self._remote_bytes -= len(_BROADCASTS)
            gone.add(_BROADCASTS)

    def _check_room(self, encoded: bytes) -> None:
        """ValueError unless the broker takes one more subscription, to *encoded*."""
        limits = self._limits
        if len(self._remote) >= limits.max_subscriptions:
            raise ValueError(
                f"more than {limits.max_subscriptions} topics subscribed to: "
                "the broker's limit (max_subscriptions)"
            )
        if self._remote_bytes + len(encoded) > limits.max_subscription_bytes:
            raise ValueError(
                f"topics subscribed to over {limits.max_subscription_bytes} bytes: "
                "the broker's limit (max_subscription_bytes)"
            )

    def _fitting(self, topics: Set[bytes]) -> Set[bytes]:
        """As many of *topics* as the broker takes beside _remote (a WARNING for the rest)."""
        kept: Set[bytes] = set()
        for encoded in topics:
            try:
                self._check_room(encoded)
            except ValueError as exc:
                logger.warning(
                    "%d topics not subscribed to at the broker: %s", len(topics) - len(kept), exc
                )
                return kept
            kept.add(encoded)
            self._remote.add(encoded)
            self._remote_bytes += len(encoded)
        return kept

    def _encodings(self, topics: Set[Tuple[str, ...]]) -> Set[bytes]:
        """The encodings of *topics*, without those over the broker's limits."""
        encodings = set()
        for topic in topics:
            try:
                encodings.add(self._encoded[topic])
            except ValueError as exc:  # a new broker's lower limits: it stays local
                logger.warning("not subscribing to %r at the broker: %s", topic, exc)
        return encodings

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
        if self._state is not _OFFLINE and not _is_local(topic):
            encoded = self._encoded[topic]
            payload = pickle.dumps(message, protocol=5)
            size = 4 + len(encoded) + len(payload)  # checked before framing copies it
            if size > self._max_message:
                raise ValueError(
                    f"message of {size} bytes exceeds the broker's limit of "
                    f"{self._max_message} bytes"
                )
            if len(payload) >= _LARGE:
                wait = self._send(proto.pub_head(encoded, len(payload)), payload)
            else:
                wait = self._send(proto.pub_frame(encoded, payload))
            if wait is not None and not self._drain(wait, self._publish_timeout):
                raise TimeoutError(
                    f"the broker did not read the message in {self._publish_timeout} s"
                )
        PubSub.publish(self, topic, **message)

    def _send(self, *parts: bytes) -> Optional[int]:
        """Send one frame: whole, or as head and payload (a large one, never copied whole).

        What the publisher must then wait for, without the lock, while the
        broker reads (backpressure): None, or the bytes that may still wait.
        """
        with self._io:
            sock = self._sock
            if sock is None:
                self._enqueue(b"".join(parts))  # the writer thread reconnects
                return None
            if len(parts) > 1:  # large: after what was batched, gathered by one sendmsg
                self._write_pending()
                self._queue_out((parts, None, len(parts[0]) + len(parts[1])), writer=False)
                return 0 if self._out else None  # its publisher sends it, as a lone one
            (frame,) = parts
            now = time.monotonic()
            burst = now - self._last_send < _BURST_WINDOW
            self._last_send = now
            if burst or self._pending or self._out:
                return self._batch(frame)
            try:
                sent = sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                self._enqueue(frame)
                return None
            if sent != len(frame):
                self._queue_out(((frame,), (frame,), len(frame)), sent)
            return None

    def _batch(self, frame: bytes) -> Optional[int]:
        self._pending.append(frame)
        self._pending_size += len(frame)
        if self._pending_size >= _BATCH_LIMIT:
            self._write_pending()
        elif self._writer is None or not self._kick.is_set():
            # No writer: disconnect() may have set the kick for one that was
            # never started, or has ended since.
            self._start_writer()
        # However slowly it publishes, a publisher waits while the broker has
        # not taken what it sent: the writer hands a batch over each second.
        return _BATCH_LIMIT if self._out_size > _BATCH_LIMIT else None

    def _start_writer(self) -> None:
        """Wake the writer thread, starting it if needed (called with the lock held)."""
        self._kick.set()
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(
                target=_writer_main,
                args=(weakref.ref(self), self._kick),
                name="mpubsub-writer",
                daemon=True,
            )
            self._writer.start()

    def _write_pending(self) -> None:
        """Send the batched publishes (called with the lock held)."""
        frames, self._pending, self._pending_size = self._pending, [], 0
        self._hand_over(frames)

    def _hand_over(self, frames: List[bytes]) -> None:
        """Send PUB *frames* after everything before them (with the lock held)."""
        if frames:
            data = b"".join(frames)
            self._queue_out(((data,), frames, len(data)))

    def _write(self, *parts: bytes) -> None:
        """Send *parts*, frames other than PUB, after everything before them (lock held)."""
        self._queue_out((parts, (), sum(map(len, parts))))

    def _queue_out(self, chunk: _Chunk, sent: int = 0, writer: bool = True) -> None:
        """Send *chunk* after what waits; the writer thread sends what the socket does not take.

        *sent*: bytes of it already sent (only when nothing else waited).
        Not *writer*: the caller waits for it to go itself.
        """
        self._out.append(chunk)
        self._out_offset += sent
        self._out_size += chunk[2] - sent
        if not self._push() and self._sock is not None and writer:
            self._start_writer()

    def _push(self) -> bool:
        """Send what the socket takes of _out, without waiting; True once all of it went."""
        out = self._out
        while out:
            sock = self._sock
            if sock is None:
                return False
            parts, _, size = out[0]
            offset = self._out_offset
            views = [memoryview(part) for part in parts]
            while offset >= len(views[0]):
                offset -= len(views.pop(0))
            views[0] = views[0][offset:]
            try:
                sent = sock.sendmsg(views) if len(views) > 1 else sock.send(views[0])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                return False
            self._out_size -= sent
            self._out_offset += sent
            if self._out_offset < size:
                return False  # the socket is full
            out.popleft()
            self._out_offset = 0
        return True

    def _unwritten(self) -> List[bytes]:
        """Take the PUB frames of _out that were not wholly sent, emptying it.

        A frame sent whole may have been routed already: sending it again
        after a reconnection would deliver it twice (at most once, in order).
        """
        frames: List[bytes] = []
        offset = self._out_offset
        for parts, pubs, size in self._out:
            if pubs is None:  # one large frame, in parts
                if offset < size:
                    frames.append(b"".join(parts))
            else:
                end = 0
                for frame in pubs:
                    end += len(frame)
                    if end > offset:
                        frames.append(frame)
            offset = 0
        self._out.clear()
        self._out_offset = self._out_size = 0
        return frames

    def _drain(self, more_than: int, timeout: Optional[float]) -> bool:
        """Wait, without the lock, while more than *more_than* bytes wait for the broker.

        Up to *timeout* seconds (None: until they go or the connection does),
        reading what the broker sends meanwhile (it may wait for us to).
        False if the time ran out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._io:
                self._push()
                sock = self._sock
                if sock is None or self._out_size <= more_than:
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            # Wait to write even if another thread sends it all meanwhile:
            # the socket is writable then, and the next round sees it.
            self._await(sock, remaining, writing=True)

    def _await(self, sock: socket.socket, timeout: Optional[float], writing: bool) -> None:
        """Wait, without the lock, for *sock* to bring bytes (or take some); read and send."""
        with self._io:
            # Read meanwhile, unless poll() has fallen too far behind.
            reading = self._inbox_size < _MAX_INBOX
        readable, writable = _wait(sock, reading, writing, timeout)
        with self._io:
            if self._sock is sock:
                if writable:
                    self._push()
                if readable:
                    self._read_available()

    def _enqueue(self, frame: bytes) -> None:
        if self._state != _RECONNECTING:
            return
        if len(self._queue) == self._queue.maxlen:
            if not self._dropped:
                logger.warning(
                    "broker unreachable: %d messages queued, dropping the oldest", len(self._queue)
                )
            self._dropped += 1
        self._queue.append(frame)

    def flush(self) -> bool:
        """Push what waits for the broker and wait until the broker has handled it.

        Once this returns True, the broker has every subscription change and
        every message published before the call. False if the broker is out
        of reach (messages stay queued); TimeoutError if it does not answer.
        """
        return self._ask(proto.PONG, _PING) is not None

    def broker_statistics(self) -> Optional[Dict[str, Any]]:
        """The broker's figures (see ``BrokerStatistics``), or None if it is out of reach."""
        reply = self._ask(proto.STATS_REPLY, _STATS)
        return None if reply is None else proto.stats_figures(reply)

    def _ask(self, kind: int, request: bytes) -> Optional[bytes]:
        """Send *request* after everything pending; wait for the broker's reply of *kind*.

        While reconnecting, the writer tries at once, and this waits for it up
        to the timeout: None if the broker is still out of reach.
        """
        deadline = time.monotonic() + self._timeout  # for the reconnection and the reply
        with self._io:
            reconnecting = self._state is _RECONNECTING and self._sock is None
            if reconnecting:
                self._next_attempt = 0.0
                self._start_writer()
        if reconnecting:
            self._up.wait(self._timeout)
        with self._io:
            self._sync_subscriptions()
            sock = self._sock
            if sock is None:
                return None
            self._write_pending()
            self._asked[kind] += 1
            mine = self._asked[kind]
            self._write(request)
        while True:
            with self._io:
                if self._sock is not sock:
                    return None  # lost: what it answered was lost too
                if self._answered[kind] >= mine:
                    return self._replies[kind]
                if self._inbox_size >= _MAX_INBOX:
                    raise TimeoutError(
                        "the broker's answer is behind more messages than poll() has taken "
                        f"({_MAX_INBOX} bytes): poll() first"
                    )
                writing = bool(self._out)  # the request itself, maybe
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the broker did not answer in time")
            self._await(sock, remaining, writing)

    # --- receiving -----------------------------------------------------------

    def poll(self, timeout: Optional[float] = 0) -> bool:
        """Deliver the messages that arrived from the broker; True if there were any.

        Waits up to *timeout* seconds (None: until something arrives) for the
        first one, never longer, even while the broker is away (a background
        thread reconnects meanwhile). RuntimeError if the pub-sub is not
        connected at all.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            frames, sock = self._receive(read=waited)
            if frames:
                self._dispatch(frames)
                return True
            if waited and deadline is not None and time.monotonic() >= deadline:
                return False
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if sock is None:
                self._up.wait(remaining)
            else:
                _wait(sock, True, False, remaining)  # closed meanwhile? Reading next tells
            waited = True

    def _receive(self, read: bool) -> Tuple[List[bytes], Optional[socket.socket]]:
        """Sync if needed, read if asked; what waits to be delivered."""
        with self._io:
            if self._state == _OFFLINE:
                raise RuntimeError("Not connected")
            if self._sock is not None and self._subs_changed:
                self._sync_subscriptions()
            if read and self._sock is not None:
                self._read_available()
            frames = list(self._inbox)
            self._inbox.clear()
            self._inbox_size = 0
            if self._ready is not None:
                self._ready.settle()
            return frames, self._sock

    def wait_forever(self) -> None:
        """Deliver messages from the broker until ``disconnect()`` is called.

        By a subscriber, or by another thread: it returns at once then.

        RuntimeError if the pub-sub is not connected to begin with.
        """
        self.poll(0)
        while self._state != _OFFLINE:
            try:
                self.poll(None)
            except RuntimeError:
                if self._state != _OFFLINE:
                    raise  # not ours: from a subscriber's error handler

    def _read_available(self) -> None:
        """Read what the broker sent, up to 1 MiB, and not past _MAX_INBOX undelivered."""
        sock = self._sock
        for _ in range(16):
            if sock is None or self._inbox_size >= _MAX_INBOX:
                return
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                return
            if not data:
                self._lost("connection closed by the broker")
                return
            try:
                self._take(self._decoder.feed(data))
            except ProtocolError as exc:
                self._lost(f"protocol error: {exc}")
                return
            if len(data) < _RECV_SIZE:
                return

    def _take(self, frames: List[Tuple[int, bytes]]) -> None:
        """Keep the frames just read: messages for poll(), answers for their requests."""
        if self._ready is not None and not self._inbox and frames:
            self._ready.wake()  # poll() has work, whatever the socket says
        for kind, frame in frames:
            if kind == proto.PUB:
                self._inbox.append(frame)
                self._inbox_size += len(frame)
            elif kind in (proto.PONG, proto.STATS_REPLY):
                if self._answered[kind] >= self._asked[kind]:
                    raise ProtocolError("an answer to nothing asked")
                self._replies[kind] = frame
                self._answered[kind] += 1
            elif kind == proto.ERROR:
                logger.error("broker error: %s", proto.reason_of(frame))

    def _dispatch(self, frames: List[bytes]) -> None:
        for frame in frames:
            try:
                encoded, payload = proto.pub_parts(frame)
                topic = self._decoded[encoded]
                message = self._loads(payload)
            except Exception as exc:  # one bad message must not stop the others
                logger.error("dropping a message that cannot be decoded: %s", printable(str(exc)))
                continue
            try:
                PubSub.publish(self, topic, **message)
            except TypeError as exc:
                if exc.__traceback__ is None or exc.__traceback__.tb_next is not None:
                    raise  # from inside publish: a subscriber's, re-raised by on_error
                # Raised by the call itself: the payload is not a mapping of strings.
                logger.error("dropping a message that is not a mapping of strings: %r", topic)


def _writer_main(ref: weakref.ReferenceType[NetPubSub], kick: threading.Event) -> None:
    """Send what a pub-sub batched and reconnect it, until it disconnects or is collected."""
    pause = 0.0
    while True:
        kick.wait(pause)
        pubsub = ref()
        if pubsub is None:
            return
        with pubsub._io:
            kick.clear()
            pubsub._write_pending()
            if pubsub._state is _OFFLINE:
                pubsub._writer = None
                return
        if pubsub._state is _RECONNECTING:
            pubsub._reconnect()
        # What the socket did not take: sent as the broker reads, the
        # pub-sub looked at again each second (it may have been collected).
        pubsub._drain(0, 1.0)
        pause = 0.0 if pubsub._out_size else 1.0
        if pubsub._state is _RECONNECTING:
            pause = min(pause, max(0.0, pubsub._next_attempt - time.monotonic()) + 0.001)
        del pubsub


class _Readiness:
    """An epoll descriptor readable while the connection is, or while woken."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r, select.EPOLLIN)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def watch(self, sock: socket.socket) -> None:
        """Be readable when *sock* is (a closed socket leaves the set by itself)."""
        try:
            self._epoll.register(sock, select.EPOLLIN)
        except FileExistsError:  # its descriptor number was another socket's
            self._epoll.modify(sock, select.EPOLLIN)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"!")

    def settle(self) -> None:
        """No more readable for want of poll(): drain the wake-ups."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def __del__(self) -> None:
        for closing in (self._epoll, self._wake_r, self._wake_w):
            closing.close()


def _wait(
    sock: socket.socket, reading: bool, writing: bool, timeout: Optional[float]
) -> Tuple[bool, bool]:
    """Wait up to *timeout* s (None: no limit) for *sock* to be readable or writable, as asked.

    poll(2), not select(2), which cannot watch a descriptor over 1023. A
    socket closed or broken meanwhile counts as both: the caller finds out.
    """
    events = (select.POLLIN if reading else 0) | (select.POLLOUT if writing else 0)
    poller = select.poll()
    try:
        poller.register(sock, events)
        ready = poller.poll(None if timeout is None else math.ceil(timeout * 1000))
    except (OSError, ValueError):
        return True, True
    revents = ready[0][1] if ready else 0
    broken = revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
    return bool(revents & select.POLLIN or broken), bool(revents & select.POLLOUT or broken)


def _is_local(topic: Tuple[str, ...]) -> bool:
    return bool(topic) and topic[-1] == LOCAL_SUFFIX


def _weigh(key: Union[bytes, Tuple[str, ...]], value: Union[bytes, Tuple[str, ...]]) -> int:
    """What a memo entry of a topic and its encoding holds, roughly, in bytes."""
    encoded = value if isinstance(value, bytes) else key
    return 2 * len(encoded) + 200


# Bytes for the broker: (parts, the PUB frames they make, size). The frames
# are () for other frames, None for a large PUB frame in parts.
_Chunk = Tuple[Tuple[bytes, ...], Optional[typing.Sequence[bytes]], int]


class _Dialed(NamedTuple):
    """A connection just made, not yet in use."""

    sock: socket.socket
    limits: proto.Limits
    address: Any
    authkey: bytes


# Publishes still batched when the interpreter exits are sent first.
_LIVE: weakref.WeakSet[NetPubSub] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Send what this process's pub-subs hold, all within the longest timeout."""
    pid = os.getpid()  # a forked child's copies of its parent's are not its own
    live = [p for p in list(_LIVE) if p._pid == pid and p._state is not _OFFLINE]
    deadline = time.monotonic() + max((p._timeout for p in live), default=0.0)
    for pubsub in live:
        pubsub._send_the_rest(max(0.0, deadline - time.monotonic()))  # may not read
        with pubsub._io:
            if pubsub._sock is not None:
                pubsub._drop_unsent("exiting")


_EXIT_HOOKED = {"pid": 0}


def _flush_at_exit_of_this_process() -> None:
    """Also flush at multiprocessing's exit: a forked child's ends in os._exit(), past atexit."""
    if _EXIT_HOOKED["pid"] != os.getpid():
        _EXIT_HOOKED["pid"] = os.getpid()
        multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=0)
