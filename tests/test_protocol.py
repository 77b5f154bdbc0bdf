"""Tests for mpubsub._protocol, fuzzed with hypothesis: only ProtocolError escapes."""

from __future__ import annotations

import contextlib
import struct
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpubsub import ProtocolError
from mpubsub import _protocol as proto

topics = st.lists(st.text(max_size=8), max_size=4).map(tuple)
frames = st.one_of(
    st.builds(proto.pub_frame, topics.map(proto.encode_topic), st.binary(max_size=64)),
    st.builds(proto.frame, st.sampled_from(sorted(proto.FRAME_TYPES)), st.binary(max_size=64)),
)


def chunked(data: bytes, cuts: List[int]) -> Iterator[bytes]:
    """*data* cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        yield data[start:end]


@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=8))
def test_decoder_raises_only_protocol_error(data: bytes, cuts: List[int]) -> None:
    """Arbitrary bytes, arbitrarily chunked: frames or ProtocolError, nothing else."""
    decoder = proto.FrameDecoder(max_body=1024)
    try:
        for chunk in chunked(data, cuts):
            for kind, frame in decoder.feed(chunk):
                assert kind in proto.FRAME_TYPES and len(frame) >= 5
    except ProtocolError:
        pass


@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 4096), max_size=12))
def test_valid_streams_decode_the_same_whatever_the_chunking(
    stream: List[bytes], cuts: List[int]
) -> None:
    """A stream of valid frames decodes to exactly those frames, however it arrives."""
    decoder = proto.FrameDecoder(max_body=1 << 20)
    decoded: List[Tuple[int, bytes]] = []
    for chunk in chunked(b"".join(stream), cuts):
        decoded += decoder.feed(chunk)
    assert [frame for _, frame in decoded] == stream
    assert decoder.buffered == 0


@given(topics)
def test_topics_round_trip_and_prefixes(topic: Tuple[str, ...]) -> None:
    """Any tuple of strings encodes and decodes back; its prefixes are its byte prefixes."""
    encoded = proto.encode_topic(topic)
    assert proto.decode_topic(encoded) == topic
    expected = [proto.encode_topic(topic[:n]) for n in range(1, len(topic) + 1)]
    assert [encoded[:end] for end in proto.prefix_ends(encoded)] == expected


@given(st.binary(max_size=64))
def test_decode_topic_raises_only_protocol_error(data: bytes) -> None:
    """A malformed encoded topic is a ProtocolError."""
    with contextlib.suppress(ProtocolError):
        proto.decode_topic(data)


def test_encode_topic_refuses_non_strings() -> None:
    """Topic elements that are not strings cannot travel."""
    with pytest.raises(TypeError, match=r"^topic elements must be strings"):
        proto.encode_topic(("a", 1))  # type: ignore[arg-type]


def test_welcome_carries_the_limits_and_old_brokers_are_understood() -> None:
    """WELCOME round-trips every limit; a 10-byte WELCOME (older broker) has its size, no caps."""
    limits = proto.Limits(1000, 7, 300, 42, 5000)
    assert proto.welcome_limits(proto.welcome_body(limits)) == limits
    old = proto.welcome_limits(struct.pack("!HQ", 1, 12345))
    assert old.max_message == 12345
    assert min(old[1:]) >= 2**31 - 1
    with pytest.raises(ProtocolError):
        proto.welcome_limits(b"\x00" * 11)


def test_reports_are_checked_field_by_field() -> None:
    """A FEDERATION report: known figures only, strings up to 256, counts below 2**63."""

    def report(**figures: object) -> Dict[str, Any]:
        return proto.federation_figures(proto.federation_frame(figures))

    largest = {"state": "x" * 256, "reconnects": (1 << 63) - 1, "forwarded_in": 0}
    assert report(**largest) == largest
    for bad in (
        {"state": "x" * 257},
        {"reconnects": 1 << 63},
        {"reconnects": -1},
        {"reconnects": True},
        {"server": None},
        {"pwned": 1},
    ):
        with pytest.raises(ProtocolError, match=r"^FEDERATION frame holds"):
            report(**bad)


@pytest.mark.parametrize("size", range(5, 9))
def test_a_pub_frame_too_short_for_its_topic_length_is_truncated(size: int) -> None:
    """pub_topic and pub_parts refuse a frame that cannot hold the topic's length."""
    frame = proto.frame(proto.PUB, b"\x00" * (size - 5))
    for read in (proto.pub_topic, proto.pub_parts):
        with pytest.raises(ProtocolError, match=r"^truncated PUB frame$"):
            read(frame)
