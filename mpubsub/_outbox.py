"""What a client has for its broker and the socket has not taken yet, in order.

Publishes close together are batched first (``batch``), then handed over
with everything else as chunks (``add``), which ``push`` sends as far as
the socket takes them. Which PUB frames each chunk holds is kept, so that
after a lost connection ``unwritten`` gives back exactly those not wholly
sent: a frame sent whole may have been routed already, and sending it
again would deliver it twice.
"""

from __future__ import annotations

import collections
import socket
from typing import Deque, List, Optional, Sequence, Tuple

# Bytes for the broker: (parts, the PUB frames they make, size). The frames
# are () for other frames, None for a large PUB frame in parts.
Chunk = Tuple[Tuple[bytes, ...], Optional[Sequence[bytes]], int]


class Outbox:
    """Batched publishes, and the chunks the socket has not taken (not thread-safe:
    its owner's lock guards it)."""

    def __init__(self) -> None:
        self.batched: List[bytes] = []  # publishes waiting to be handed over together
        self.batched_size = 0
        self._chunks: Deque[Chunk] = collections.deque()
        self._offset = 0  # bytes of the first chunk already sent
        self.size = 0  # bytes of the chunks not sent yet

    def __bool__(self) -> bool:
        """True while chunks wait for the socket (batched publishes aside)."""
        return bool(self._chunks)

    def batch(self, frame: bytes) -> int:
        """Batch a PUB frame; the bytes batched now."""
        self.batched.append(frame)
        self.batched_size += len(frame)
        return self.batched_size

    def take_batch(self) -> List[bytes]:
        """The batched frames, no longer batched."""
        frames, self.batched, self.batched_size = self.batched, [], 0
        return frames

    def add(self, chunk: Chunk, sent: int = 0) -> None:
        """*chunk* goes after what waits; *sent* of its bytes went already (only when
        nothing waited)."""
        self._chunks.append(chunk)
        self._offset += sent
        self.size += chunk[2] - sent

    def push(self, sock: socket.socket) -> bool:
        """Send what *sock* takes without waiting; True once nothing waits.

        OSError (but BlockingIOError) if the connection failed.
        """
        chunks = self._chunks
        while chunks:
            parts, _, size = chunks[0]
            offset = self._offset
            views = [memoryview(part) for part in parts]
            while offset >= len(views[0]):
                offset -= len(views.pop(0))
            views[0] = views[0][offset:]
            try:
                sent = sock.sendmsg(views) if len(views) > 1 else sock.send(views[0])
            except (BlockingIOError, InterruptedError):
                return False
            self.size -= sent
            self._offset += sent
            if self._offset < size:
                return False  # the socket is full
            chunks.popleft()
            self._offset = 0
        return True

    def unwritten(self) -> List[bytes]:
        """Take the PUB frames not wholly sent, emptying the chunks (not the batch)."""
        frames: List[bytes] = []
        offset = self._offset
        for parts, pubs, size in self._chunks:
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
        self._chunks.clear()
        self._offset = self.size = 0
        return frames
