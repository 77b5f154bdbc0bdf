"""The wire protocol between NetPubSub and Broker.

A connection starts with multiprocessing.connection's challenge/response
(in its frames: a 4-byte signed big-endian length, then the bytes), the
broker challenging first, then the client. Both the legacy HMAC-MD5 form
(Python < 3.12) and the ``{digest}`` form of Python 3.12+ are understood.

Then every frame is a 5-byte header (``!IB``: body length, frame type)
and the body. The client's first frame is HELLO (its protocol version); the
broker answers WELCOME (its version, its maximum message size, its
limits on topics: elements and encoded bytes, and on one client's
subscriptions: how many, and their topics' bytes) or ERROR (a UTF-8
reason, then it closes). After that:

- SUB / UNSUB (client -> broker): body is an encoded topic.
- PING (client -> broker, empty): the broker answers PONG once it has
  handled everything the client sent before, so a client knows its
  subscriptions are in place.
- STATS (client -> broker, empty): the broker answers STATS_REPLY, its
  figures as a JSON object, to that client only; routing is not touched.
- PUB (both ways): ``!I`` topic length, the encoded topic, then the message
  pickled by the publisher. The broker reads only the topic; it forwards
  the frame unchanged and never unpickles anything.
- BRIDGE (client -> broker, the broker's bridge key): this client is
  mpubsubd's federation bridge (one at a time; mpubsubd hands its bridge
  the key, a wrong one closes the connection). From then on the broker
  sends it every message the other clients publish, and SUB / UNSUB frames
  (broker -> bridge) whenever a topic gains its first subscriber or loses
  its last one, so the bridge knows what this host wants from other hosts.
- FEDERATION (bridge -> broker): the bridge's state and counters as a small
  flat JSON object (see ``federation_figures``), which the broker adds to its STATS_REPLY.

Version 2 adds (a version 1 client gets none of them):

- SENDER (broker -> client): who published the PUB frames that follow, up to
  the next SENDER, as a small JSON object (see ``_identity``), stamped by
  the broker: sent only when the publisher changes. From the bridge to the
  broker, who on another host published the PUB frames that follow.
- DENIED (broker -> client): ``!B`` the right (see ``RIGHTS``), ``!I`` topic
  length, the encoded topic, then a UTF-8 reason: a publish or a
  subscription the broker's policy (or a quota) refused. Told once per
  topic and right between two PINGs (a client's flushes).
- CLIENTS (client -> broker, empty): the broker answers CLIENTS_REPLY, a JSON
  object: ``{"clients": [...]}``, or ``{"denied": reason}`` without the
  ``admin`` right.

A topic is encoded as each element in UTF-8 (surrogates passed through),
followed by the byte 0xFF, which never occurs in UTF-8. So ``()`` is
``b''``, and the encoding of every prefix of a topic is a byte prefix of
the topic's encoding ending in 0xFF, which lets the broker route on bytes.
A broker closes the connection of a client that sends a topic deeper or
longer than its limits, or subscribes past them.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from typing import Any, Dict, Iterator, List, NamedTuple, Tuple, Union

from ._text import printable
from .errors import AuthenticationError, ProtocolError

VERSION = 2
VERSIONS = frozenset((1, 2))  # what a broker accepts in HELLO

(
    HELLO,
    WELCOME,
    ERROR,
    SUB,
    UNSUB,
    PUB,
    PING,
    PONG,
    STATS,
    STATS_REPLY,
    BRIDGE,
    FEDERATION,
    SENDER,
    DENIED,
    CLIENTS,
    CLIENTS_REPLY,
) = range(1, 17)
FRAME_TYPES = frozenset(range(1, 17))
#: The rights of a policy, in DENIED frames by their index.
RIGHTS = ("publish", "subscribe", "admin")
DENIED_HEAD = struct.Struct("!BI")
_MAX_REASON = 512  # bytes of a refusal's reason kept: a broker's are a line

#: A frame as FrameDecoder gives it: its type, and the whole frame (header included).
Frame = Tuple[int, bytes]

HEADER = struct.Struct("!IB")
PUB_HEADER = struct.Struct("!IBI")  # the header and the topic length of a PUB frame
TOPIC_LEN = struct.Struct("!I")
HELLO_BODY = struct.Struct("!H")
WELCOME_BODY = struct.Struct("!HQIIIQ")
_WELCOME_V1_BODY = struct.Struct("!HQ")  # brokers before topic and subscription limits
SEP = b"\xff"

# Largest message accepted by default (pickled bytes plus the topic).
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
# Largest topic accepted by default: elements, and bytes once encoded.
DEFAULT_MAX_TOPIC_DEPTH = 128
DEFAULT_MAX_TOPIC_SIZE = 4096
# Subscriptions of one client by default: how many, and their topics' bytes.
DEFAULT_MAX_SUBSCRIPTIONS = 10_000
DEFAULT_MAX_SUBSCRIPTION_BYTES = 1024 * 1024
_NO_LIMIT = 2**31 - 1  # what a broker that announces no limit accepts


class Limits(NamedTuple):
    """What a broker accepts, as its WELCOME says."""

    max_message: int = DEFAULT_MAX_MESSAGE
    max_topic_depth: int = DEFAULT_MAX_TOPIC_DEPTH
    max_topic_size: int = DEFAULT_MAX_TOPIC_SIZE
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS
    max_subscription_bytes: int = DEFAULT_MAX_SUBSCRIPTION_BYTES

    def check_topic(self, encoded: bytes) -> None:
        """ValueError if an encoded topic is over the limits (for publishers)."""
        reason = self.topic_excess(encoded)
        if reason:
            raise ValueError(reason)

    def topic_excess(self, encoded: bytes, whose: str = "the broker's") -> str:
        """Why an encoded topic is over *whose* limits, or ``''`` if it is not."""
        if len(encoded) > self.max_topic_size:
            return (
                f"topic of {len(encoded)} bytes exceeds {whose} limit of "
                f"{self.max_topic_size} bytes"
            )
        depth = encoded.count(SEP)
        if depth > self.max_topic_depth:
            return (
                f"topic of {depth} elements exceeds {whose} limit of "
                f"{self.max_topic_depth} elements"
            )
        return ""


# --- multiprocessing.connection's handshake --------------------------------

CHALLENGE = b"#CHALLENGE#"
WELCOME_MSG = b"#WELCOME#"
FAILURE_MSG = b"#FAILURE#"
HANDSHAKE_MAX = 256  # multiprocessing refuses longer handshake messages too
MP_LEN = struct.Struct("!i")
_DIGESTS = frozenset((b"md5", b"sha256", b"sha384", b"sha3_256", b"sha3_384"))
_LEGACY_LENGTHS = (20, 16)  # Python < 3.12: 20-byte challenges, 16-byte MD5 answers


def mp_frame(data: bytes) -> bytes:
    """Frame *data* as multiprocessing.connection's ``send_bytes`` does."""
    return MP_LEN.pack(len(data)) + data


def new_challenge() -> Tuple[bytes, bytes]:
    """Return (the challenge to send, the message the answer must sign)."""
    message = b"{sha256}" + os.urandom(40)
    return mp_frame(CHALLENGE + message), message


def _digest_and_payload(message: bytes) -> Tuple[str, bytes]:
    if len(message) in _LEGACY_LENGTHS:
        return "", message
    if message.startswith(b"{"):
        end = message.find(b"}", 1, 12)
        if end > 0 and message[1:end] in _DIGESTS:
            return message[1:end].decode("ascii"), message[end + 1 :]
    raise AuthenticationError("unsupported challenge or response format")


def verify_answer(authkey: bytes, message: bytes, answer: bytes) -> None:
    """Raise AuthenticationError unless *answer* signs *message* with *authkey*."""
    digest, mac = _digest_and_payload(answer)
    expected = hmac.new(authkey, message, digest or "md5").digest()
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError("digest received was wrong")


def answer_challenge(authkey: bytes, challenge: bytes) -> bytes:
    """Return the framed answer to a peer's ``#CHALLENGE#`` message."""
    if not challenge.startswith(CHALLENGE):
        raise ProtocolError("expected an authentication challenge")
    message = challenge[len(CHALLENGE) :]
    digest = _digest_and_payload(message)[0]
    mac = hmac.new(authkey, message, digest or "md5").digest()
    return mp_frame(b"{%s}%s" % (digest.encode(), mac) if digest else mac)


# --- topics and frames ---------------------------------------------------------


def encode_topic(topic: Tuple[str, ...]) -> bytes:
    """Encode a topic tuple; TypeError if an element is not a string."""
    try:
        return b"".join([e.encode("utf-8", "surrogatepass") + SEP for e in topic])
    except AttributeError:
        raise TypeError("topic elements must be strings to travel to a broker") from None


def decode_topic(data: bytes) -> Tuple[str, ...]:
    """Decode an encoded topic; ProtocolError if it is malformed."""
    if not data:
        return ()
    if not data.endswith(SEP):
        raise ProtocolError("malformed topic")
    try:
        return tuple(e.decode("utf-8", "surrogatepass") for e in data[:-1].split(SEP))
    except UnicodeDecodeError:
        raise ProtocolError("malformed topic") from None


def prefix_ends(data: bytes) -> Iterator[int]:
    """Where each non-empty prefix of an encoded topic ends, shortest first.

    ``data[:end]`` for each *end* is a prefix's encoding: walked one at a
    time, never built all at once (a deep topic has many).
    """
    end = data.find(SEP)
    while end >= 0:
        yield end + 1
        end = data.find(SEP, end + 1)


def frame(kind: int, body: bytes) -> bytes:
    """One frame: the header and *body*."""
    return HEADER.pack(len(body), kind) + body


def pub_frame(topic: bytes, payload: bytes) -> bytes:
    """A PUB frame for an encoded topic and a pickled message."""
    return pub_head(topic, len(payload)) + payload


def pub_head(topic: bytes, size: int) -> bytes:
    """What precedes a payload of *size* bytes in a PUB frame (to send them apart)."""
    return PUB_HEADER.pack(4 + len(topic) + size, PUB, len(topic)) + topic


def kind_of(frame: Union[bytes, memoryview]) -> int:
    """The type of a whole frame."""
    return frame[4]


def body_of(frame: bytes) -> bytes:
    """The body of a whole frame: what follows its header."""
    return frame[5:]


def reason_of(frame: bytes) -> str:
    """The reason an ERROR frame gives, printable (a hostile peer's bytes are not)."""
    return printable(frame[5:].decode(errors="replace"))


def pub_topic(frame: bytes) -> bytes:
    """The encoded topic of a whole PUB frame; ProtocolError if malformed."""
    return frame[9 : _pub_topic_end(frame)]


def pub_parts(frame: bytes) -> Tuple[bytes, bytes]:
    """The encoded topic and the payload of a whole PUB frame; ProtocolError if malformed."""
    end = _pub_topic_end(frame)
    return frame[9:end], frame[end:]


def _pub_topic_end(frame: bytes) -> int:
    """Where the topic of a whole PUB frame ends (it starts at 9)."""
    if len(frame) < 9:
        raise ProtocolError("truncated PUB frame")
    end = 9 + TOPIC_LEN.unpack_from(frame, 5)[0]
    if end > len(frame):
        raise ProtocolError("PUB frame topic overruns the frame")
    return int(end)


class FrameDecoder:
    """Cut a byte stream into frames, whatever the chunking.

    ``feed(data)`` returns ``(type, frame)`` for every frame completed by
    *data*, the frame whole (header included: the body starts at offset 5),
    and keeps the rest for the next call. Anything malformed raises
    ProtocolError, and nothing else: an unknown type, or a body over
    *max_body* bytes (checked from the header, before the body arrives).
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
            frames, used = self._split(buf)
            del buf[:used]
        else:  # the usual case: parse the bytes as received, without copying them first
            frames, used = self._split(data)
            buf += memoryview(data)[used:]
        return frames

    def _split(self, data: Union[bytes, bytearray]) -> Tuple[List[Tuple[int, bytes]], int]:
        frames = []
        pos, end = 0, len(data)
        unpack = HEADER.unpack_from
        # Slicing the view copies each frame once, from bytes or a bytearray;
        # the with releases it, so the bytearray can be resized afterwards.
        with memoryview(data) as view:
            while end - pos >= 5:
                size, kind = unpack(data, pos)
                if kind not in FRAME_TYPES:
                    raise ProtocolError(f"unknown frame type {kind}")
                if size > self.max_body:
                    raise ProtocolError(
                        f"frame of {size} bytes exceeds the limit of {self.max_body}"
                    )
                if end - pos - 5 < size:
                    break
                frames.append((kind, bytes(view[pos : pos + 5 + size])))
                pos += 5 + size
        return frames, pos


def federation_figures(frame: bytes) -> Dict[str, Any]:
    """The figures in a whole FEDERATION frame; ProtocolError unless each is one of
    REPORT_FIELDS with its type: a string of at most 256 characters, or a count."""
    if len(frame) > _MAX_REPORT:
        raise ProtocolError("FEDERATION frame too long")
    value = _json_object(frame, "FEDERATION frame is")
    for key, figure in value.items():
        kind = REPORT_FIELDS.get(key)
        if kind is None:
            raise ProtocolError(f"FEDERATION frame holds an unknown figure {key[:64]!r}")
        if type(figure) is not kind or not _fits(figure):
            raise ProtocolError(f"FEDERATION frame holds a bad {key}")
    return value


# What a FEDERATION report may say (see mpubsubd._bridge), and the type of each.
REPORT_FIELDS: Dict[str, type] = {
    "state": str,
    "server": str,
    "name": str,
    "nats_subscriptions": int,
    "forwarded_out": int,
    "forwarded_in": int,
    "dropped_out": int,
    "dropped_unverified": int,
    "duplicates": int,
    "too_long": int,
    "reconnects": int,
}
_MAX_REPORT = 16 * 1024


def _fits(figure: Any) -> bool:
    """A report's string is short, its count a count."""
    return len(figure) <= 256 if isinstance(figure, str) else 0 <= figure < 1 << 63


def federation_frame(figures: Dict[str, Any]) -> bytes:
    """A FEDERATION frame of the bridge's *figures* (see federation_figures)."""
    return frame(FEDERATION, json.dumps(figures).encode())


def stats_figures(frame: bytes) -> Dict[str, Any]:
    """The figures in a whole STATS_REPLY frame; ProtocolError if they are not a JSON object."""
    return _json_object(frame, "the broker's statistics are")


def _json_object(frame: bytes, subject: str) -> Dict[str, Any]:
    """The JSON object in a whole frame's body; ProtocolError, "*subject* not ...", if not."""
    try:
        value = json.loads(frame[5:])
    except (ValueError, RecursionError):
        raise ProtocolError(f"{subject} not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{subject} not a JSON object")
    return value


def denied_frame(right: str, topic: bytes, reason: str) -> bytes:
    """A DENIED frame: *right* refused on the encoded *topic*, and why."""
    body = DENIED_HEAD.pack(RIGHTS.index(right), len(topic)) + topic + reason.encode()
    return frame(DENIED, body)


def denied_parts(frame: bytes) -> Tuple[str, Tuple[str, ...], str]:
    """The right, the topic and the reason of a whole DENIED frame; ProtocolError if malformed."""
    if len(frame) < 5 + DENIED_HEAD.size:
        raise ProtocolError("truncated DENIED frame")
    right, size = DENIED_HEAD.unpack_from(frame, 5)
    start = 5 + DENIED_HEAD.size
    if right >= len(RIGHTS) or start + size > len(frame):
        raise ProtocolError("malformed DENIED frame")
    topic = decode_topic(frame[start : start + size])
    why = frame[start + size : start + size + _MAX_REASON].decode(errors="replace")
    return RIGHTS[right], topic, printable(why)


def clients_figures(frame: bytes) -> List[Dict[str, Any]]:
    """The clients in a whole CLIENTS_REPLY frame; PermissionError if the broker refused,
    ProtocolError if it is not a list of them."""
    value = _json_object(frame, "the broker's list of clients is")
    if "denied" in value:
        raise PermissionError(printable(str(value["denied"])[:_MAX_REASON]))
    clients = value.get("clients")
    if not isinstance(clients, list) or not all(isinstance(c, dict) for c in clients):
        raise ProtocolError("the broker's list of clients is not a list of clients")
    return clients


def welcome_body(limits: Limits) -> bytes:
    """The body of the broker's WELCOME."""
    return WELCOME_BODY.pack(VERSION, *limits)


def welcome_limits(body: bytes) -> Limits:
    """The limits in the body of a WELCOME; ProtocolError if malformed."""
    if len(body) == WELCOME_BODY.size:
        _version, *limits = WELCOME_BODY.unpack(body)
        return Limits(*limits)
    if len(body) == _WELCOME_V1_BODY.size:
        max_message = _WELCOME_V1_BODY.unpack(body)[1]
        return Limits(max_message, _NO_LIMIT, _NO_LIMIT, _NO_LIMIT, _NO_LIMIT)
    raise ProtocolError("the broker did not answer HELLO")


def hello_version(frame: bytes) -> int:
    """The version in a whole HELLO frame; ProtocolError if malformed."""
    if len(frame) != 5 + HELLO_BODY.size:
        raise ProtocolError("malformed HELLO frame")
    version: int = HELLO_BODY.unpack_from(frame, 5)[0]
    return version
