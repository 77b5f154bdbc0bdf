"""The broker's figures: counters kept by its loop, and the snapshot it reports."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class BrokerStatistics:
    """A snapshot of a broker's figures (``Broker.statistics()``, ``mpubsub stats``)."""

    uptime: float  #: seconds since the broker started
    clients: int  #: connected, authenticated clients (mpubsubd's federation bridge aside)
    subscriptions: int  #: topics subscribed to, summed over the clients
    messages_in: int  #: messages received from publishers
    bytes_in: int  #: their size, in bytes
    messages_out: int  #: deliveries to subscribers (one message to three clients: three)
    bytes_out: int  #: their size, in bytes
    messages_per_second: float  #: messages received per second, over the last second or so
    slow_consumers: int  #: clients disconnected for falling too far behind
    refused: int  #: connections refused: bad key, handshake too slow, bad input, no descriptors
    largest_buffer: int  #: bytes waiting for the most lagging client, now
    #: mpubsubd's federation bridge: its state and counters; None without one
    federation: Optional[Dict[str, Any]] = None
    denied: int = 0  #: publishes and subscriptions the policy or a quota refused


class Counters:
    """What the loop counts beside each connection's own counters. Its messages
    and bytes are those of connections closed: ``add`` takes each one's."""

    __slots__ = (
        "_last_count",
        "_last_time",
        "bridge_dropped",
        "bytes_in",
        "bytes_out",
        "denied",
        "messages_in",
        "messages_out",
        "rate",
        "refused",
        "slow_consumers",
        "started",
    )

    def __init__(self) -> None:
        self.started = self._last_time = time.monotonic()
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0
        self.slow_consumers = self.refused = self._last_count = self.bridge_dropped = 0
        self.denied = 0
        self.rate = 0.0

    def add(self, client: Any) -> None:
        """Keep the figures of *client*, a connection closing."""
        self.messages_in += client.messages_in
        self.bytes_in += client.bytes_in
        self.messages_out += client.messages_out
        self.bytes_out += client.bytes_out

    def totals(self, clients: List[Any]) -> Tuple[int, int, int, int]:
        """Messages and bytes in, messages and bytes out, closed *clients* and these."""
        return (
            self.messages_in + sum(c.messages_in for c in clients),
            self.bytes_in + sum(c.bytes_in for c in clients),
            self.messages_out + sum(c.messages_out for c in clients),
            self.bytes_out + sum(c.bytes_out for c in clients),
        )

    def tick(self, now: float, messages_in: int) -> None:
        """Update the message rate, *messages_in* received so far (called about
        twice a second)."""
        elapsed = now - self._last_time
        if elapsed >= 1.0:
            self.rate = (messages_in - self._last_count) / elapsed
            self._last_count, self._last_time = messages_in, now


class Throttle:
    """Logs a recurring event at most once per *interval* seconds, with a count.

    Used where a peer decides how often the event happens (refused
    connections...), so that it cannot flood the log.
    """

    __slots__ = ("_interval", "_last", "_logger", "_missed")

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last = -interval
        self._missed = 0

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._missed += 1
            return
        if self._missed:
            message += f" (and {self._missed} more like it since the last report)"
        self._logger.log(level, message, *args)
        self._last, self._missed = now, 0
