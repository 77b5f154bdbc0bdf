"""What travels between hosts through NATS: subjects, signed envelopes, duplicate filtering.

Standard library only, so every rule here is tested without a NATS server.

A topic maps to the subject ``<prefix>.<token>.<token>...``, one token per
element; the broadcast topic ``()`` maps to ``<prefix>`` itself. A token
keeps ASCII letters, digits and ``-`` as they are and writes every other
byte of the element's UTF-8 as ``_`` and two upper-case hex digits; the
empty element is the token ``_``. So any string maps to a valid NATS
token (never ``*``, ``>``, a dot or white space) and back exactly.

The body of a NATS message is an envelope::

    version (1 byte) | origin length (1) | origin | instance (8) | started (!Q)
    | seq (!Q) | sent (!Q) | sender length (!H) | sender | mac (32) | payload

where *origin* is the sending host's name, *instance* is random for each
start of its bridge and *started* the time of that start, *seq* counts
that bridge's messages from 1, *sent* is the time the message was sealed
(times in nanoseconds since the epoch), *sender* is who published it as
the origin's broker stamped it (the body of its SENDER frame: JSON, at most
1 KiB; version 2 envelopes, from bridges before it, have none), and *mac*
is HMAC-SHA256 with the
shared secret over the encoded topic, every field before it and the
payload (the message pickled by its publisher). Nothing is unpickled on
the way: a bridge only checks the MAC.

Replays are dropped. A message sent before the receiving bridge started,
or further from its clock than *max_skew* seconds (either way), is
refused: so recorded envelopes are worthless once that long has passed,
and a restarted receiver takes none of what it may have delivered before
(but for a sender whose clock is ahead of the receiver's by d: what the
receiver delivered in the last d seconds before its restart can be
replayed to it once, within max_skew).
Within that time, each start of an origin's bridge has its own window of
sequence numbers seen (the last few starts are remembered), and a start
never seen before that began before the newest one seen is refused. So
envelopes recorded on NATS and published again, in any order and from any
mix of starts, are never delivered twice. The hosts' clocks must agree
within *max_skew* (NTP); a host whose clock is behind a receiver's by d
loses its messages to that receiver for d after the receiver starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import struct
import time
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple, Union

from mpubsub import ProtocolError
from mpubsub._for_mpubsubd import Memo, printable, sender_of
from mpubsub._for_mpubsubd import protocol as proto

VERSION = 3
_UNSTAMPED = 2  # the version before the sender was sealed in: still taken
_STARTED = struct.Struct("!Q")
_SEQ_SENT = struct.Struct("!QQ")
_SENDER_SIZE = struct.Struct("!H")
MAX_SENDER = 1024
_TIMES = struct.Struct("!QQQ")  # started, seq, sent: read at once
DEFAULT_MAX_SKEW = 10.0  # seconds
_INSTANCE = 8  # bytes of a bridge start's random identity
_MAC_SIZE = 32
_CONTEXT = b"mpubsub federation 1\0"
_BLOCK = 64  # SHA-256's block size, in bytes
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED = re.compile(rb"_([0-9A-F]{2})")
_TOKEN = re.compile(rb"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+|_")
WINDOW = 4096  # how far back in one start's sequence a late message is still taken
_WINDOW_MASK = (1 << WINDOW) - 1
STARTS = 4  # the starts of one origin whose windows are kept, the newest ones


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
    if escape(element).encode() != token:  # "_74" for "t": one spelling per element
        raise Rejected("subject token not written as escape() writes it")
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

    def __init__(
        self,
        secret: bytes,
        origin: str,
        *,
        started: Optional[int] = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        name = origin.encode("utf-8", "surrogatepass")
        if not 0 < len(name) <= 255:
            raise ValueError("the host name must be 1 to 255 bytes of UTF-8")
        self._mac = Mac(secret)
        self._clock = clock
        start = _STARTED.pack(clock() if started is None else started)
        self._head = bytes((VERSION, len(name))) + name + os.urandom(_INSTANCE) + start
        self._seq = 0

    def seal(self, topic: bytes, payload: bytes, sender: bytes = b"") -> bytes:
        """The envelope of *payload*, published under *topic* (encoded) by *sender*
        (the body of the broker's SENDER frame before it)."""
        if len(sender) > MAX_SENDER:
            sender = b""  # not from our broker: it names senders in a few dozen bytes
        self._seq += 1
        head = b"".join(
            (
                self._head,
                _SEQ_SENT.pack(self._seq, self._clock()),
                _SENDER_SIZE.pack(len(sender)),
                sender,
            )
        )
        mac = self._mac.sign(topic, head, payload)
        return b"".join((head, mac, payload))


class Verifier:
    """Opens envelopes: checks the MAC, drops this host's own and repeated messages."""

    def __init__(
        self,
        secret: bytes,
        origin: str,
        *,
        max_skew: float = DEFAULT_MAX_SKEW,
        born: Optional[int] = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._mac = Mac(secret)
        self._own = origin.encode("utf-8", "surrogatepass")
        self._origins: Dict[bytes, _Origin] = {}
        self._skew = int(max_skew * 1e9)
        self._clock = clock
        self._born = clock() if born is None else born  # nothing sent before is taken

    def open(self, topic: bytes, body: bytes) -> Tuple[str, int, bytes, bytes]:
        """Return (origin, seq, payload, sender), or raise Rejected saying why."""
        if len(body) < 2 or body[0] not in (VERSION, _UNSTAMPED):
            raise Rejected("not an mpubsub envelope (or another version)")
        end = 2 + body[1]
        start_end = end + _INSTANCE + _STARTED.size
        seq_end = sender_start = start_end + _SEQ_SENT.size
        if body[0] == VERSION:
            if len(body) < seq_end + _SENDER_SIZE.size:
                raise Rejected("truncated envelope")
            sender_start = seq_end + _SENDER_SIZE.size
            seq_end = sender_start + _SENDER_SIZE.unpack_from(body, seq_end)[0]
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
        if not origin:
            raise Rejected("an envelope in no host's name")
        if origin == self._own:
            raise Rejected("our own message came back (another host uses our name?)")
        started, seq, sent = _TIMES.unpack_from(body, end + _INSTANCE)
        now = self._clock()
        if sent < self._born:
            raise Rejected("sent before this bridge started (a replay?)")
        if abs(now - sent) > self._skew:
            raise Rejected("sent further from now than max_clock_skew (a replay? clocks apart?)")
        state = self._origins.get(origin)
        if state is None:
            state = self._origins[origin] = _Origin()
        state.check(body[end:start_end], started, seq)
        return origin.decode("utf-8", "surrogatepass"), seq, payload, body[sender_start:seq_end]


class _Origin:
    """What one origin's messages were seen: a window per start of its bridge."""

    def __init__(self) -> None:
        self.newest = 0  # the latest start seen
        self.windows: Dict[bytes, List[int]] = {}  # instance and start: [top, mask]

    def check(self, start: bytes, started: int, seq: int) -> None:
        """Note message *seq* of the bridge start *start*; Rejected if it must be dropped."""
        # A sliding window per start, as IPsec's replay protection does: a
        # message matching two of our subscriptions arrives twice.
        window = self.windows.get(start)
        if window is None:
            if started < self.newest:
                raise Rejected("from a start of its bridge older than one seen (a replay?)")
            self.newest = started
            self.windows[start] = [seq, 1]
            if len(self.windows) > STARTS:  # forget the oldest: it is older than newest
                del self.windows[min(self.windows, key=_started)]
            return
        top, mask = window
        if seq > top:
            window[:] = seq, ((mask << (seq - top)) | 1) & _WINDOW_MASK
            return
        offset = top - seq
        if offset >= WINDOW or mask >> offset & 1:
            raise Duplicate("seen before")
        window[1] = mask | 1 << offset


def _started(start: bytes) -> int:
    """When the bridge start identified by *start* (instance and time) began."""
    value: int = _STARTED.unpack_from(start, _INSTANCE)[0]
    return value


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


def weigh(key: Union[str, bytes], value: Union[str, bytes]) -> int:
    """What a memo entry of topics and subjects holds, roughly, in bytes."""
    return len(key) + len(value) + 200


class Arrivals:
    """Messages from NATS, checked and made frames for this host's broker (no I/O).

    A message must come signed by a host of the federation, not seen before
    (Duplicate), on a topic this host takes: what fails is counted in
    *counters* and told to *warn* (rate-limited by its kind), never passed on.
    """

    def __init__(
        self,
        prefix: str,
        verifier: Verifier,
        local_only: Tuple[bytes, ...],
        counters: Dict[str, int],
        warn: Callable[[str, str], None],
    ) -> None:
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._verifier = verifier
        self._local_only = local_only
        self.counters = counters
        self._warn = warn
        self._limits = proto.Limits()
        self._topics_of: Memo[str, bytes] = Memo(self._topic_of, weigh=weigh)
        self._named: Optional[Tuple[str, bytes]] = None  # the sender the broker knows of

    def use_limits(self, limits: proto.Limits) -> None:
        """A new connection to this host's broker, which takes *limits* (its WELCOME said so)."""
        self._limits = limits
        self._topics_of.clear()  # checked against the old ones
        self._named = None

    def frames(self, inbox: List[Tuple[str, bytes]]) -> Tuple[bytes, int]:
        """The PUB frames for this host's broker of what NATS brought, in each
        origin's order, and how many; the rest dropped and counted."""
        limits = self._limits
        ready: List[Tuple[str, int, bytes, bytes, bytes]] = []
        for subj, body in inbox:
            try:
                topic = self._topics_of[subj]
                origin, seq, payload, sender = self._verifier.open(topic, body)
            except Duplicate:
                self.counters["duplicates"] += 1
                continue
            except Rejected as exc:
                self.counters["dropped_unverified"] += 1
                where = printable(subj[:100])
                self._warn(f"dropped an unverified message from NATS on {where}: {exc}", str(exc))
                continue
            if self._local_only and topic.startswith(self._local_only):
                continue
            if 4 + len(topic) + len(payload) > limits.max_message:
                self._warn(
                    f"dropped a message from {printable(origin)} over this host's max_message_size",
                    "too big",
                )
                continue
            ready.append((origin, seq, topic, payload, sender))
        ready.sort(key=lambda item: (item[0], item[1]))
        frames = []
        for origin, _, topic, payload, sender in ready:
            if self._named != (origin, sender):  # the broker stamps what follows with it
                self._named = (origin, sender)
                frames.append(proto.frame(proto.SENDER, relayed_sender(origin, sender)))
            frames.append(proto.pub_frame(topic, payload))
        return b"".join(frames), len(ready)

    def _topic_of(self, subj: str) -> bytes:
        """The topic a subject from NATS stands for; Rejected if none this host takes."""
        # Cheap bounds first: junk subjects of thousands of tokens must not
        # cost thousands of unescapes each.
        limits = self._limits
        depth = subj.count(".") - self._prefix.count(".")
        if depth > limits.max_topic_depth or len(subj) > (
            len(self._prefix) + 3 * limits.max_topic_size + 2 * limits.max_topic_depth
        ):
            raise Rejected("subject deeper or longer than any topic this host takes")
        topic = topic_of(self._prefix_bytes, subj.encode("utf-8", "surrogateescape"))
        excess = limits.topic_excess(topic, "this host's")
        if excess:  # the broker would take the bridge for a client breaking its limits
            raise Rejected(excess)
        return topic


def relayed_sender(origin: str, sender: bytes) -> bytes:
    """The body of the SENDER frame for what *origin*'s broker said of *sender*: the
    same, with the host; a sender record this host's broker would refuse (and cut the
    bridge for), only the host."""
    try:
        fields = dataclasses.asdict(sender_of(sender)) if sender else {}
    except ProtocolError:
        fields = {}
    fields["host"] = origin
    return json.dumps({key: value for key, value in fields.items() if value is not None}).encode()
