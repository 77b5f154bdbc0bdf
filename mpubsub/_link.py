"""A client's link to its broker: open, lost, reconnected; what goes out, what comes in.

``Link`` holds the connection's whole lifecycle, in one ``State``:
OFFLINE (never connected, or ``disconnect()`` was called), CONNECTED, or
RECONNECTING (lost under us: the writer thread dials again, backing off).
Only the writer thread reconnects, so that nobody who publishes ever waits
for a broker to come back; a request (``_requests``) makes it try at once.

Out: a lone frame is sent at once by its caller; publishes closer together
are batched and handed to the socket by the writer thread (fewer syscalls
and wake-ups); what the socket does not take waits in the Outbox, sent as
the broker reads, and a publisher waits while too much does (backpressure).
In: what the broker sends is read whenever a caller waits (``poll``, a
request, backpressure) and kept in the Inbox.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple, Union

from . import _protocol as proto
from ._connect import Dialed, dial
from ._inbox import Inbox
from ._outbox import Chunk, Outbox
from ._redial import Redial
from ._text import reason
from .errors import AuthenticationError, MPubSubError

logger = logging.getLogger("mpubsub.net")

# Publishes closer together than this are batched and sent by a writer
# thread (fewer syscalls and wake-ups along the way); a lone publish is sent
# at once by the publishing thread, so it never waits.
BURST_WINDOW = 0.0001
# Batched bytes past which publish sends them itself (and so blocks while
# the broker does not read: backpressure).
BATCH_LIMIT = 1024 * 1024


#: What a failed reconnection attempt may raise: it is tried again, backing off.
DIAL_ERRORS = (OSError, MPubSubError, AuthenticationError, ValueError)


class State(enum.Enum):
    """Where a link stands with its broker."""

    OFFLINE = "offline"  # never connected, or disconnect() was called
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost under us; the writer thread dials again


class LinkBase:
    """What a client's link holds, threaded or asyncio: its broker, its state, its
    boxes, and what making a connection changes.

    *on_connected(limits_changed)* is called each time a connection is made
    (the pub-sub sends its subscriptions then); it is held weakly.
    """

    def __init__(
        self,
        address: Any,
        authkey: Optional[bytes],
        timeout: float,
        max_queued: int,
        on_connected: Callable[[bool], None],
    ) -> None:
        self.lock = threading.RLock()
        self.timeout = timeout  # for connect, each request, and disconnect's last sends
        self.state = State.OFFLINE
        self.sock: Optional[socket.socket] = None
        self.limits = proto.Limits()
        self.limits_known = False  # the limits are a broker's, not our defaults
        self.inbox = Inbox()
        self.outbox = Outbox()
        self.redial = Redial(max_queued)
        self._last_send = 0.0
        self._on_connected = weakref.WeakMethod(on_connected)
        self.address: Any = None
        self.authkey = b""
        self.credentials: Optional[Union[str, os.PathLike[str]]] = None
        self.set_broker(address, authkey)
        self._set_up()

    def _set_up(self) -> None:
        """What the subclass holds besides (called at the end of __init__)."""

    @property
    def offline(self) -> bool:
        """True before connect() and after disconnect()."""
        return self.state is State.OFFLINE

    def set_broker(self, address: Any, authkey: Optional[bytes]) -> None:
        if self.state is not State.OFFLINE:
            raise RuntimeError("Cannot change broker on a connected pub-sub")
        self.address = address
        self.authkey = authkey if authkey is not None else multiprocessing.current_process().authkey
        self.credentials = None

    def _adopt(self, dialed: Dialed) -> bool:
        """Take a new connection's socket and limits; True if the limits changed."""
        self.sock, limits, self.address, self.authkey = dialed
        changed = limits != self.limits or not self.limits_known
        self.limits, self.limits_known = limits, True
        self.inbox.new_connection(self.sock, limits.max_message)
        self.redial.connected()
        return changed

    def _announce(self, limits_changed: bool) -> None:
        """The connection is in use: the pub-sub may send on it."""
        on_connected = self._on_connected()
        if on_connected is not None:
            on_connected(limits_changed)
        logger.debug("connected to broker at %s", self.address)

    # --- what both send, keep and drop --------------------------------------------

    def _send_now(self, sock: socket.socket, frame: bytes) -> None:
        """Send a lone PUB *frame* itself; what the socket does not take waits."""
        try:
            sent = sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(reason(exc))
            self._keep(frame)
            return
        if sent != len(frame):
            self._queue_out(((frame,), (frame,), len(frame)), sent)

    def _hand_over(self, frames: List[bytes]) -> None:
        """Send PUB *frames* after everything before them."""
        if frames:
            data = b"".join(frames)
            self._queue_out(((data,), frames, len(data)))

    def _queue_out(self, chunk: Chunk, sent: int = 0) -> None:
        """Send *chunk* after what waits (*sent*: bytes of it gone already)."""
        raise NotImplementedError

    def _lost(self, why: str) -> None:
        """The connection broke under us: carry on locally and reconnect."""
        raise NotImplementedError

    def _keep(self, frame: bytes) -> None:
        """Keep a PUB frame for the next connection, while reconnecting."""
        if self.state is State.RECONNECTING:
            self.redial.keep(frame)

    def _keep_unsent(self) -> None:
        """Keep the PUB frames not wholly sent on a lost connection, and those batched."""
        for frame in self.outbox.unwritten() + self.outbox.take_batch():
            self._keep(frame)

    def drop_unsent(self, doing: str) -> None:
        """Drop what the broker did not read in time, with a WARNING (the threaded link: lock held).

        Publishes batched meanwhile go too: kept, they would reach the
        next connection's broker first, whichever it is.
        """
        unsent = self.outbox.unwritten() + self.outbox.take_batch()
        if unsent:
            logger.warning(
                "%s with %d messages the broker did not read in %s s: dropped",
                doing,
                len(unsent),
                self.timeout,
            )


class Link(LinkBase):
    """One client's connection to its broker, made again whenever it is lost.

    *on_connected(limits_changed)* is called, with the lock held, each time
    a connection is made (the pub-sub sends its subscriptions then); it is
    held weakly. Everything here runs under ``lock`` but the waits.
    """

    def _set_up(self) -> None:
        self.publish_timeout: Optional[float] = None  # backpressure's (the CLI sets one)
        self._kick = threading.Event()
        self._writer: Optional[threading.Thread] = None
        self._up = threading.Event()  # set while connected, or once disconnected
        self._pid = 0  # the process that connected
        _LIVE.add(self)

    # --- open and close ------------------------------------------------------------

    def connect(self) -> None:
        with self.lock:
            if self.state is not State.OFFLINE:
                raise RuntimeError("Already connected")
            dialed = dial(self.address, self.authkey, self.credentials, self.timeout)
            self.state = State.CONNECTED  # first: a connection lost at once is made again
            self._pid = os.getpid()  # the process whose exit sends what it left
            _flush_at_exit_of_this_process()
            self._install(dialed)

    def disconnect(self) -> None:
        with self.lock:
            if self.state is State.OFFLINE:
                raise RuntimeError("Not connected")
        self.send_the_rest(self.timeout)
        with self.lock:
            if self.offline:  # another thread disconnected meanwhile
                return
            self.drop_unsent("disconnected")
            self.state = State.OFFLINE
            self.redial.drop_all()
            self._close()
            self._kick.set()  # the writer thread ends
            self._up.set()  # poll() waiting for a reconnection ends

    def send_the_rest(self, timeout: float) -> None:
        """Send what is batched and what waits, for up to *timeout* s (without the lock)."""
        with self.lock:
            self.write_batch()
        self.drain(0, timeout)

    def _install(self, dialed: Dialed) -> None:
        """Start using a new connection (called with the lock held)."""
        changed = self._adopt(dialed)
        self._up.set()
        self._announce(changed)

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            # shutdown() wakes a thread waiting on the socket in poll(2),
            # as in poll() or wait_forever(); close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def wait_up(self, timeout: Optional[float]) -> None:
        """Wait up to *timeout* s for a connection (or for disconnect())."""
        self._up.wait(timeout)

    def hurry(self) -> bool:
        """If reconnecting, have the writer try at once; True if it does."""
        with self.lock:
            if self.state is not State.RECONNECTING or self.sock is not None:
                return False
            self.redial.hurry()
            self.start_writer()
            return True

    # --- lost and found -------------------------------------------------------------

    def _lost(self, why: str) -> None:
        """The connection broke under us: carry on locally and reconnect."""
        self._close()
        self._up.clear()
        if self.state is State.CONNECTED:
            logger.warning("lost the broker at %s (%s); reconnecting", self.address, why)
            self.state = State.RECONNECTING
            self.redial.lost()
            self.start_writer()  # it reconnects, so that publish never waits for it
        self._keep_unsent()

    def _reconnect(self) -> bool:
        """One reconnection attempt if one is due; True if connected.

        Called without the lock, which it holds only to look and to install
        the new connection: whoever publishes meanwhile does not wait.
        """
        with self.lock:
            if self.state is not State.RECONNECTING or self.sock is not None:
                return self.sock is not None
            if not self.redial.due():
                return False
            self.redial.dialing = True
        try:
            dialed = dial(self.address, self.authkey, self.credentials, self.timeout)
        except DIAL_ERRORS as exc:
            # A wrong key too: a restarted broker listens before it writes
            # its new key to the credentials file, read again next time.
            with self.lock:
                self.redial.failed(exc)
            return False
        finally:
            self.redial.dialing = False
        with self.lock:
            if self.state is not State.RECONNECTING or self.sock is not None:  # meanwhile
                dialed.sock.close()
                return False
            self.state = State.CONNECTED  # first: a connection lost at once is made again
            self._install(dialed)
            if self.sock is None:
                return False
            logger.warning("reconnected to the broker at %s", self.address)
            self._hand_over(self.redial.take(self.limits))
            return self.sock is not None

    # --- out ----------------------------------------------------------------------

    def send(self, *parts: bytes) -> Optional[int]:
        """Send one PUB frame: whole, or as head and payload (a large one, never copied whole).

        What the publisher must then wait for, without the lock, while the
        broker reads (backpressure): None, or the bytes that may still wait.
        """
        with self.lock:
            sock = self.sock
            if sock is None:
                self._keep(b"".join(parts))  # the writer thread reconnects
                return None
            if len(parts) > 1:  # large: after what was batched, gathered by one sendmsg
                self.write_batch()
                self._queue_out((parts, None, len(parts[0]) + len(parts[1])), writer=False)
                return 0 if self.outbox else None  # its publisher sends it, as a lone one
            (frame,) = parts
            now = time.monotonic()
            burst = now - self._last_send < BURST_WINDOW
            self._last_send = now
            if burst or self.outbox.batched or self.outbox:
                return self._batch(frame)
            self._send_now(sock, frame)
            return None

    def _batch(self, frame: bytes) -> Optional[int]:
        if self.outbox.batch(frame) >= BATCH_LIMIT:
            self.write_batch()
        elif self._writer is None or not self._kick.is_set():
            # No writer: disconnect() may have set the kick for one that was
            # never started, or has ended since.
            self.start_writer()
        # However slowly it publishes, a publisher waits while the broker has
        # not taken what it sent: the writer hands a batch over each second.
        return BATCH_LIMIT if self.outbox.size > BATCH_LIMIT else None

    def start_writer(self) -> None:
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

    def write_batch(self) -> None:
        """Send the batched publishes (called with the lock held)."""
        self._hand_over(self.outbox.take_batch())

    def write(self, *parts: bytes) -> None:
        """Send *parts*, frames other than PUB, after everything before them (lock held)."""
        self._queue_out((parts, (), sum(map(len, parts))))

    def _queue_out(self, chunk: Chunk, sent: int = 0, writer: bool = True) -> None:
        """Send *chunk* after what waits; the writer thread sends what the socket does not take.

        *sent*: bytes of it already sent (only when nothing else waited).
        Not *writer*: the caller waits for it to go itself.
        """
        self.outbox.add(chunk, sent)
        if not self._push() and self.sock is not None and writer:
            self.start_writer()

    def _push(self) -> bool:
        """Send what the socket takes of the outbox, without waiting; True once all went."""
        sock = self.sock
        if sock is None:
            return not self.outbox
        try:
            return self.outbox.push(sock)
        except OSError as exc:
            self._lost(reason(exc))
            return False

    def drain(self, more_than: int, timeout: Optional[float]) -> bool:
        """Wait, without the lock, while more than *more_than* bytes wait for the broker.

        Up to *timeout* seconds (None: until they go or the connection does),
        reading what the broker sends meanwhile (it may wait for us to).
        False if the time ran out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                self._push()
                sock = self.sock
                if sock is None or self.outbox.size <= more_than:
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            # Wait to write even if another thread sends it all meanwhile:
            # the socket is writable then, and the next round sees it.
            self.await_socket(sock, remaining, writing=True)

    def await_socket(self, sock: socket.socket, timeout: Optional[float], writing: bool) -> None:
        """Wait, without the lock, for *sock* to bring bytes (or take some); read and send."""
        with self.lock:
            reading = not self.inbox.full  # unless poll() has fallen too far behind
        readable, writable = wait(sock, reading, writing, timeout)
        with self.lock:
            if self.sock is sock:
                if writable:
                    self._push()
                if readable:
                    self.read()

    # --- requests and what comes in -----------------------------------------------------

    def read(self) -> None:
        """Read what the broker sent, up to 1 MiB, and not past a full inbox (lock held)."""
        if self.sock is not None:
            lost = self.inbox.read(self.sock)
            if lost:
                self._lost(lost)


def _writer_main(ref: weakref.ReferenceType[Link], kick: threading.Event) -> None:
    """Send what a link batched and reconnect it, until it is offline or collected."""
    pause = 0.0
    while True:
        kick.wait(pause)
        link = ref()
        if link is None:
            return
        with link.lock:
            kick.clear()
            link.write_batch()
            if link.state is State.OFFLINE:
                link._writer = None
                return
        if link.state is State.RECONNECTING:
            link._reconnect()
        # What the socket did not take: sent as the broker reads, the
        # link looked at again each second (it may have been collected).
        link.drain(0, 1.0)
        pause = 0.0 if link.outbox.size else 1.0
        if link.state is State.RECONNECTING:
            pause = min(pause, link.redial.wait() + 0.001)
        del link


def wait(
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


# Publishes still batched when the interpreter exits are sent first.
_LIVE: weakref.WeakSet[Link] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Send what this process's links hold, all within the longest timeout."""
    pid = os.getpid()  # a forked child's copies of its parent's are not its own
    live = [k for k in list(_LIVE) if k._pid == pid and k.state is not State.OFFLINE]
    deadline = time.monotonic() + max((k.timeout for k in live), default=0.0)
    for link in live:
        link.send_the_rest(max(0.0, deadline - time.monotonic()))  # may not read
        with link.lock:
            if link.sock is not None:
                link.drop_unsent("exiting")


_EXIT_HOOKED = {"pid": 0}


def _flush_at_exit_of_this_process() -> None:
    """Also flush at multiprocessing's exit: a forked child's ends in os._exit(), past atexit."""
    if _EXIT_HOOKED["pid"] != os.getpid():
        _EXIT_HOOKED["pid"] = os.getpid()
        multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=0)
