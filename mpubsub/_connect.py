"""The client's side of a connection: connect, then the handshake (blocking, or asyncio).

Both only move bytes: the handshake itself is ``_handshake.ClientHandshake``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from typing import Any, NamedTuple, Optional, Tuple, Union

from . import _protocol as proto
from ._credentials import family_of, read_credentials
from ._handshake import ClientHandshake
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
    sock: socket.socket,
    authkey: bytes,
    deadline: Optional[float] = None,
    version: int = proto.VERSION,
) -> proto.Limits:
    """Authenticate, then say HELLO; return what the broker accepts.

    All of it by *deadline* (time.monotonic()), or within the socket's
    receive timeout from now: a broker slow at every step cannot stretch it.
    Reads exactly what the handshake needs, never a byte past it.
    """
    if deadline is None:
        timeval = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
        seconds, micros = _TIMEVAL.unpack(timeval)
        if seconds or micros:
            deadline = time.monotonic() + seconds + micros / 1e6
    opening = ClientHandshake(authkey, version)
    try:
        while not opening.done:
            data = _recv_exact(sock, opening.needed(), deadline)
            try:
                opening.receive(data)
            except (AuthenticationError, ProtocolError):
                with contextlib.suppress(OSError):  # FAILURE, if our key refused theirs
                    sock.sendall(opening.data_to_send())
                raise
            reply = opening.data_to_send()
            if reply:
                sock.sendall(reply)
    except BlockingIOError:  # SO_RCVTIMEO expired
        raise _late() from None
    assert opening.limits is not None
    return opening.limits


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


async def open_stream(
    address: Any,
    authkey: bytes,
    timeout: float,
    limit: int = 64 * 1024,
    *,
    sock: Optional[socket.socket] = None,
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter, proto.Limits]:
    """connect_socket and handshake for asyncio: a stream to the broker, and its limits.

    *timeout* bounds all of it; *limit* is the reader's buffer, as
    asyncio.open_connection's. With *sock*, a socket already connected to the
    broker (``Broker.open_pair()``), only the handshake is done, on it.
    """
    if sock is not None:
        opening = asyncio.open_unix_connection(sock=sock, limit=limit)
    elif family_of(address) == socket.AF_UNIX:
        opening = asyncio.open_unix_connection(address, limit=limit)
    else:
        opening = asyncio.open_connection(*address, limit=limit)
    deadline = time.monotonic() + timeout
    try:
        reader, writer = await asyncio.wait_for(opening, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"the broker at {address} did not accept in time") from None
    try:
        limits = await asyncio.wait_for(
            _handshake_stream(reader, writer, authkey), max(0.0, deadline - time.monotonic())
        )
    except BaseException as exc:
        writer.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise _late() from None
        raise
    return reader, writer, limits


async def _handshake_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authkey: bytes
) -> proto.Limits:
    opening = ClientHandshake(authkey)
    while not opening.done:
        try:
            data = await reader.readexactly(opening.needed())
        except asyncio.IncompleteReadError:
            raise ConnectionResetError(
                "the broker closed the connection during the handshake"
            ) from None
        try:
            opening.receive(data)
        except (AuthenticationError, ProtocolError):
            writer.write(opening.data_to_send())  # FAILURE, if our key refused theirs
            raise
        writer.write(opening.data_to_send())
        await writer.drain()
    assert opening.limits is not None
    return opening.limits


class Dialed(NamedTuple):
    """A connection just made, not yet in use."""

    sock: socket.socket
    limits: proto.Limits
    address: Any
    authkey: bytes


def dial(
    address: Any,
    authkey: bytes,
    credentials: Optional[Union[str, os.PathLike[str]]],
    timeout: float,
) -> Dialed:
    """Connect and authenticate (blocking: never called with the lock held on reconnect).

    The credentials file, if any, names the broker and its key: read again
    at each attempt. *timeout* bounds all of it, not each step.
    """
    if credentials is not None:
        address, authkey = read_credentials(credentials)
    deadline = time.monotonic() + timeout
    for version in _VERSIONS:
        left = max(0.001, deadline - time.monotonic())
        try:
            return _dial(address, authkey, left, deadline, version)
        except ProtocolError as exc:
            if not _older_broker(exc, version):
                raise
    raise AssertionError("unreachable: protocol 1 is the last tried")


# What HELLO says, in turn: mpubsubd before senders and refusals speaks
# protocol 1 only, and says so; it is spoken to in 1 then, without them.
_VERSIONS = (proto.VERSION, 1)
_OLDER_BROKER = f"unsupported protocol version {proto.VERSION}; this broker speaks 1"


def _older_broker(exc: ProtocolError, version: int) -> bool:
    """True if *exc*, refusing HELLO *version*, is a broker that speaks an older one."""
    return version != 1 and _OLDER_BROKER in str(exc)


def _dial(address: Any, authkey: bytes, timeout: float, deadline: float, version: int) -> Dialed:
    sock = connect_socket(address, timeout)
    try:
        limits = handshake(sock, authkey, deadline, version)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return Dialed(sock, limits, address, authkey)


async def dial_async(
    address: Any,
    authkey: bytes,
    credentials: Optional[Union[str, os.PathLike[str]]],
    timeout: float,
) -> Dialed:
    """dial() for asyncio: the same steps and handshake, the waits awaited.

    The socket it returns is non-blocking, for the event loop's add_reader.
    """
    if credentials is not None:
        address, authkey = read_credentials(credentials)
    deadline = time.monotonic() + timeout
    for version in _VERSIONS:
        left = max(0.001, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(_dial_async(address, authkey, version), left)
        except asyncio.TimeoutError:
            raise _late() from None
        except ProtocolError as exc:
            if not _older_broker(exc, version):
                raise
    raise AssertionError("unreachable: protocol 1 is the last tried")


async def _dial_async(address: Any, authkey: bytes, version: int) -> Dialed:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opening = ClientHandshake(authkey, version)
        while not opening.done:
            data = b""
            while len(data) < opening.needed():
                chunk = await loop.sock_recv(sock, opening.needed() - len(data))
                if not chunk:
                    raise ConnectionResetError(
                        "the broker closed the connection during the handshake"
                    )
                data += chunk
            try:
                opening.receive(data)
            except (AuthenticationError, ProtocolError):
                with contextlib.suppress(OSError):  # FAILURE, if our key refused theirs
                    sock.send(opening.data_to_send())
                raise
            reply = opening.data_to_send()
            if reply:
                await loop.sock_sendall(sock, reply)
    except BaseException:
        sock.close()
        raise
    assert opening.limits is not None
    return Dialed(sock, opening.limits, address, authkey)
