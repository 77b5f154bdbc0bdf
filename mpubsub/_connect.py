"""The client's side of a connection: connect, authenticate, say HELLO (blocking)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

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


def handshake(sock: socket.socket, authkey: bytes) -> proto.Limits:
    """Authenticate, then say HELLO; return what the broker accepts."""
    try:
        authenticate(sock, authkey)
        return _hello(sock)
    except BlockingIOError:  # SO_RCVTIMEO expired
        raise TimeoutError("the broker did not complete the handshake in time") from None


def authenticate(sock: socket.socket, authkey: bytes) -> None:
    """multiprocessing.connection's mutual challenge, as its Client does it."""
    challenge = _recv_mp(sock)
    sock.sendall(proto.answer_challenge(authkey, challenge))
    if _recv_mp(sock) != proto.WELCOME_MSG:
        raise AuthenticationError("digest sent was rejected")
    framed, message = proto.new_challenge()
    sock.sendall(framed)
    try:
        proto.verify_answer(authkey, message, _recv_mp(sock))
    except AuthenticationError:
        sock.sendall(proto.mp_frame(proto.FAILURE_MSG))
        raise
    sock.sendall(proto.mp_frame(proto.WELCOME_MSG))


def _hello(sock: socket.socket) -> proto.Limits:
    sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(proto.VERSION)))
    size, kind = proto.HEADER.unpack(_recv_exact(sock, 5))
    if size > 4096:
        raise ProtocolError("the broker's answer to HELLO is too long")
    body = _recv_exact(sock, size)
    if kind == proto.ERROR:
        raise ProtocolError(f"the broker refused: {printable(body.decode(errors='replace'))}")
    if kind != proto.WELCOME:
        raise ProtocolError("the broker did not answer HELLO")
    return proto.welcome_limits(body)


def _recv_mp(sock: socket.socket) -> bytes:
    (size,) = proto.MP_LEN.unpack(_recv_exact(sock, 4))
    if not 0 <= size <= proto.HANDSHAKE_MAX:
        raise ProtocolError("the peer does not speak multiprocessing's handshake")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    # SO_RCVTIMEO bounds each read; this bounds them all, against a peer
    # that sends one byte just before each read would time out.
    timeval = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
    seconds, micros = _TIMEVAL.unpack(timeval)
    deadline = time.monotonic() + seconds + micros / 1e6 if seconds or micros else None
    data = b""
    while len(data) < size:
        if deadline is not None and data and time.monotonic() > deadline:
            raise TimeoutError("the broker did not complete the handshake in time")
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection during the handshake")
        data += chunk
    return data


_TIMEVAL = struct.Struct("@ll")  # struct timeval
