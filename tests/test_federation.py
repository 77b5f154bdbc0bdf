"""Tests for mpubsubd._federation: subjects, envelopes, the duplicate window, interest."""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import struct
import time
from typing import Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpubsub import _protocol as proto
from mpubsub._protocol import encode_topic
from mpubsubd._federation import (
    STARTS,
    WINDOW,
    Arrivals,
    Duplicate,
    Mac,
    Rejected,
    Signer,
    Verifier,
    escape,
    interest,
    subject,
    topic_of,
)

SECRET = b"s" * 32
NATS_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # what every NATS server accepts in a subject
topics = st.lists(st.text(), max_size=5).map(tuple)


def enc(*elements: str) -> bytes:
    return encode_topic(elements)


@given(topics)
def test_any_topic_maps_to_a_valid_subject_and_back(topic: Tuple[str, ...]) -> None:
    """Dots, spaces, *, >, empty and non-ASCII elements all survive exactly."""
    name = subject("mpubsub", encode_topic(topic))
    tokens = name.split(".")
    assert tokens[0] == "mpubsub" and len(tokens) == 1 + len(topic)
    assert all(NATS_TOKEN.fullmatch(t) for t in tokens)
    assert topic_of(b"mpubsub", name.encode()) == encode_topic(topic)


def test_escaping_examples() -> None:
    """Plain elements stay readable; everything else is _XX; the empty element is _."""
    assert subject("p", enc("sensors", "room-1")) == "p.sensors.room-1"
    assert subject("p", enc("a.b", "*", ">", "", "_", "é")) == "p.a_2Eb._2A._3E._._5F._C3_A9"
    assert subject("org.p", b"") == "org.p"
    assert subject("org.p", enc("a")) == "org.p.a"  # a prefix of several tokens
    assert topic_of(b"org.p", b"org.p.a") == enc("a") and topic_of(b"org.p", b"org.p") == b""
    assert escape(b"x y") == "x_20y"


@pytest.mark.parametrize(
    "name",
    [b"other.a", b"p.a_2", b"p.a_2e", b"p.a..b", b"p.*", b"p._FF", b"p._C3", b"pa", b"p._74"],
)
def test_subjects_no_escape_produces_are_rejected(name: bytes) -> None:
    """Lower-case hex, half escapes, empty tokens, wildcards, bytes that are not UTF-8."""
    with pytest.raises(Rejected):
        topic_of(b"p", name)


def test_envelope_round_trip_and_tampering() -> None:
    """A sealed message opens with the same secret; any change to it does not."""
    signer, verifier = Signer(SECRET, "host-a"), Verifier(SECRET, "host-b")
    body = signer.seal(enc("a", "b"), b"payload", b'{"uid": 7}')
    assert verifier.open(enc("a", "b"), body) == ("host-a", 1, b"payload", b'{"uid": 7}')
    sender_at = body.index(b'{"uid": 7}')
    forged = [
        (enc("a", "b"), body[:sender_at] + b'{"uid": 0}' + body[sender_at + 10 :]),  # sender
        (enc("a", "c"), signer.seal(enc("a", "b"), b"x")),  # moved to another subject
        (enc("a"), signer.seal(enc("a"), b"x")[:-1] + b"y"),  # payload changed
        (enc("a"), Signer(b"other secret", "host-a").seal(enc("a"), b"x")),
        (enc("a"), b"\x01\x06host-a"),  # truncated
        (enc("a"), b"\x80\x03pickle"),  # a bare pickle
    ]
    for topic, body in forged:
        with pytest.raises(Rejected, match=r"bad signature|truncated|not an mpubsub envelope"):
            verifier.open(topic, body)
    sealed = signer.seal(enc("a"), b"x")
    origin_changed = sealed[:2] + b"host-b" + sealed[8:]
    with pytest.raises(Rejected, match="bad signature"):
        verifier.open(enc("a"), origin_changed)


def test_own_messages_and_duplicates_are_dropped() -> None:
    """A host drops its own messages, and any message it has already seen."""
    signer = Signer(SECRET, "host-a")
    first, second = signer.seal(b"", b"1"), signer.seal(b"", b"2")
    with pytest.raises(Rejected, match="our own message"):
        Verifier(SECRET, "host-a").open(b"", first)
    verifier = Verifier(SECRET, "host-b", born=0)  # takes what was sealed before it
    assert verifier.open(b"", second)[1] == 2
    assert verifier.open(b"", first)[1] == 1  # late, but new: taken
    for body in (first, second):
        with pytest.raises(Duplicate):
            verifier.open(b"", body)


def test_envelopes_of_bridges_before_senders_are_still_taken() -> None:
    """A version 2 envelope (no sender sealed in) from a bridge not yet upgraded opens."""
    verifier = Verifier(SECRET, "host-b")
    head = b"".join(
        (
            bytes((2, 6)),
            b"host-a",
            os.urandom(8),
            struct.pack("!QQQ", time.time_ns(), 1, time.time_ns()),
        )
    )
    body = head + Mac(SECRET).sign(enc("a"), head, b"old") + b"old"
    assert verifier.open(enc("a"), body) == ("host-a", 1, b"old", b"")


def test_window_and_restarts() -> None:
    """Too old to tell is dropped; a later start of the origin's bridge starts afresh."""
    signer, verifier = Signer(SECRET, "host-a", started=1), Verifier(SECRET, "host-b")
    old = signer.seal(b"", b"old")
    for _ in range(WINDOW):
        newest = signer.seal(b"", b"")
    verifier.open(b"", newest)
    with pytest.raises(Duplicate):
        verifier.open(b"", old)
    restarted = Signer(SECRET, "host-a", started=2).seal(b"", b"again")
    assert verifier.open(b"", restarted) == ("host-a", 1, b"again", b"")


def test_replays_across_starts_are_dropped() -> None:
    """Envelopes of several starts replayed alternately are each delivered once, ever."""
    starts = [Signer(SECRET, "host-a", started=t) for t in range(1, STARTS + 3)]
    recorded = [[signer.seal(b"", b"%d" % n) for n in range(3)] for signer in starts]
    verifier = Verifier(SECRET, "host-b", born=0)
    delivered = []
    for _ in range(3):
        for n in range(3):
            for bodies in recorded:
                with contextlib.suppress(Rejected):
                    verifier.open(b"", bodies[n])
                    delivered.append(bodies[n])
    assert len(delivered) == len(set(delivered)) == STARTS * 3 + 2
    older = Signer(SECRET, "host-a", started=0).seal(b"", b"x")  # never seen, older
    with pytest.raises(Rejected, match="older than one seen"):
        verifier.open(b"", older)
    for bodies in recorded[:2]:  # forgotten starts: older than the newest, refused
        with pytest.raises(Rejected):
            verifier.open(b"", bodies[0])
    assert verifier.open(b"", starts[-1].seal(b"", b"new"))[2] == b"new"


def test_interest_asks_each_message_once() -> None:
    """Prefix subscriptions become x and x.>, covered ones nothing, broadcasts the prefix."""
    assert interest("p", [], []) == frozenset()
    assert interest("p", [enc("a", "b")], []) == {"p", "p.a.b", "p.a.b.>"}
    assert interest("p", [enc("a"), enc("a", "b"), enc("c")], []) == {
        "p",
        "p.a",
        "p.a.>",
        "p.c",
        "p.c.>",
    }
    assert interest("p", [b"", enc("a")], []) == {"p", "p.>"}
    assert interest("p", [enc("m", "raw"), enc("x")], [enc("m")]) == {"p", "p.x", "p.x.>"}


@given(st.binary(max_size=200), st.binary(), st.binary(), st.binary(max_size=2000))
def test_mac_is_hmac_sha256(key: bytes, topic: bytes, head: bytes, payload: bytes) -> None:
    """Mac gives exactly the standard library's HMAC-SHA256, short and long keys alike."""
    lengths = struct.pack("!III", len(topic), len(head), len(payload))
    message = b"mpubsub federation 1\0" + lengths + topic + head + payload
    assert Mac(key).sign(topic, head, payload) == hmac.digest(key, message, "sha256")


@given(st.binary(max_size=80), st.binary(max_size=200))
def test_anything_from_nats_is_rejected_cleanly(name: bytes, body: bytes) -> None:
    """Arbitrary subjects and bodies raise Rejected, and nothing else."""
    verifier = Verifier(SECRET, "host-b")
    try:
        verifier.open(topic_of(b"mpubsub", b"mpubsub." + name), body)
    except Rejected:
        return
    pytest.fail("an unsigned message was accepted")


def test_a_start_is_stamped_with_the_time() -> None:
    """A bridge start is dated now: a later start is newer than any before it."""
    verifier = Verifier(SECRET, "host-b")
    earlier = Signer(SECRET, "host-a", started=time.time_ns() - 10**9)
    assert verifier.open(b"", earlier.seal(b"", b"1"))[2] == b"1"
    assert verifier.open(b"", Signer(SECRET, "host-a").seal(b"", b"2"))[2] == b"2"
    with pytest.raises(Rejected, match="older than one seen"):
        verifier.open(b"", Signer(SECRET, "host-a", started=time.time_ns() - 10**9).seal(b"", b""))


def test_stale_envelopes_and_restarted_receivers() -> None:
    """Taken: sent since the receiver started and within max_skew of its clock; else refused."""
    now = [10**18]
    signer = Signer(SECRET, "host-a", clock=lambda: now[0])
    before = signer.seal(b"", b"before")
    now[0] += 10**9
    verifier = Verifier(SECRET, "host-b", max_skew=5.0, clock=lambda: now[0])
    with pytest.raises(Rejected, match="sent before this bridge started"):
        verifier.open(b"", before)  # delivered, perhaps, by the receiver's previous start
    fresh = signer.seal(b"", b"fresh")
    assert verifier.open(b"", fresh)[2] == b"fresh"
    with pytest.raises(Duplicate):
        verifier.open(b"", fresh)
    late = signer.seal(b"", b"late")
    now[0] += 5 * 10**9 + 1
    with pytest.raises(Rejected, match="further from now than max_clock_skew"):
        verifier.open(b"", late)  # never seen, but stale: a replay, or clocks apart
    ahead = Signer(SECRET, "host-c", clock=lambda: now[0] + 6 * 10**9).seal(b"", b"ahead")
    with pytest.raises(Rejected, match="further from now than max_clock_skew"):
        verifier.open(b"", ahead)
    behind = Signer(SECRET, "host-c", clock=lambda: now[0] - 4 * 10**9).seal(b"", b"behind")
    assert verifier.open(b"", behind)[2] == b"behind"  # clocks apart within max_skew


def test_arrivals_become_frames_in_each_origins_order_and_the_rest_is_counted() -> None:
    """What NATS brings in one read: verified, sorted back per origin, made PUB frames;
    duplicates, forgeries, local-only topics and messages too big are not passed on."""
    secret = b"s" * 32
    counters = {"duplicates": 0, "dropped_unverified": 0}
    warned = []
    arrivals = Arrivals(
        "mp",
        Verifier(secret, "here"),
        (encode_topic(("private",)),),
        counters,
        lambda message, kind: warned.append(kind),
    )
    a, b = Signer(secret, "a"), Signer(secret, "b")
    topic = encode_topic(("t",))
    subj = subject("mp", topic)
    sealed = [(subj, a.seal(topic, b"a%d" % n, b'{"uid": %d}' % (n // 2))) for n in range(3)]
    inbox = [sealed[2], (subj, b.seal(topic, b"b0")), sealed[0], sealed[1]]
    inbox.append(sealed[1])  # a duplicate
    inbox.append((subj, Signer(b"x" * 32, "c").seal(topic, b"forged")))
    private = encode_topic(("private", "x"))
    inbox.append((subject("mp", private), a.seal(private, b"stays")))
    inbox.append((subj, a.seal(topic, b"y" * 200)))  # over the broker's max_message below
    arrivals.use_limits(proto.Limits(max_message=100))
    frames, count = arrivals.frames(inbox)
    told = [
        proto.pub_parts(frame)[1] if kind == proto.PUB else json.loads(frame[5:])
        for kind, frame in proto.FrameDecoder(1 << 20).feed(frames)
    ]
    # Before each sender's messages, who it is (and on which host), once.
    assert (told, count) == (
        [
            {"uid": 0, "host": "a"},
            b"a0",
            b"a1",
            {"uid": 1, "host": "a"},
            b"a2",
            {"host": "b"},
            b"b0",
        ],
        4,
    )
    again, _ = arrivals.frames([(subj, b.seal(topic, b"b1"))])
    assert proto.kind_of(again) == proto.PUB  # the broker knows who sends it already
    arrivals.use_limits(proto.Limits(max_message=100))  # a new connection: named again
    again, _ = arrivals.frames([(subj, b.seal(topic, b"b2"))])
    assert proto.kind_of(again) == proto.SENDER
    assert counters == {"duplicates": 1, "dropped_unverified": 1}
    assert len(warned) == 2 and warned[-1] == "too big"  # the forgery's, and the large one's


def test_a_sender_the_broker_would_refuse_is_relayed_as_its_host_only() -> None:
    """A sealed sender record that is not one (a string uid, too long...) is not passed
    on: the broker would cut the bridge for it. The host is; an empty origin is refused."""
    secret = b"s" * 32
    counters = {"duplicates": 0, "dropped_unverified": 0}
    arrivals = Arrivals("mp", Verifier(secret, "here"), (), counters, lambda m, k: None)
    arrivals.use_limits(proto.Limits())
    topic = encode_topic(("t",))
    subj = subject("mp", topic)
    a = Signer(secret, "a")
    bad = [b'{"uid": "0"}', b'{"user": ' + b'"x"' * 0 + b'"' + b"y" * 300 + b'"}', b"[1]", b"{"]
    frames, count = arrivals.frames([(subj, a.seal(topic, b"p", body)) for body in bad])
    told = [json.loads(f[5:]) for k, f in proto.FrameDecoder(1 << 20).feed(frames) if k != 6]
    assert count == 4 and told and all(sender == {"host": "a"} for sender in told)
    head = b"".join(  # signed by a holder of the secret, in nobody's name
        (bytes((3, 0)), os.urandom(8), struct.pack("!QQQH", time.time_ns(), 1, time.time_ns(), 0))
    )
    nameless = head + Mac(secret).sign(topic, head, b"p") + b"p"
    assert arrivals.frames([(subj, nameless)])[1] == 0
    assert counters["dropped_unverified"] == 1
