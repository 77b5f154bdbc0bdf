"""The opening of a connection, both roles, as state machines that never touch a socket.

Everything that decides how a connection opens lives here. A connection
opens with multiprocessing.connection's mutual challenge (each side
challenges the other and says WELCOME or FAILURE of its answer: the broker
first), then the client says HELLO and the broker answers WELCOME, with
what it accepts (see ``_protocol``), or ERROR.

``ServerHandshake`` (the broker's side) and ``ClientHandshake`` (the
client's) take the bytes that arrive with ``receive(data)``, and
``data_to_send()`` gives what to send, however the bytes are moved: the
broker's selectors loop, the blocking client, asyncio. Each waits for one
thing from its peer at a time, its ``state``; the order of those states for
each role is the whole of the transitions (``SERVER_STATES``,
``CLIENT_STATES``). A peer's mistake raises AuthenticationError or
ProtocolError, and what the peer should still be told (FAILURE) is left in
``data_to_send()``; after that, the handshake is over.
"""

from __future__ import annotations

import enum
from typing import Optional, Tuple

from . import _protocol as proto
from .errors import AuthenticationError, ProtocolError

#: Seconds a connection has to complete its handshake, unless told otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0

# The broker's answer to HELLO is small; anything larger is not one.
_MAX_WELCOME = 4096


class State(enum.Enum):
    """What a handshake waits for from its peer."""

    THEIR_ANSWER = "their answer to our challenge"
    THEIR_CHALLENGE = "their challenge"
    THEIR_VERDICT = "their verdict on our answer"
    HELLO = "the client's HELLO"
    WELCOME = "the broker's WELCOME"
    DONE = "nothing: the connection is open"
    FAILED = "nothing: the handshake failed"


#: The transitions: each role's states, in the order it goes through them.
SERVER_STATES = (
    State.THEIR_ANSWER,
    State.THEIR_CHALLENGE,
    State.THEIR_VERDICT,
    State.HELLO,
    State.DONE,
)
CLIENT_STATES = (
    State.THEIR_CHALLENGE,
    State.THEIR_VERDICT,
    State.THEIR_ANSWER,
    State.WELCOME,
    State.DONE,
)
# What arrives in multiprocessing's frames (a 4-byte length); the rest in ours.
_MP_STATES = frozenset((State.THEIR_ANSWER, State.THEIR_CHALLENGE, State.THEIR_VERDICT))


class _Handshake:
    """What both roles share: buffering, stepping through the states, the output."""

    _STATES: Tuple[State, ...]

    def __init__(self, authkey: bytes) -> None:
        self._authkey = authkey
        self.state = self._STATES[0]
        self._buf = bytearray()
        self._out = bytearray()
        self._challenge = b""  # the message our challenge asked the peer to sign
        self._proved = False  # both sides proved they hold the key (even if it failed later)
        #: What arrived after the handshake: the first protocol frames.
        self.trailing = b""

    @property
    def done(self) -> bool:
        """True once the connection is open."""
        return self.state is State.DONE

    @property
    def authenticated(self) -> bool:
        """True once both sides proved they hold the key, even if the HELLO then failed:
        the peer may be told why in a protocol frame."""
        return self._proved

    def data_to_send(self) -> bytes:
        """What to send the peer now (and forget): empty if nothing."""
        data, self._out = bytes(self._out), bytearray()
        return data

    def needed(self) -> int:
        """Bytes still missing for the next step (at least 1 until done): a reader may
        ask for exactly that many, and so never read past the handshake."""
        if self.state in (State.DONE, State.FAILED):
            return 0
        header = proto.MP_LEN.size if self.state in _MP_STATES else proto.HEADER.size
        if len(self._buf) < header:
            return header - len(self._buf)
        return header + self._size() - len(self._buf)

    def receive(self, data: bytes) -> None:
        """Take bytes from the peer and step as far as they allow.

        AuthenticationError or ProtocolError if the peer goes wrong: the
        handshake has failed then, and data_to_send() holds what to tell it.
        """
        if self.state in (State.DONE, State.FAILED):
            raise RuntimeError(f"the handshake is over ({self.state.value})")
        self._buf += data
        try:
            while self.state is not State.DONE:
                message = self._next_message()
                if message is None:
                    return
                self._step(message)
                self.state = self._STATES[self._STATES.index(self.state) + 1]
                self._proved = self.state in (State.HELLO, State.WELCOME, State.DONE)
        except (AuthenticationError, ProtocolError):
            self.state = State.FAILED
            raise
        self.trailing, self._buf = bytes(self._buf), bytearray()

    def _size(self) -> int:
        """The size of the body whose header is buffered; ProtocolError if it is not one."""
        if self.state in _MP_STATES:
            (size,) = proto.MP_LEN.unpack_from(self._buf)
            if not 0 <= size <= proto.HANDSHAKE_MAX:
                raise ProtocolError(f"handshake message of {size} bytes")
            return int(size)
        size, kind = proto.HEADER.unpack_from(self._buf)
        return self._frame_size(size, kind)

    def _next_message(self) -> Optional[bytes]:
        """The next whole message (an mp frame's data, or a whole frame), or None yet."""
        header = proto.MP_LEN.size if self.state in _MP_STATES else proto.HEADER.size
        if len(self._buf) < header:
            return None
        end = header + self._size()
        if len(self._buf) < end:
            return None
        message = bytes(self._buf[:end])
        del self._buf[:end]
        return message[header:] if self.state in _MP_STATES else message

    def _challenge_peer(self) -> None:
        framed, self._challenge = proto.new_challenge()
        self._out += framed

    def _check_answer(self, answer: bytes) -> None:
        try:
            proto.verify_answer(self._authkey, self._challenge, answer)
        except AuthenticationError:
            self._out += proto.mp_frame(proto.FAILURE_MSG)
            raise
        self._out += proto.mp_frame(proto.WELCOME_MSG)

    def _frame_size(self, size: int, kind: int) -> int:
        raise NotImplementedError

    def _step(self, message: bytes) -> None:
        raise NotImplementedError


class ServerHandshake(_Handshake):
    """The broker's side: challenge, answer, then take HELLO and answer WELCOME."""

    _STATES = SERVER_STATES

    def __init__(self, authkey: bytes, limits: proto.Limits) -> None:
        super().__init__(authkey)
        self._welcome = proto.frame(proto.WELCOME, proto.welcome_body(limits))
        #: The protocol version the client said HELLO with, once it did.
        self.version = 0
        self._challenge_peer()

    def _frame_size(self, size: int, kind: int) -> int:
        if kind != proto.HELLO:
            raise ProtocolError("expected HELLO")
        if size != proto.HELLO_BODY.size:
            raise ProtocolError("malformed HELLO frame")
        return size

    def _step(self, message: bytes) -> None:
        if self.state is State.THEIR_ANSWER:
            self._check_answer(message)
        elif self.state is State.THEIR_CHALLENGE:
            self._out += proto.answer_challenge(self._authkey, message)
        elif self.state is State.THEIR_VERDICT:
            if message != proto.WELCOME_MSG:
                raise AuthenticationError("the client refused the broker's key")
        else:  # HELLO
            version = proto.hello_version(message)
            if version not in proto.VERSIONS:
                raise ProtocolError(
                    f"unsupported protocol version {version}; this broker speaks "
                    f"{' and '.join(map(str, sorted(proto.VERSIONS)))}"
                )
            self.version = version
            self._out += self._welcome


class ClientHandshake(_Handshake):
    """The client's side: answer, challenge, then say HELLO and read the broker's limits."""

    _STATES = CLIENT_STATES

    def __init__(self, authkey: bytes, version: int = proto.VERSION) -> None:
        super().__init__(authkey)
        self._version = version  # what HELLO says
        #: What the broker accepts, once its WELCOME arrived.
        self.limits: Optional[proto.Limits] = None

    def _frame_size(self, size: int, kind: int) -> int:
        if size > _MAX_WELCOME:
            raise ProtocolError("the broker's answer to HELLO is too long")
        return size

    def _step(self, message: bytes) -> None:
        if self.state is State.THEIR_CHALLENGE:
            self._out += proto.answer_challenge(self._authkey, message)
        elif self.state is State.THEIR_VERDICT:
            if message != proto.WELCOME_MSG:
                raise AuthenticationError("digest sent was rejected")
            self._challenge_peer()
        elif self.state is State.THEIR_ANSWER:
            self._check_answer(message)
            self._out += proto.frame(proto.HELLO, proto.HELLO_BODY.pack(self._version))
        else:  # WELCOME
            kind = proto.kind_of(message)
            if kind == proto.ERROR:
                raise ProtocolError(f"the broker refused: {proto.reason_of(message)}")
            if kind != proto.WELCOME:
                raise ProtocolError("the broker did not answer HELLO")
            self.limits = proto.welcome_limits(proto.body_of(message))
