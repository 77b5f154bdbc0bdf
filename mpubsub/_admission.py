"""Which connections are still authenticating, and which to close to make room (no I/O).

A connection that never authenticates must not keep anyone out: at a cap,
the oldest handshake of the peer with the most of them makes room for the
new one. A peer that keeps opening connections only ever closes its own,
and cannot keep out a quick legitimate one.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Generic, List, Optional, Protocol, TypeVar


class _Handshaking(Protocol):
    peer: str  # an IP address (TCP) or a user (Unix socket), as the kernel says
    deadline: float  # when its handshake must be done


C = TypeVar("C", bound=_Handshaking)


@dataclasses.dataclass(frozen=True)
class Eviction(Generic[C]):
    """A handshake to close to make room: which, the cap reached, and whose."""

    oldest: C
    setting: str
    count: int
    whose: str


class Handshakes(Generic[C]):
    """Connections still authenticating, oldest first: in all, and per peer."""

    def __init__(self, max_handshakes: int, max_per_peer: int) -> None:
        self._max = max_handshakes
        self._max_per_peer = max_per_peer
        self._all: Dict[C, None] = {}  # oldest first
        self._by_peer: Dict[str, Dict[C, None]] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._all)

    def set_caps(self, max_handshakes: int, max_per_peer: int) -> None:
        """New caps, for the handshakes to come (those under way stay)."""
        self._max, self._max_per_peer = max_handshakes, max_per_peer

    def __contains__(self, client: object) -> bool:
        return client in self._all

    def room_for(self, peer: str) -> Optional[Eviction[C]]:
        """Which handshake to close before *peer* may start one, if any."""
        mine = self._by_peer.get(peer, {})
        if len(mine) >= self._max_per_peer:
            return Eviction(next(iter(mine)), "max_handshakes_per_peer", len(mine), peer)
        if len(self._all) >= self._max:
            return self.busiest("max_handshakes", len(self._all))
        return None

    def busiest(self, setting: str, count: int) -> Eviction[C]:
        """The oldest handshake of the peer with the most of them (there must be one)."""
        busiest = max(self._by_peer.values(), key=len)
        return Eviction(next(iter(busiest)), setting, count, "all peers")

    def add(self, client: C) -> None:
        self._all[client] = None
        self._by_peer.setdefault(client.peer, {})[client] = None

    def discard(self, client: C) -> None:
        """*client* no longer counts as authenticating (it did, or it is gone)."""
        if client in self._all:
            del self._all[client]
            mine = self._by_peer[client.peer]
            del mine[client]
            if not mine:
                del self._by_peer[client.peer]

    def late(self, now: float) -> List[C]:
        """The handshakes whose deadline passed, oldest first."""
        late = []
        for client in self._all:  # oldest first: deadlines in order
            if client.deadline > now:
                break
            late.append(client)
        return late
