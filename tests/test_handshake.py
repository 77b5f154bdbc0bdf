"""Tests for mpubsub._handshake: both roles, fed bytes, no sockets."""

from __future__ import annotations

import contextlib
import hmac
import inspect
import os
import subprocess
import sys
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpubsub import AuthenticationError, Broker, ProtocolError
from mpubsub import _protocol as proto
from mpubsub._handshake import (
    CLIENT_STATES,
    DEFAULT_HANDSHAKE_TIMEOUT,
    SERVER_STATES,
    ClientHandshake,
    ServerHandshake,
    State,
)
from mpubsubd._config import Config

from .test_protocol import chunked

LIMITS = proto.Limits(1000, 7, 300, 42, 5000)


def converse(
    server: ServerHandshake, client: ClientHandshake, chunk: int = 1 << 20
) -> List[Tuple[State, State]]:
    """Pass bytes between the two, *chunk* at a time, until neither has any; the states seen."""
    seen = [(server.state, client.state)]
    to_client = server.data_to_send()
    to_server = b""
    while to_client or to_server:
        for start in range(0, len(to_client), chunk):
            client.receive(to_client[start : start + chunk])
        for start in range(0, len(to_server), chunk):
            server.receive(to_server[start : start + chunk])
        to_client, to_server = server.data_to_send(), client.data_to_send()
        seen.append((server.state, client.state))
    return seen


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_both_roles_open_a_connection_through_every_state(chunk: int) -> None:
    """A server and a client with one key get to DONE, each through its states in order,
    and the client learns the server's limits; byte by byte as well as whole."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
    seen = converse(server, client, chunk)
    assert server.done and client.done
    assert client.limits == LIMITS
    servers, clients = [s for s, _ in seen], [c for _, c in seen]
    assert servers == sorted(servers, key=SERVER_STATES.index)
    assert clients == sorted(clients, key=CLIENT_STATES.index)
    assert set(clients) == set(CLIENT_STATES)  # one message a round for the client
    assert server.trailing == client.trailing == b""


def test_what_follows_the_hello_is_kept_for_the_protocol() -> None:
    """Frames that arrive with the HELLO are not lost: they are the handshake's trailing bytes."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())  # our answer
    client.receive(server.data_to_send())  # WELCOME, and their challenge
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    ping = proto.frame(proto.PING, b"")
    server.receive(client.data_to_send() + ping)
    assert server.done and server.trailing == ping


def test_needed_never_asks_past_the_handshake() -> None:
    """Reading exactly needed() bytes at a time, a client reads the WELCOME and nothing more."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
    stream = bytearray(server.data_to_send())
    while not client.done:
        want = client.needed()
        assert 1 <= want <= len(stream)
        client.receive(bytes(stream[:want]))
        del stream[:want]
        reply = client.data_to_send()
        if reply:
            server.receive(reply)
            stream += server.data_to_send()
    assert client.needed() == 0 and not stream


def test_a_wrong_key_fails_both_ways_with_failure_for_the_peer() -> None:
    """The server refuses a client's wrong key, and a client a server's, with FAILURE sent."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"other")
    client.receive(server.data_to_send())
    with pytest.raises(AuthenticationError, match=r"^digest received was wrong$"):
        server.receive(client.data_to_send())
    assert server.data_to_send() == proto.mp_frame(proto.FAILURE_MSG)
    assert server.state is State.FAILED and not server.authenticated
    with pytest.raises(AuthenticationError, match=r"^digest sent was rejected$"):
        client.receive(proto.mp_frame(proto.FAILURE_MSG))
    with pytest.raises(RuntimeError, match=r"^the handshake is over"):
        server.receive(b"more")


def test_a_client_refuses_a_server_without_the_key() -> None:
    """A server that cannot answer the client's challenge is refused by the client."""
    client = ClientHandshake(b"key")
    challenge = b"{sha256}" + os.urandom(40)
    client.receive(proto.mp_frame(proto.CHALLENGE + challenge))
    client.data_to_send()
    client.receive(proto.mp_frame(proto.WELCOME_MSG))
    theirs = client.data_to_send()[4 + len(proto.CHALLENGE) :]
    forged = b"{sha256}" + hmac.new(b"guess", theirs, "sha256").digest()
    with pytest.raises(AuthenticationError):
        client.receive(proto.mp_frame(forged))
    assert client.data_to_send() == proto.mp_frame(proto.FAILURE_MSG)


def test_a_client_answers_a_legacy_broker() -> None:
    """A broker of Python < 3.12 challenges with 20 bytes: answered with HMAC-MD5."""
    client = ClientHandshake(b"key")
    legacy = os.urandom(20)
    client.receive(proto.mp_frame(proto.CHALLENGE + legacy))
    assert client.data_to_send() == proto.mp_frame(hmac.new(b"key", legacy, "md5").digest())


def test_the_server_refuses_what_is_not_hello() -> None:
    """After authentication, anything but a well-formed HELLO of this version is refused."""
    for frame, message in (
        (proto.frame(proto.PING, b""), r"^expected HELLO$"),
        (proto.frame(proto.HELLO, b"\x00"), r"^malformed HELLO frame$"),
        (proto.frame(proto.HELLO, b"\x00\x09"), r"^unsupported protocol version 9;"),
    ):
        server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
        client.receive(server.data_to_send())
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
        server.receive(client.data_to_send())
        assert server.state is State.THEIR_VERDICT
        server.receive(proto.mp_frame(proto.WELCOME_MSG))
        assert server.authenticated
        with pytest.raises(ProtocolError, match=message):
            server.receive(frame)
        assert server.authenticated  # the broker may say why in an ERROR frame


def test_the_client_reports_a_refusal_or_a_wrong_answer_to_hello() -> None:
    """An ERROR says why, printably; another frame, or a huge one, is not a WELCOME."""
    for answer, message in (
        (proto.frame(proto.ERROR, b"full\x1b[2J"), r"^the broker refused: full\\x1b\[2J$"),
        (proto.frame(proto.PONG, b""), r"^the broker did not answer HELLO$"),
        (proto.HEADER.pack(5000, proto.WELCOME), r"^the broker's answer to HELLO is too long$"),
    ):
        server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
        converse_until_welcome(server, client)
        with pytest.raises(ProtocolError, match=message):
            client.receive(answer)


def converse_until_welcome(server: ServerHandshake, client: ClientHandshake) -> None:
    """Authenticate both; the client has said HELLO and waits for WELCOME."""
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    client.data_to_send()
    assert client.state is State.WELCOME


def test_an_oversized_handshake_message_is_refused_from_its_length() -> None:
    """A length over multiprocessing's 256 bytes is refused before the bytes arrive."""
    server = ServerHandshake(b"key", LIMITS)
    with pytest.raises(ProtocolError, match=r"^handshake message of 100000 bytes$"):
        server.receive(proto.MP_LEN.pack(100_000))


@settings(deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 1024), max_size=8), st.booleans())
def test_garbage_raises_only_protocol_errors(
    data: bytes, cuts: List[int], answer_first: bool
) -> None:
    """Either role, fed arbitrary chunks (after a right first step or not), fails cleanly."""
    server = ServerHandshake(b"key", LIMITS)
    client = ClientHandshake(b"key")
    stream = data
    if answer_first:  # a valid first step, then garbage
        client.receive(server.data_to_send())
        stream = client.data_to_send() + data
    for opening in (server, client):
        with contextlib.suppress(ProtocolError, AuthenticationError):
            for chunk in chunked(stream, cuts):
                opening.receive(chunk)


def test_a_hello_of_the_wrong_size_is_refused_from_its_header() -> None:
    """A HELLO announcing a body it cannot have is refused before any of it arrives:
    an authenticated peer cannot make the broker buffer a huge opening."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    server.receive(proto.mp_frame(proto.WELCOME_MSG))
    assert server.state is State.HELLO
    with pytest.raises(ProtocolError, match=r"^malformed HELLO frame$"):
        server.receive(proto.HEADER.pack(10**6, proto.HELLO))


def test_only_a_welcome_answers_hello() -> None:
    """Another frame with a body the size of a WELCOME's is not taken for one."""
    server, client = ServerHandshake(b"key", LIMITS), ClientHandshake(b"key")
    converse_until_welcome(server, client)
    impostor = proto.frame(proto.PONG, proto.welcome_body(LIMITS))
    with pytest.raises(ProtocolError, match=r"^the broker did not answer HELLO$"):
        client.receive(impostor)
    assert client.limits is None


def test_one_default_handshake_timeout_everywhere() -> None:
    """The broker, python -m mpubsub.broker and mpubsubd.conf all default to 5 s."""
    assert DEFAULT_HANDSHAKE_TIMEOUT == 5.0  # as docs/reliability.md says
    assert inspect.signature(Broker).parameters["timeout"].default == DEFAULT_HANDSHAKE_TIMEOUT
    assert Config().handshake_timeout == DEFAULT_HANDSHAKE_TIMEOUT
    usage = subprocess.run(
        [sys.executable, "-m", "mpubsub.broker", "--help"], capture_output=True, text=True
    ).stdout
    assert "(default: 5.0)" in " ".join(usage.split()).split("--handshake-timeout", 1)[1]
