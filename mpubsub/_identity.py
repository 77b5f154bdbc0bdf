"""Who is at the other end of a broker's connection, as the kernel says, and who published.

At accept, the broker reads a Unix socket peer's credentials from the
kernel (SO_PEERCRED: pid, uid, gid; SO_PEERGROUPS: its groups), never from
the peer, and names it; a TCP peer is its address. Before the messages of
one publisher, the broker sends each subscriber a SENDER frame whose body
(``stamp``) says who published them, once per change of publisher: the
pub-sub turns it into the ``Sender`` that ``current_sender()`` returns
while it delivers them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import json
import pwd
import socket
import struct
import threading
from typing import Any, Dict, FrozenSet, Optional, Set, Tuple

from . import _protocol as proto
from ._sockets import address_account
from ._text import printable
from .errors import ProtocolError

__all__ = ["Sender", "current_sender"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13, not in every Python
_MAX_GROUPS = 65536
_MAX_STAMP = 1024  # a SENDER body: a few small numbers and names


@dataclasses.dataclass(frozen=True)
class Sender:
    """Who published a message, as the broker says (never the publisher): None where unknown.

    *uid*, *gid* and *pid* are the kernel's word for a publisher on the
    broker's Unix socket, *user* its user's name; *address* is a TCP
    publisher's ``(host, port)``. *host* is the name of the host whose
    broker stamped the message when it came from another host through
    mpubsubd's federation, and None for this host's publishers.
    """

    uid: Optional[int] = None
    gid: Optional[int] = None
    pid: Optional[int] = None
    user: Optional[str] = None
    host: Optional[str] = None
    address: Optional[Tuple[str, int]] = None


_delivering = threading.local()
#: Who sent what an asyncio pub-sub's coroutine subscriber is awaited for: a
#: context's, not the thread's, which runs other tasks while it waits.
awaited_sender: contextvars.ContextVar[Optional[Sender]] = contextvars.ContextVar(
    "mpubsub_sender", default=None
)
#: The threads delivering messages from a broker now: while it is empty, as it
#: mostly is where publishing is busy, a publish need not hide a sender.
busy: Set[int] = set()


def current_sender() -> Optional[Sender]:
    """Who published the message being delivered, inside a subscriber called for a
    message from the broker; None for a local publish, or outside a delivery.

    In an ``mpubsub.aio`` coroutine subscriber too, across its awaits.
    """
    return getattr(_delivering, "sender", None) or awaited_sender.get()


def set_sender(sender: Optional[Sender]) -> Optional[Sender]:
    """``current_sender()`` in this thread is *sender* from now on; what it was.

    A sender set marks the thread ``busy`` until it is set back to None.
    """
    previous = getattr(_delivering, "sender", None)
    _delivering.sender = sender
    if sender is not None:
        busy.add(threading.get_ident())
    elif previous is not None:
        busy.discard(threading.get_ident())
    return previous


@dataclasses.dataclass(frozen=True)
class Identity:
    """A broker's client, as the broker knows it (the kernel's word, not the client's)."""

    kind: str  # "unix", "tcp" or "pair" (Broker.open_pair)
    pid: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    groups: FrozenSet[int] = frozenset()
    user: Optional[str] = None
    command: Optional[str] = None
    address: Optional[Tuple[str, int]] = None
    host: Optional[str] = None  # set for what the federation bridge relays
    #: What its quotas are charged to: its user, or its IP address on TCP (see
    #: _sockets.address_account).
    account: str = ""

    def describe(self) -> str:
        """How log lines name it: ``uid 1000 alice, pid 4242 myapp``, or ``127.0.0.1:5000``."""
        if self.address is not None:
            host, port = self.address
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.kind == "pair":
            return "a socket pair"  # the broker's own (Broker.open_pair)
        parts = []
        if self.uid is not None:
            parts.append(" ".join(str(p) for p in ("uid", self.uid, self.user) if p is not None))
        if self.pid is not None:
            parts.append(" ".join(str(p) for p in ("pid", self.pid, self.command) if p))
        return printable(", ".join(parts)) or "unknown"

    def stamp(self) -> bytes:
        """The SENDER frame that precedes this client's messages to a subscriber."""
        fields = {
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "user": self.user,
            "host": self.host,
            "address": list(self.address) if self.address is not None else None,
        }
        body = json.dumps({k: v for k, v in fields.items() if v is not None}).encode()
        return proto.frame(proto.SENDER, body)


def identify(sock: socket.socket, kind: str) -> Identity:
    """Who is at the other end of *sock*, a connection of *kind* (see Identity.kind)."""
    if sock.family != socket.AF_UNIX:
        address = sock.getpeername()
        host, port = address[:2]
        return Identity("tcp", address=(str(host), int(port)), account=address_account(address))
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(creds)
    return Identity(
        kind,
        pid=pid,
        uid=uid,
        gid=gid,
        groups=frozenset((gid, *_peer_groups(sock))),
        user=_user_name(uid),
        command=_command(pid),
        account=f"uid {uid}",
    )


def _peer_groups(sock: socket.socket) -> Tuple[int, ...]:
    """The supplementary groups of a Unix socket's peer when it connected (the kernel's)."""
    size = 64 * 4
    while size <= _MAX_GROUPS * 4:
        try:
            data = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than room
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
    return ()


_names: Dict[int, Optional[str]] = {}


def _user_name(uid: int) -> Optional[str]:
    """The name of *uid*, remembered (the broker asks once per user)."""
    if uid not in _names:
        if len(_names) > 4096:
            _names.clear()
        try:
            _names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _names[uid] = None
    return _names[uid]


def _command(pid: int) -> Optional[str]:
    """The command name of process *pid*, if it is still there to ask."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read(64).decode(errors="replace").strip() or None
    except OSError:
        return None


def sender_of(body: bytes) -> Sender:
    """The Sender a SENDER frame's body names; ProtocolError if it is not one."""
    if len(body) > _MAX_STAMP:
        raise ProtocolError("SENDER frame too long")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise ProtocolError("SENDER frame is not JSON") from None
    if not isinstance(fields, dict):
        raise ProtocolError("SENDER frame is not a JSON object")
    values: Dict[str, Any] = {}
    for name in ("uid", "gid", "pid"):
        value = fields.get(name)
        if value is not None and (type(value) is not int or not -(2**31) <= value < 2**32):
            raise ProtocolError(f"SENDER frame holds a bad {name}")
        values[name] = value
    for name in ("user", "host"):
        value = fields.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise ProtocolError(f"SENDER frame holds a bad {name}")
        values[name] = value
    address = fields.get("address")
    if address is not None:
        if not (
            isinstance(address, list)
            and len(address) == 2
            and isinstance(address[0], str)
            and len(address[0]) <= 256
            and type(address[1]) is int
        ):
            raise ProtocolError("SENDER frame holds a bad address")
        address = (address[0], address[1])
    return Sender(address=address, **values)


def relayed(sender: Sender, host: str) -> Identity:
    """What the federation bridge relays for *sender*, published on *host*."""
    return Identity(
        "federation",
        account="federation",
        pid=sender.pid,
        uid=sender.uid,
        gid=sender.gid,
        user=sender.user,
        host=host,
        address=sender.address,
    )
