"""What travels between hosts through NATS: subjects, signed envelopes, duplicate filtering.

Standard library only, so every rule here is tested without a NATS server.

A topic maps to the subject ``<prefix>.<token>.<token>...``, one token per
element; the broadcast topic ``()`` maps to ``<prefix>`` itself. A token
keeps ASCII letters, digits and ``-`` as they are and writes every other
byte of the element's UTF-8 as ``_`` and two upper-case hex digits; the
empty element is the token ``_``. So any string maps to a valid NATS
token (never ``*``, ``>``, a dot or white space) and back exactly.

The body of a NATS message is an envelope::

    version (1 byte) | origin length (1) | origin | instance (8) | seq (!Q) | mac (32) | payload

where *origin* is the sending host's name, *instance* is random for each
start of its bridge, *seq* counts that bridge's messages from 1, and *mac*
is HMAC-SHA256 with the shared secret over the encoded topic, every field
before it and the payload (the message pickled by its publisher). Nothing
is unpickled on the way: a bridge only checks the MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from typing import Dict, FrozenSet, Iterable, Optional, Set, Tuple

from mpubsub import _protocol as proto
from mpubsub.errors import ProtocolError

VERSION = 1
_SEQ = struct.Struct("!Q")
_MAC_SIZE = 32
_CONTEXT = b"mpubsub federation 1\0"
_BLOCK = 64  # SHA-256's block size, in bytes
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED = re.compile(rb"_([0-9A-F]{2})")
_TOKEN = re.compile(rb"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+|_")
WINDOW = 4096  # how far back in one origin's sequence a late message is still taken
_WINDOW_MASK = (1 << WINDOW) - 1


class Rejected(Exception):
    """A message from NATS that must not be delivered; the text says why."""


def escape(element: bytes) -> str:
    """The NATS token for one topic element (its UTF-8 bytes)."""
    if not element:
        return "_"
    if all(b in _PLAIN for b in element):
        return element.decode("ascii")
    return "".join(chr(b) if b in _PLAIN else f"_{b:02X}" for b in element)


def unescape(token: bytes) -> bytes:
    """The element a token stands for; Rejected if no escape() gives *token*."""
    if not _TOKEN.fullmatch(token):
        raise Rejected("malformed subject token")
    if token == b"_":
        return b""
    element = _ESCAPED.sub(lambda m: bytes((int(m.group(1), 16),)), token)
    if proto.SEP in element:
        raise Rejected("subject token holds a byte no topic has")
    return element


def subject(prefix: str, topic: bytes) -> str:
    """The subject for an encoded topic (see mpubsub._protocol.encode_topic)."""
    if not topic:
        return prefix
    return ".".join([prefix, *(escape(e) for e in topic[:-1].split(proto.SEP))])


def topic_of(prefix: bytes, subject: bytes) -> bytes:
    """The encoded topic of a subject under *prefix*; Rejected if it is not one of ours."""
    if subject == prefix:
        return b""
    if not subject.startswith(prefix + b"."):
        raise Rejected("subject not under our prefix")
    tokens = subject[len(prefix) + 1 :].split(b".")
    topic = b"".join(unescape(t) + proto.SEP for t in tokens)
    try:
        proto.decode_topic(topic)
    except ProtocolError:
        raise Rejected("subject is not UTF-8 once unescaped") from None
    return topic


def interest(prefix: str, topics: Iterable[bytes], local_only: Iterable[bytes]) -> FrozenSet[str]:
    """The NATS subjects that bring this host what its subscribers want, each once.

    A topic covered by a shorter subscribed prefix adds nothing (NATS would
    deliver a message once per matching subscription); a topic under a
    local-only prefix is not asked for. Any subscriber at all wants
    broadcasts: the subject *prefix* itself.
    """
    wanted = set(topics)
    excluded = tuple(local_only)
    subjects: Set[str] = set()
    for topic in wanted:
        if topic and (
            b"" in wanted or any(topic[:e] in wanted for e in proto.prefix_ends(topic[:-1]))
        ):
            continue  # covered by a shorter one
        if topic.startswith(excluded):
            continue
        base = subject(prefix, topic)
        subjects.update((f"{base}.>",) if not topic else (base, f"{base}.>"))
    if wanted:
        subjects.add(prefix)
    return frozenset(subjects)


class Signer:
    """Seals this host's messages: origin, instance, sequence number and MAC."""

    def __init__(self, secret: bytes, origin: str) -> None:
        name = origin.encode("utf-8", "surrogatepass")
        if not 0 < len(name) <= 255:
            raise ValueError("the host name must be 1 to 255 bytes of UTF-8")
        self._mac = Mac(secret)
        self._head = bytes((VERSION, len(name))) + name + os.urandom(8)
        self._seq = 0

    def seal(self, topic: bytes, payload: bytes) -> bytes:
        """The envelope of *payload*, published under *topic* (encoded)."""
        self._seq += 1
        head = self._head + _SEQ.pack(self._seq)
        mac = self._mac.sign(topic, head, payload)
        return b"".join((head, mac, payload))


class Verifier:
    """Opens envelopes: checks the MAC, drops this host's own and repeated messages."""

    def __init__(self, secret: bytes, origin: str) -> None:
        self._mac = Mac(secret)
        self._own = origin.encode("utf-8", "surrogatepass")
        self._seen: Dict[bytes, Tuple[bytes, int, int]] = {}  # origin: (instance, top, mask)

    def open(self, topic: bytes, body: bytes) -> Tuple[str, int, bytes]:
        """Return (origin, seq, payload), or raise Rejected saying why."""
        if len(body) < 2 or body[0] != VERSION:
            raise Rejected("not an mpubsub envelope (or another version)")
        end = 2 + body[1]
        seq_end = end + 8 + _SEQ.size
        if len(body) < seq_end + _MAC_SIZE:
            raise Rejected("truncated envelope")
        head, mac, payload = (
            body[:seq_end],
            body[seq_end : seq_end + _MAC_SIZE],
            body[seq_end + _MAC_SIZE :],
        )
        if not hmac.compare_digest(mac, self._mac.sign(topic, head, payload)):
            raise Rejected("bad signature (another secret, or forged)")
        origin = body[2:end]
        if origin == self._own:
            raise Rejected("our own message came back (another host uses our name?)")
        instance = body[end : end + 8]
        (seq,) = _SEQ.unpack_from(body, end + 8)
        if not self._first_time(origin, instance, seq):
            raise Duplicate("seen before")
        return origin.decode("utf-8", "surrogatepass"), seq, payload

    def _first_time(self, origin: bytes, instance: bytes, seq: int) -> bool:
        # A sliding window per origin, as IPsec's replay protection does: a
        # message matching two of our subscriptions arrives twice.
        last: Optional[Tuple[bytes, int, int]] = self._seen.get(origin)
        if last is None or last[0] != instance:
            self._seen[origin] = (instance, seq, 1)
            return True
        _, top, mask = last
        if seq > top:
            mask = ((mask << (seq - top)) | 1) & _WINDOW_MASK
            self._seen[origin] = (instance, seq, mask)
            return True
        offset = top - seq
        if offset >= WINDOW or mask >> offset & 1:
            return False
        self._seen[origin] = (instance, top, mask | 1 << offset)
        return True


class Duplicate(Rejected):
    """A message this host already delivered (or too late to tell)."""


class Mac:
    """HMAC-SHA256 under one key (RFC 2104), its padded key states hashed once.

    The same digest as ``hmac.digest(key, message, "sha256")``, over the
    context, the three lengths and the three parts, at less than half the
    cost: the per-message price of signing and checking every message.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def sign(self, topic: bytes, head: bytes, payload: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(_CONTEXT + struct.pack("!III", len(topic), len(head), len(payload)))
        inner.update(topic)
        inner.update(head)
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
