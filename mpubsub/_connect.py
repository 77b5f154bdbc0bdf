"""The client's side of a connection: connect, authenticate, say HELLO (blocking)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Optional

from . import _protocol as proto
from ._credentials import family_of
from ._text import printable
from .errors import AuthenticationError, ProtocolError


def connect_socket(address: Any, timeout: float) -> socket.socket:
    """A blocking socket connected to *address*; *timeout* bounds connect and every read.

    The timeouts are the kernel's (SO_SNDTIMEO, SO_RCVTIMEO): a blocking
    connect then waits for room in a busy broker's backlog, up to *timeout*,
    where a Python-level timeout would fail at once on a Unix socket.
    """
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    try:
        timeval = _TIMEVAL.pack(int(timeout), int(timeout % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(address)
        except BlockingIOError:
            raise TimeoutError(f"the broker at {address} did not accept in time") from None
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def handshake(
    sock: socket.socket, authkey: bytes, deadline: Optional[float] = None
) -> proto.Limits:
    """Authenticate, then say HELLO; return what the broker accepts.

    All of it by *deadline* (time.monotonic()), or within the socket's
    receive timeout from now: a broker slow at every step cannot stretch it.
    """
    if deadline is None:
        timeval = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
        seconds, micros = _TIMEVAL.unpack(timeval)
        if seconds or micros:
            deadline = time.monotonic() + seconds + micros / 1e6
    try:
        authenticate(sock, authkey, deadline)
        return _hello(sock, deadline)
    except BlockingIOError:  # SO_RCVTIMEO expired
        raise _late() from None


def authenticate(sock: socket.socket, authkey: bytes, deadline: Optional[float] = None) -> None:
    """multiprocessing.connection's mutual challenge, as its Client does it."""
    challenge = _recv_mp(sock, deadline)
    sock.sendall(proto.answer_challenge(authkey, challenge))
    if _recv_mp(sock, deadline) != proto.WELCOME_MSG:
        raise AuthenticationError("digest sent was rejected")
    framed, message = proto.new_challenge()
    sock.sendall(framed)
    try:
        proto.verify_answer(authkey, message, _recv_mp(sock, deadline))
    except AuthenticationError:
        sock.sendall(proto.mp_frame(proto.FAILURE_MSG))
        raise
    sock.sendall(proto.mp_frame(proto.WELCOME_MSG))


def _hello(sock: socket.socket, deadline: Optional[float]) -> proto.Limits:
    sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(proto.VERSION)))
    size, kind = proto.HEADER.unpack(_recv_exact(sock, 5, deadline))
    if size > 4096:
        raise ProtocolError("the broker's answer to HELLO is too long")
    body = _recv_exact(sock, size, deadline)
    if kind == proto.ERROR:
        raise ProtocolError(f"the broker refused: {printable(body.decode(errors='replace'))}")
    if kind != proto.WELCOME:
        raise ProtocolError("the broker did not answer HELLO")
    return proto.welcome_limits(body)


def _recv_mp(sock: socket.socket, deadline: Optional[float]) -> bytes:
    (size,) = proto.MP_LEN.unpack(_recv_exact(sock, 4, deadline))
    if not 0 <= size <= proto.HANDSHAKE_MAX:
        raise ProtocolError("the peer does not speak multiprocessing's handshake")
    return _recv_exact(sock, size, deadline)


def _recv_exact(sock: socket.socket, size: int, deadline: Optional[float]) -> bytes:
    # Each read waits at most until the deadline (SO_RCVTIMEO set to what is
    # left), against a peer that sends one byte just before a read would end.
    data = b""
    while len(data) < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _late()
            timeval = _TIMEVAL.pack(int(left), max(1, int(left % 1 * 1e6)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection during the handshake")
        data += chunk
    return data


def _late() -> TimeoutError:
    return TimeoutError("the broker did not complete the handshake in time")


_TIMEVAL = struct.Struct("@ll")  # struct timeval
