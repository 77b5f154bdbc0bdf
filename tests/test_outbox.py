"""Tests for mpubsub._outbox: what waits for the broker, and what was not sent whole."""

from __future__ import annotations

import socket

from mpubsub._outbox import Outbox


def test_unwritten_frames_are_those_not_sent_whole() -> None:
    """After a break: the frames of what waited that were not wholly sent, in order."""
    outbox = Outbox()
    a, b, c, d = b"a" * 10, b"b" * 10, b"c" * 3, b"d" * 3
    outbox.add(((a + b,), [a, b], 20), sent=10)  # a went whole, exactly: b did not
    outbox.add(((c + d,), [c, d], 6))
    outbox.add(((b"x",), (), 1))  # not a PUB frame: not sent again
    assert outbox.size == 17
    assert outbox.unwritten() == [b, c, d]
    assert not outbox and outbox.size == 0


def test_push_sends_in_order_what_the_socket_takes_and_keeps_the_rest() -> None:
    """A full socket keeps the rest, from the byte it stopped at; a large frame in parts
    counts as one, unsent until its last byte goes."""
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        head, payload = b"H" * 9, b"p" * 500_000
        outbox = Outbox()
        outbox.add(((b"first",), [b"first"], 5))
        outbox.add(((head, payload), None, len(head) + len(payload)))
        assert outbox.push(left) is False  # the socket is full
        assert 0 < outbox.size < len(head) + len(payload)
        received = right.recv(5, socket.MSG_WAITALL)
        assert received == b"first"
        assert outbox.unwritten() == [head + payload]


def test_batch_until_taken() -> None:
    """Batched publishes wait apart from the chunks until taken, in order."""
    outbox = Outbox()
    assert outbox.batch(b"one") == 3
    assert outbox.batch(b"two!") == 7
    assert not outbox  # nothing handed over yet
    assert outbox.take_batch() == [b"one", b"two!"]
    assert outbox.batched == [] and outbox.batched_size == 0
