"""Tests for mpubsub._session: one connection's state inside the broker."""

from __future__ import annotations

import socket

from mpubsub import _protocol as proto

from .conftest import session_on


def test_shed_drops_newest_messages_only() -> None:
    """shed() drops whole PUB frames from the newest back to a control frame, one pop each."""
    left, right = socket.socketpair()
    with left, right:
        session = session_on(left)
        partial = proto.pub_frame(b"a\xff", b"x" * 100)[30:]  # what a short send left
        frames = [partial] + [proto.pub_frame(b"a\xff", b"%d" % i * 50) for i in range(6)]
        frames.insert(3, proto.frame(proto.SUB, b"t\xff"))
        session.out.extend(frames)
        session.out_size = sum(map(len, frames))
        assert session.shed(0) == 4
        assert list(session.out) == frames[:4]
        assert session.out_size == sum(map(len, frames[:4]))
        session.out.remove(frames[3])
        session.out_size -= len(frames[3])
        assert session.shed(0) == 2
        assert list(session.out) == [partial]
        assert session.out_size == len(partial)
        whole = [proto.pub_frame(b"a\xff", b"w"), proto.pub_frame(b"a\xff", b"x")]
        session.out.clear()
        session.out.extend(whole)
        session.out_size = sum(map(len, whole))
        assert session.shed(0) == 1  # the first frame may be partly sent: it stays
        assert list(session.out) == whole[:1]
