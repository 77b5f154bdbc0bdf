"""What each user holds in the broker, charged to it and capped (dbus-broker's accounting).

A client's connections, subscriptions and unsent bytes are charged to its
account: its user on the Unix socket (as the kernel says), its IP address
on TCP. A user at a cap gets its new connection or subscription refused,
or its slowest connection cut, and no other user notices.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict

from ._stats import Throttle

logger = logging.getLogger("mpubsub.broker")

DEFAULT_MAX_CONNECTIONS_PER_USER = 512
DEFAULT_MAX_SUBSCRIPTIONS_PER_USER = 1_000_000
DEFAULT_MAX_BUFFER_PER_USER = 1024 * 1024 * 1024


@dataclasses.dataclass
class Quotas:
    """The caps on one account."""

    connections: int = DEFAULT_MAX_CONNECTIONS_PER_USER
    subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_USER
    buffer: int = DEFAULT_MAX_BUFFER_PER_USER


@dataclasses.dataclass
class Account:
    """What one user (or TCP address) holds now."""

    connections: int = 0
    subscriptions: int = 0
    held: int = 0  # bytes waiting to be sent to its connections, as last charged
    #: Its refusals' log lines, at most one every 10 s (it decides how often).
    throttle: Throttle = dataclasses.field(default_factory=lambda: Throttle(logger))


class Accounts:
    """Every account with a connection, and the caps on each."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._accounts: Dict[str, Account] = {}

    def __getitem__(self, key: str) -> Account:
        account = self._accounts.get(key)
        if account is None:
            account = self._accounts[key] = Account()
        return account

    def connected(self, key: str) -> None:
        self[key].connections += 1

    def disconnected(self, key: str) -> None:
        account = self._accounts.get(key)
        if account is not None:
            account.connections -= 1
            if account.connections <= 0:
                del self._accounts[key]

    def move(self, client: Any, key: str) -> None:
        """Charge *client* (a Session without subscriptions) to the account *key* from now."""
        self[client.peer].held -= client.accounted
        client.accounted = 0
        self.disconnected(client.peer)
        client.peer = key
        self.connected(key)

    def may_connect(self, key: str) -> bool:
        account = self._accounts.get(key)
        return account is None or account.connections < self.quotas.connections
