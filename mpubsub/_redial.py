"""While a client's broker is away: when to try again, and what to keep for it (no I/O).

Attempts back off from 50 ms to 5 s, with jitter, so that the clients of a
restarted broker do not all come back at once; a connection the broker
cut at once (a client past one of its caps?) backs off more instead of
making a reconnection loop. Up to *max_queued* published messages wait;
past that the oldest go, with one WARNING per outage. The link's lock
guards all of it.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import Deque, List

from . import _protocol as proto
from .errors import CredentialsError

logger = logging.getLogger("mpubsub.net")

_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0
# A connection that lasted less than this was cut, not lost: back off more.
_STABLE = 1.0


class Redial:
    """The backoff between attempts, and the messages queued meanwhile."""

    def __init__(self, max_queued: int) -> None:
        self._queue: Deque[bytes] = collections.deque(maxlen=max_queued)
        self._dropped = 0  # of the oldest, in this outage
        self.backoff = _BACKOFF_MIN
        self._next_attempt = 0.0
        self.dialing = False  # an attempt is under way (outside the lock)
        self._up_since = 0.0
        self._refused_credentials = False  # warned of it in this outage

    def connected(self) -> None:
        self._up_since = time.monotonic()

    def lost(self) -> None:
        """The connection broke: the first attempt is due after the backoff."""
        now = time.monotonic()
        stable = now - self._up_since >= _STABLE
        self.backoff = _BACKOFF_MIN if stable else min(self.backoff * 2, _BACKOFF_MAX)
        self._next_attempt = now + self.backoff
        self._dropped = 0
        self._refused_credentials = False

    def due(self) -> bool:
        """True if an attempt may start now."""
        return not self.dialing and time.monotonic() >= self._next_attempt

    def wait(self) -> float:
        """Seconds until the next attempt is due."""
        return max(0.0, self._next_attempt - time.monotonic())

    def hurry(self) -> None:
        """Someone waits for the broker (flush): try at once, whatever the backoff says."""
        self._next_attempt = 0.0

    def failed(self, exc: Exception) -> None:
        """An attempt failed with *exc*: back off more."""
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX)
        self._next_attempt = time.monotonic() + self.backoff * random.uniform(0.5, 1.0)
        if isinstance(exc, CredentialsError) and not self._refused_credentials:
            self._refused_credentials = True  # once per outage: it may be an attack
            logger.warning("cannot reconnect: %s", exc)
        else:
            logger.debug("reconnection failed: %s", exc)

    def keep(self, frame: bytes) -> None:
        """Keep a PUB frame for the broker, dropping the oldest past max_queued."""
        if len(self._queue) == self._queue.maxlen:
            if not self._dropped:
                logger.warning(
                    "broker unreachable: %d messages queued, dropping the oldest", len(self._queue)
                )
            self._dropped += 1
        self._queue.append(frame)

    def take(self, limits: proto.Limits) -> List[bytes]:
        """The queued frames a new broker with *limits* accepts (a WARNING for the others)."""
        frames = list(self._queue)
        self._queue.clear()
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

    def drop_all(self) -> None:
        """Disconnected for good: what waits is dropped, with a WARNING."""
        if self._queue:
            logger.warning(
                "disconnected with %d messages still waiting for the broker: dropped",
                len(self._queue),
            )
        self._queue.clear()
