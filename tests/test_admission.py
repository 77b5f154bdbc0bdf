"""Tests for mpubsub._admission: who makes room when handshakes reach a cap (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

from mpubsub._admission import Handshakes


@dataclass(eq=False)
class Client:
    peer: str
    deadline: float = 0.0


def test_a_peer_at_its_cap_makes_room_with_its_own_oldest() -> None:
    """Past max_per_peer, the peer's own oldest goes, never another's."""
    handshakes: Handshakes[Client] = Handshakes(max_handshakes=10, max_per_peer=2)
    mine = [Client("attacker"), Client("attacker")]
    theirs = Client("honest")
    for client in (mine[0], theirs, mine[1]):
        handshakes.add(client)
    eviction = handshakes.room_for("attacker")
    assert eviction is not None
    assert (eviction.oldest, eviction.setting, eviction.count, eviction.whose) == (
        mine[0],
        "max_handshakes_per_peer",
        2,
        "attacker",
    )
    assert handshakes.room_for("honest") is None


def test_at_the_global_cap_the_busiest_peer_makes_room() -> None:
    """Past max_handshakes, the oldest of the peer with the most handshakes goes."""
    handshakes: Handshakes[Client] = Handshakes(max_handshakes=3, max_per_peer=3)
    early, busy1, busy2 = Client("early"), Client("busy"), Client("busy")
    for client in (early, busy1, busy2):
        handshakes.add(client)
    eviction = handshakes.room_for("newcomer")
    assert (
        eviction is not None and eviction.oldest is busy1 and eviction.setting == "max_handshakes"
    )
    handshakes.discard(busy1)
    handshakes.discard(busy1)  # twice: nothing more happens
    assert len(handshakes) == 2 and busy1 not in handshakes
    assert handshakes.room_for("newcomer") is None


def test_late_handshakes_are_the_oldest_past_their_deadline() -> None:
    """late(now) lists those whose deadline passed, oldest first, and stops at the first not."""
    handshakes: Handshakes[Client] = Handshakes(10, 10)
    clients = [Client("p", deadline=d) for d in (1.0, 2.0, 3.0)]
    for client in clients:
        handshakes.add(client)
    assert handshakes.late(2.5) == clients[:2]
    assert handshakes.late(0.5) == []
