"""One client connection inside the broker: its socket, its opening, its queues."""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import Callable, Deque, List, Optional, Set, Tuple, Union

from . import _protocol as proto
from ._handshake import ServerHandshake
from ._identity import Identity
from ._policy import Access, Checks
from ._stats import Throttle
from .errors import ProtocolError

logger = logging.getLogger("mpubsub.broker")

# What a queued frame costs beyond its bytes: the bytes object and its slot.
FRAME_COST = 64
# Queued frames are joined into sends of about this size.
SEND_CHUNK = 256 * 1024


class Session:
    """One connection, from its first byte to its close."""

    def __init__(
        self,
        sock: socket.socket,
        number: int,
        deadline: float,
        opening: ServerHandshake,
        *,
        identity: Identity,
        access: Access,
    ) -> None:
        self.sock = sock
        self.number = number
        self.identity = identity
        self.peer = identity.account  # whose quotas and handshakes it counts in
        self.name = f"client {number} ({identity.describe()})"
        self.since = time.time()
        self.stamp = identity.stamp()  # the SENDER frame before its messages
        self.last_stamp: Optional[bytes] = None  # the SENDER frame last queued to it
        self.stamped = False  # True once it said HELLO version 2: it gets SENDER frames
        self.publishable: Optional[Checks] = None  # see grant()
        self.subscribable: Optional[Checks] = None
        self.access = access
        self.grant(access)
        self.told: Set[Tuple[str, bytes]] = set()  # DENIED frames sent, by right and topic
        self.denied = 0  # publishes and subscriptions refused
        self.throttle = Throttle(logger)  # its refusals' log lines, at most one every 10 s
        self.relaying = ""  # the bridge's: whose messages it relays now, for log lines
        self.dropped = 0  # messages dropped for it (the bridge's, behind)
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0
        self.accounted = 0  # what of held its account was last charged
        self.opening = opening  # the handshake, until it is done
        self.deadline = deadline  # for the handshake
        self.decoder: Optional[proto.FrameDecoder] = None  # once it is done
        # Frames to send; the first may be what is left of one (a memoryview).
        self.out: Deque[Union[bytes, memoryview]] = collections.deque()
        self.out_size = 0
        self.writing = False
        self.subs: Set[bytes] = set()
        self.sub_bytes = 0  # the encoded topics of subs, summed
        self.unfinished = 0  # bytes received and not yet part of a whole frame
        self.unfinished_since = 0.0  # when the frame in progress began to arrive
        self.backlog: List[Tuple[int, bytes]] = []  # frames read, to handle in later rounds

    def grant(self, access: Access) -> None:
        """From now on, *access* says what it may do."""
        self.access = access
        self.publishable = access.checks["publish"]
        self.subscribable = access.checks["subscribe"]

    def may_receive(self, topic: bytes) -> bool:
        """True if it may have messages on the encoded *topic* (its subscribe right)."""
        return self.subscribable is None or self.subscribable[topic]

    @property
    def active(self) -> bool:
        """True once the handshake is done: the client may publish and subscribe."""
        return self.decoder is not None

    @property
    def held(self) -> int:
        """What the queue of unsent frames holds, in bytes, with each frame's own cost."""
        return self.out_size + FRAME_COST * len(self.out)

    def shed(self, limit: int) -> int:
        """Drop the newest queued messages until at most *limit* bytes wait; how many went.

        Only whole PUB frames (and the SENDER frames among them) go, from the
        newest back to the first frame of another kind (a reply, SUB,
        UNSUB...) or to the first element, which may be partly sent: each
        costs one pop, and nothing is rescanned.
        """
        out, dropped = self.out, 0
        while self.held > limit and len(out) > 1 and proto.kind_of(out[-1]) in _SHEDDABLE:
            dropped += proto.kind_of(out[-1]) == proto.PUB
            self.out_size -= len(out.pop())
        if dropped:
            self.last_stamp = None  # the next message says its sender again
            self.dropped += dropped
        return dropped

    def queue(self, frame: bytes) -> None:
        """Queue *frame* for sending (the caller marks the session dirty)."""
        self.out.append(frame)
        self.out_size += len(frame)

    def send_queued(self, more: Optional[Callable[[Session], bool]] = None) -> bool:
        """Send what the socket takes of ``out``, then what *more* queues once it is
        empty, until it returns False; True while something still waits.

        Small frames go out joined, about SEND_CHUNK at a time; what a short
        send leaves stays first in ``out``, a view of the rest, not a copy.
        OSError (but BlockingIOError) if the connection failed.
        """
        out = self.out
        while out or (more is not None and more(self)):
            if len(out) == 1 or len(out[0]) >= SEND_CHUNK:
                data = out.popleft()
            else:
                parts, size = [], 0
                # A large frame goes on its own, never copied into a join.
                while out and size < SEND_CHUNK and len(out[0]) < SEND_CHUNK:
                    parts.append(out.popleft())
                    size += len(parts[-1])
                data = b"".join(parts)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            self.out_size -= sent
            if sent < len(data):
                out.appendleft(memoryview(data)[sent:])
                break
        return bool(out)

    def send_now(self, data: bytes) -> None:
        """Send a small reply at once (the handshake's)."""
        # The peer is waiting for it, so its socket buffer is empty: a short
        # send means a broken peer.
        if self.sock.send(data) != len(data):
            raise ProtocolError("peer does not read the handshake")


_SHEDDABLE = (proto.PUB, proto.SENDER)
