"""One client connection inside the broker, and its authentication handshake.

The handshake is multiprocessing.connection's, run as a state machine fed
whatever bytes arrive, so the broker's single loop never waits for a peer:
ANSWER (our challenge's answer), PEER_CHALLENGE (theirs, which we answer),
PEER_VERDICT (their WELCOME), HELLO (the first protocol frame), ACTIVE.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
from typing import Deque, List, Optional, Set, Tuple, Union

from . import _protocol as proto
from .errors import AuthenticationError, ProtocolError

ANSWER, PEER_CHALLENGE, PEER_VERDICT, HELLO, ACTIVE = range(5)

# What a queued frame costs beyond its bytes: the bytes object and its slot.
FRAME_COST = 64


class Session:
    """One connection, from its first byte to its close."""

    def __init__(self, sock: socket.socket, number: int, deadline: float, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer  # who connected: see _sockets.peer_of
        self.name = f"client {number} ({_peer_name(sock)})"
        self.state = ANSWER
        self.deadline = deadline
        self.challenge = b""
        self.handshake = bytearray()
        self.decoder: Optional[proto.FrameDecoder] = None
        # Frames to send; the first may be what is left of one (a memoryview).
        self.out: Deque[Union[bytes, memoryview]] = collections.deque()
        self.out_size = 0
        self.writing = False
        self.subs: Set[bytes] = set()
        self.sub_bytes = 0  # the encoded topics of subs, summed
        self.unfinished = 0  # bytes received and not yet part of a whole frame
        self.unfinished_since = 0.0  # when the frame in progress began to arrive
        self.backlog: List[Tuple[int, bytes]] = []  # frames read, to handle in later rounds

    def feed_handshake(self, data: bytes, authkey: bytes, max_message: int) -> bytes:
        """Advance the handshake with *data*; return what follows it (protocol frames).

        Raises ProtocolError or AuthenticationError, or OSError if a reply
        cannot be sent (the peer is gone).
        """
        buf = self.handshake
        buf += data
        while self.state < HELLO and len(buf) >= 4:
            (size,) = proto.MP_LEN.unpack_from(buf)
            if not 0 <= size <= proto.HANDSHAKE_MAX:
                raise ProtocolError(f"handshake message of {size} bytes")
            if len(buf) < 4 + size:
                return b""
            message = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            self._step(message, authkey)
        if self.state == HELLO:
            data, self.handshake = bytes(buf), bytearray()
            self.decoder = proto.FrameDecoder(max_message)
            return data
        return b""

    def _step(self, message: bytes, authkey: bytes) -> None:
        if self.state == ANSWER:
            try:
                proto.verify_answer(authkey, self.challenge, message)
            except AuthenticationError:
                with contextlib.suppress(OSError):  # the peer may not wait for it
                    self.send_now(proto.mp_frame(proto.FAILURE_MSG))
                raise
            self.send_now(proto.mp_frame(proto.WELCOME_MSG))
            self.state = PEER_CHALLENGE
        elif self.state == PEER_CHALLENGE:
            self.send_now(proto.answer_challenge(authkey, message))
            self.state = PEER_VERDICT
        elif message == proto.WELCOME_MSG:
            self.state = HELLO
        else:
            raise AuthenticationError("the client refused the broker's key")

    @property
    def held(self) -> int:
        """What the queue of unsent frames holds, in bytes, with each frame's own cost."""
        return self.out_size + FRAME_COST * len(self.out)

    def shed(self, limit: int) -> int:
        """Drop the newest queued messages until at most *limit* bytes wait; how many went.

        Only whole PUB frames go, from the newest back to the first frame of
        another kind (a reply, SUB, UNSUB...) or to the first element, which
        may be partly sent: each costs one pop, and nothing is rescanned.
        """
        out, dropped = self.out, 0
        while self.held > limit and len(out) > 1 and out[-1][4] == proto.PUB:
            self.out_size -= len(out.pop())
            dropped += 1
        return dropped

    def send_now(self, data: bytes) -> None:
        """Send a small reply at once (handshake, WELCOME)."""
        # The peer is waiting for it, so its socket buffer is empty: a short
        # send means a broken peer.
        if self.sock.send(data) != len(data):
            raise ProtocolError("peer does not read the handshake")


def _peer_name(sock: socket.socket) -> str:
    try:
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return f"pid {struct.unpack('3i', creds)[0]}"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "gone"
