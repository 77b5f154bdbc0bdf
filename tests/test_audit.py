"""Policy, sender and quota details that mutation testing showed untested: without sockets
to a broker process, one exchange, its sessions and its checks (see _exchange, _identity)."""

from __future__ import annotations

import json
import pickle
import pwd
import socket
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from mpubsub import NetPubSub, Sender, current_sender
from mpubsub import _protocol as proto
from mpubsub._identity import Identity, relayed, sender_of
from mpubsub._policy import Policy
from mpubsub._session import Session
from mpubsub.broker import Broker
from mpubsub.errors import ProtocolError
from mpubsubd._config import Config
from mpubsubd._federation import Arrivals, Signer, Verifier, relayed_sender, subject
from mpubsubd._privileges import Reloaded

from .conftest import BRIDGE_KEY, session_on

NOBODY = pwd.getpwnam("nobody")
WHO = Identity("unix", uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, user="nobody", account="uid nobody")


def topic(text: str) -> bytes:
    return proto.encode_topic(tuple(text.split("/")))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker never started: its exchange is driven frame by frame."""
    made = Broker(str(tmp_path / "b.sock"), b"k" * 32, bridge_key=BRIDGE_KEY)
    yield made
    made.close()


@pytest.fixture
def sessions(broker: Broker) -> Iterator[List[Session]]:
    """Three of nobody's connections, which the exchange takes for all its clients."""
    pairs = [socket.socketpair() for _ in range(3)]
    made = [
        session_on(left, n, WHO, broker._exchange.policy.access(WHO))
        for n, (left, _) in enumerate(pairs)
    ]
    broker._exchange._clients = lambda: made
    yield made
    for pair in pairs:
        for sock in pair:
            sock.close()


def kinds(session: Session) -> List[int]:
    return [proto.kind_of(frame) for frame in session.out]


def test_a_reload_that_forbids_a_subscription_stops_its_cached_route(
    broker: Broker, sessions: List[Session]
) -> None:
    """Routes computed under the old policy are not used under the new one."""
    publisher, subscriber, _ = sessions
    exchange = broker._exchange
    exchange.handle(subscriber, [(proto.SUB, proto.frame(proto.SUB, topic("a")))], 100)
    exchange.handle(publisher, [(proto.PUB, proto.pub_frame(topic("a"), b"1"))], 100)
    assert kinds(subscriber) == [proto.PUB]  # the route of a is cached now
    subscriber.out.clear()
    exchange.set_policy(Policy.parse([("user:nobody subscribe", "!a")]))
    exchange.handle(publisher, [(proto.PUB, proto.pub_frame(topic("a"), b"2"))], 100)
    assert kinds(subscriber) == []


def test_a_refusal_is_told_again_after_a_reload(broker: Broker, sessions: List[Session]) -> None:
    """Once per topic between flushes; a reload starts afresh too, without a flush."""
    publisher = sessions[0]
    publisher.stamped = True
    exchange = broker._exchange
    exchange.set_policy(Policy.parse([("user:nobody publish", "!a")]))
    refused = [(proto.PUB, proto.pub_frame(topic("a"), b"x"))]
    exchange.handle(publisher, refused * 2, 100)
    assert kinds(publisher) == [proto.DENIED]
    exchange.set_policy(Policy.parse([("user:nobody publish", "!a"), ("* admin", "!a")]))
    exchange.handle(publisher, refused, 100)
    assert kinds(publisher) == [proto.DENIED] * 2
    assert publisher.denied == 3


def test_a_version_1_client_is_refused_without_a_denied_frame(
    broker: Broker, sessions: List[Session]
) -> None:
    """DENIED is a version 2 frame: a client that said HELLO 1 is only counted and logged."""
    client = sessions[0]
    assert not client.stamped
    broker._exchange.set_policy(Policy.parse([("user:nobody publish", "!a")]))
    broker._exchange.handle(client, [(proto.PUB, proto.pub_frame(topic("a"), b"x"))], 100)
    assert client.denied == 1 and kinds(client) == []


def test_the_bridges_sender_must_name_a_host(broker: Broker, sessions: List[Session]) -> None:
    """What the bridge relays is another host's: a SENDER of it without the host is refused."""
    bridge = sessions[0]
    exchange = broker._exchange
    exchange.handle(bridge, [(proto.BRIDGE, proto.frame(proto.BRIDGE, BRIDGE_KEY))], 10)
    named = proto.frame(proto.SENDER, b'{"uid": 7, "host": "elsewhere"}')
    exchange.handle(bridge, [(proto.SENDER, named)], 10)
    assert sender_of(proto.body_of(bridge.stamp)) == Sender(uid=7, host="elsewhere")
    for body in (b'{"uid": 7}', b'{"uid": 7, "host": ""}'):
        with pytest.raises(ProtocolError, match="names no host"):
            exchange.handle(bridge, [(proto.SENDER, proto.frame(proto.SENDER, body))], 10)


def test_what_waits_for_the_bridge_is_the_federations(
    broker: Broker, sessions: List[Session]
) -> None:
    """Once a client is the bridge, its connection and what waits for it are charged to
    the federation, not to the user it runs as (whose other connections it would crowd)."""
    bridge = sessions[0]
    accounts = broker._exchange.accounts
    accounts.connected(bridge.peer)
    user = bridge.peer
    before = accounts[user].connections
    broker._exchange.handle(bridge, [(proto.BRIDGE, proto.frame(proto.BRIDGE, BRIDGE_KEY))], 10)
    assert bridge.peer == "federation" and accounts["federation"].connections == 1
    assert accounts[user].connections == before - 1


def test_what_the_bridge_relays_is_never_root(broker: Broker) -> None:
    """A sender relayed from uid 0 on another host has the federation subject's rights only."""
    policy = Policy.parse([("default", "deny"), ("federation publish", "shared")])
    access = policy.access(relayed(Sender(uid=0, user="root"), "elsewhere"))
    assert access.may("publish", topic("shared/x"))
    assert not access.may("publish", topic("private"))


@pytest.mark.parametrize(
    "body",
    [
        b'{"uid": true}',
        b'{"gid": false}',
        b'{"pid": 1.0}',
        b'{"uid": 4294967296}',
        b'{"uid": -2147483649}',
        b'{"user": 5}',
        b'{"host": "' + b"h" * 257 + b'"}',
        b'{"address": ["h", "80"]}',
        b'{"address": ["h", 80, 1]}',
        b'{"address": ["h", true]}',
        b"[]",
        b"not json",
        json.dumps({"uid": 1, "padding": "x" * 1100}).encode(),  # valid, but too long
    ],
)
def test_a_bad_sender_is_refused(body: bytes) -> None:
    """sender_of takes only a small object of numbers and short names."""
    with pytest.raises(ProtocolError, match="SENDER frame"):
        sender_of(body)


def test_a_good_sender_is_read() -> None:
    body = b'{"uid": 0, "gid": 4294967295, "pid": -1, "user": "u", "address": ["::1", 5]}'
    assert sender_of(body) == Sender(uid=0, gid=2**32 - 1, pid=-1, user="u", address=("::1", 5))


def test_shedding_a_sender_frame_names_the_sender_again() -> None:
    """After shed() dropped messages (and the SENDER before them), the next message is
    preceded by its sender's SENDER, even when it is the sender last queued."""
    left, right = socket.socketpair()
    with left, right:
        session = session_on(left, 1, WHO, Policy().access(WHO))
        stamp = WHO.stamp()
        first = proto.pub_frame(b"a\xff", b"first")
        frames = [first, stamp, proto.pub_frame(b"a\xff", b"1"), proto.pub_frame(b"a\xff", b"2")]
        session.out.extend(frames)
        session.out_size = sum(map(len, frames))
        session.last_stamp = stamp
        assert session.shed(0) == 2
        assert list(session.out) == [first]
        assert session.last_stamp is None and session.dropped == 2


def test_a_badly_named_sender_is_nobody(tmp_path: Path) -> None:
    """After a SENDER frame the client cannot read, messages have no sender (None), not
    the sender named before it."""
    pubsub = NetPubSub(str(tmp_path / "b.sock"), b"key")
    got: List[Optional[Sender]] = []
    pubsub.add_subscriber(("t",), lambda topic, **message: got.append(current_sender()), weak=False)
    message = proto.pub_frame(topic("t"), pickle.dumps({"n": 1}))
    pubsub._dispatch(
        [
            proto.frame(proto.SENDER, b'{"uid": 5}'),
            message,
            proto.frame(proto.SENDER, b'{"uid": "five"}'),
            message,
        ]
    )
    assert got == [Sender(uid=5), None]


def test_each_origins_messages_are_named_with_its_host() -> None:
    """Two hosts' publishers stamped alike by their brokers are still two senders."""
    secret = b"s" * 32
    arrivals = Arrivals(
        "mp", Verifier(secret, "here"), (), {"duplicates": 0, "dropped_unverified": 0}, print
    )
    a, b = Signer(secret, "a"), Signer(secret, "b")
    t = topic("t")
    subj = subject("mp", t)
    same = b'{"uid": 1000}'
    frames, count = arrivals.frames(
        [(subj, a.seal(t, b"a0", same)), (subj, b.seal(t, b"b0", same))]
    )
    told = [
        proto.pub_parts(frame)[1] if kind == proto.PUB else json.loads(frame[5:])
        for kind, frame in proto.FrameDecoder(1 << 20).feed(frames)
    ]
    assert (told, count) == (
        [{"uid": 1000, "host": "a"}, b"a0", {"uid": 1000, "host": "b"}, b"b0"],
        2,
    )


def test_a_host_cannot_speak_for_another() -> None:
    """The host a relayed sender names is the envelope's origin, whatever its sender says."""
    assert json.loads(relayed_sender("a", b'{"uid": 1, "host": "b"}')) == {"uid": 1, "host": "a"}
    assert json.loads(relayed_sender("a", b"[1]")) == {"host": "a"}


def test_a_reloaded_policy_crosses_from_the_privileged_process() -> None:
    """What the privileged process read is what the daemon gets: the [access] rules too."""
    policy = Policy.parse([("default", "deny"), ("user:nobody publish", "a, !a/b")])
    config = Config(policy=policy)
    back = Reloaded.from_json(Reloaded(config, [], ["w"]).to_json())
    assert back.config is not None and back.config.policy == policy
    assert back.config == config and back.warnings == ["w"]
