"""What a client's broker sent, kept for whoever waits for it.

Messages wait for ``poll()``; answers (PONG, STATS_REPLY) go to the request
that asked for them. The broker answers in order, so the Nth answer of a
kind is the Nth request's, however late: a timed-out flush's PONG is not
taken for the next one's. ``fileno()`` gives a descriptor readable while
``poll()`` has work, the same across reconnections.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
from typing import Counter, Deque, Dict, List, Optional, Set, Tuple

from . import _protocol as proto
from ._text import printable, reason
from ._topics import format_topic
from .errors import ProtocolError

logger = logging.getLogger("mpubsub.net")
#: Where the broker's refusals (its policy's) are logged, once per topic.
REFUSALS_LOGGER = "mpubsub.net.refused"
_refusals = logging.getLogger(REFUSALS_LOGGER)

# Messages read and not yet delivered by poll() past which nothing more is read.
MAX_INBOX = 64 * 1024 * 1024
_RECV_SIZE = 64 * 1024
_MESSAGES = (proto.PUB, proto.SENDER)
_ANSWERS = (proto.PONG, proto.STATS_REPLY, proto.CLIENTS_REPLY)
_MAX_WARNED = 1024  # topics refused whose WARNING is not repeated (past it: none)
_MAX_REFUSALS = 1024  # refusals kept for the next flush() to raise


class Inbox:
    """Messages for poll() and answers for requests (its owner's lock guards it)."""

    def __init__(self) -> None:
        self._messages: Deque[bytes] = collections.deque()
        self.size = 0  # bytes of the messages
        self._replies: Dict[int, bytes] = {}  # the last answer of each kind
        self._asked: Counter[int] = collections.Counter()
        self._answered: Counter[int] = collections.Counter()
        self._ready: Optional[_Readiness] = None  # behind fileno(), once asked for
        self._decoder = proto.FrameDecoder(proto.DEFAULT_MAX_MESSAGE)
        #: What the broker refused since the last flush(): right, topic, reason.
        self.refusals: List[Tuple[str, Tuple[str, ...], str]] = []
        self._warned: Set[Tuple[str, Tuple[str, ...]]] = set()

    @property
    def full(self) -> bool:
        """True once poll() has fallen so far behind that nothing more is read."""
        return self.size >= MAX_INBOX

    def read(self, sock: socket.socket) -> Optional[str]:
        """Read what *sock* brings, up to 1 MiB, and not past ``full``; why the
        connection is lost, if it is (None: it is not)."""
        for _ in range(16):
            if self.full:
                break
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                return reason(exc)
            if not data:
                return "connection closed by the broker"
            try:
                self.take(self._decoder.feed(data))
            except ProtocolError as exc:
                return f"protocol error: {exc}"
            if len(data) < _RECV_SIZE:
                break
        return None

    def take(self, frames: List[proto.Frame]) -> None:
        """Keep the frames just read; ProtocolError for an answer nobody asked for."""
        if self._ready is not None and not self._messages and frames:
            self._ready.wake()  # poll() has work, whatever the socket says
        for kind, frame in frames:
            if kind in _MESSAGES:  # SENDER: who sent the next ones
                self._messages.append(frame)
                self.size += len(frame)
            elif kind == proto.DENIED:
                self._refused(frame)
            elif kind in _ANSWERS:
                if self._answered[kind] >= self._asked[kind]:
                    raise ProtocolError("an answer to nothing asked")
                self._replies[kind] = frame
                self._answered[kind] += 1
            elif kind == proto.ERROR:
                logger.error("broker error: %s", proto.reason_of(frame))

    def _refused(self, frame: bytes) -> None:
        right, topic, _ = refusal = proto.denied_parts(frame)
        if len(self.refusals) < _MAX_REFUSALS:  # what a broker that says more would cost
            self.refusals.append(refusal)
        if (right, topic) not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add((right, topic))
            _refusals.warning("the broker refused to %s", describe_refusal(refusal))

    def messages(self) -> List[bytes]:
        """The messages kept, no longer kept."""
        frames = list(self._messages)
        self._messages.clear()
        self.size = 0
        if self._ready is not None:
            self._ready.settle()
        return frames

    def ask(self, kind: int) -> int:
        """A request for an answer of *kind* is sent: the ticket to its answer."""
        self._asked[kind] += 1
        return self._asked[kind]

    def answer(self, kind: int, ticket: int) -> Optional[bytes]:
        """The answer to the request of *ticket*, or None while it has not come."""
        return self._replies[kind] if self._answered[kind] >= ticket else None

    def new_connection(self, sock: socket.socket, max_message: int) -> None:
        """What was asked of the last connection is not answered on *sock*, whose
        broker accepts messages of up to *max_message* bytes (and sends no larger)."""
        self._decoder = proto.FrameDecoder(max_message)
        self._asked.clear()
        self._answered.clear()
        if self._ready is not None:
            self._ready.watch(sock)

    def fileno(self, sock: Optional[socket.socket]) -> int:
        """The descriptor readable while poll() has work (made at the first call)."""
        if self._ready is None:
            self._ready = _Readiness()
            if sock is not None:
                self._ready.watch(sock)
            if self._messages:
                self._ready.wake()
        return self._ready.fileno()


def describe_refusal(refusal: Tuple[str, Tuple[str, ...], str]) -> str:
    """``publish on sensor/x: the policy forbids it``, from a DENIED frame's parts."""
    right, topic, why = refusal
    verb = {"subscribe": "subscribe to", "admin": "administer"}.get(right, "publish on")
    return f"{verb} {printable(format_topic(topic))}: {why}"


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
