"""Tests for mpubsub._connect: the blocking and the asyncio drivers of the client handshake."""

from __future__ import annotations

import asyncio
import hmac
import socket
import struct
import threading
import time
from pathlib import Path
from typing import List

import pytest

from mpubsub import AuthenticationError
from mpubsub import _protocol as proto
from mpubsub._connect import handshake, open_stream


def impostor(sock: socket.socket, said: List[bytes]) -> None:
    """A broker without the key: it lets the client's answer pass, then answers the
    client's challenge wrongly; *said* gets what the client says to that."""
    with sock:
        framed, _ = proto.new_challenge()
        sock.sendall(framed)
        _read_mp(sock)  # the client's answer: not even checked
        sock.sendall(proto.mp_frame(proto.WELCOME_MSG))
        _read_mp(sock)  # the client's challenge
        wrong = b"{sha256}" + hmac.new(b"guess", b"x", "sha256").digest()
        sock.sendall(proto.mp_frame(wrong))
        said.append(_read_mp(sock))


def _read_mp(sock: socket.socket) -> bytes:
    (size,) = proto.MP_LEN.unpack(sock.recv(4, socket.MSG_WAITALL))
    return sock.recv(size, socket.MSG_WAITALL)


def test_the_blocking_client_tells_a_broker_without_the_key_failure() -> None:
    """handshake() refuses a broker that cannot answer its challenge, and says FAILURE."""
    ours, theirs = socket.socketpair()
    said: List[bytes] = []
    peer = threading.Thread(target=impostor, args=(theirs, said))
    peer.start()
    with ours, pytest.raises(AuthenticationError):
        handshake(ours, b"key", time.monotonic() + 10)
    peer.join(10)
    assert said == [proto.FAILURE_MSG]


def test_the_asyncio_client_tells_a_broker_without_the_key_failure(tmp_path: Path) -> None:
    """open_stream() refuses such a broker the same way, FAILURE included."""
    path = str(tmp_path / "impostor.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    said: List[bytes] = []

    def serve() -> None:
        with listener:
            impostor(listener.accept()[0], said)

    peer = threading.Thread(target=serve)
    peer.start()
    with pytest.raises(AuthenticationError):
        asyncio.run(open_stream(path, b"key", 10))
    peer.join(10)
    assert said == [proto.FAILURE_MSG]


def test_without_a_deadline_the_sockets_timeout_bounds_the_whole_handshake() -> None:
    """handshake() with no deadline takes the socket's receive timeout, sub-second ones
    too, for all of it: a peer trickling a byte every 0.2 s cannot stretch it."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 500_000))
    stop = threading.Event()

    def trickle() -> None:
        framed, _ = proto.new_challenge()
        for byte in framed:
            if stop.wait(0.2):
                return
            theirs.send(bytes([byte]))

    peer = threading.Thread(target=trickle)
    peer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"^the broker did not complete the handshake"):
            handshake(ours, b"key")
        assert time.monotonic() - started < 5  # not 4 + 60 bytes x 0.2 s
    finally:
        stop.set()
        peer.join(10)
        ours.close()
        theirs.close()
