"""The access policy's rules, without sockets: parsing, matching and deciding (see _policy)."""

from __future__ import annotations

import grp
import multiprocessing.connection as mpc
import os
import pwd
import socket
import threading
from pathlib import Path
from typing import List, Tuple

import pytest

from mpubsub import NetPubSub
from mpubsub import _protocol as proto
from mpubsub._identity import Identity
from mpubsub._policy import Policy
from mpubsub.broker import Broker
from mpubsub.errors import ProtocolError

from .conftest import session_on

NOBODY = pwd.getpwnam("nobody")
USERS = grp.getgrnam("users").gr_gid


def topic(text: str) -> bytes:
    return proto.encode_topic(tuple(text.strip("/").split("/")) if text.strip("/") else ())


def nobody(*groups: int) -> Identity:
    return Identity(
        "unix",
        uid=NOBODY.pw_uid,
        gid=NOBODY.pw_gid,
        groups=frozenset((NOBODY.pw_gid, *groups)),
        user="nobody",
        account=f"uid {NOBODY.pw_uid}",
    )


ROOT = Identity("unix", uid=0, gid=0, groups=frozenset((0,)), user="root", account="uid 0")
TCP = Identity("tcp", address=("127.0.0.1", 5000), account="127.0.0.1")
FEDERATION = Identity("federation")


def may(lines: List[Tuple[str, str]], who: Identity, right: str, text: str) -> bool:
    return Policy.parse(lines).access(who).may(right, topic(text))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (("nobody", "x"), r"^'nobody' is not 'SUBJECT RIGHT'"),
        (("user:nobody read", "x"), r"^unknown right 'read': publish, subscribe or admin$"),
        (("someone publish", "x"), r"^unknown subject 'someone': user:NAME, group:NAME"),
        (("uid:x publish", "x"), r"^'uid:x': a uid is a number$"),
        (("user:no-such-user-here publish", "x"), r"^'user:no-such-user-here': no such user$"),
        (("group:no-such-group-here publish", "x"), r"^'group:no-such-group-here': no such group$"),
        (("* publish", "a, !"), r"^an empty topic: write / for every topic$"),
        (("default", "maybe"), r"^default must be allow or deny, not 'maybe'$"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: Tuple[str, str], message: str) -> None:
    """Each mistake in a rule is one sentence naming it."""
    with pytest.raises(ValueError, match=message):
        Policy.parse([line])


def test_each_subject_is_whom_it_says() -> None:
    """user:, uid:, group: (supplementary too), tcp, federation and * match their clients."""
    allow_all = [("default", "allow")]
    for subject, matched in [
        ("user:nobody", [nobody(), nobody(USERS)]),
        (f"uid:{NOBODY.pw_uid}", [nobody(), nobody(USERS)]),
        ("group:users", [nobody(USERS)]),
        ("tcp", [TCP]),
        ("federation", [FEDERATION]),
        ("*", [nobody(), nobody(USERS), TCP, FEDERATION]),
    ]:
        lines = [*allow_all, (f"{subject} publish", "!/")]
        for who in [nobody(), nobody(USERS), TCP, FEDERATION]:
            assert may(lines, who, "publish", "a") == (who not in matched), (subject, who)


def test_the_longest_prefix_decides_and_a_deny_wins_a_tie() -> None:
    """sensor allowed, sensor/secret denied, sensor/secret/ok allowed again; ties deny."""
    lines = [
        ("default", "deny"),
        ("* subscribe", "sensor, !sensor/secret"),
        ("user:nobody subscribe", "sensor/secret/ok"),
        ("group:users subscribe", "alarm"),
        ("user:nobody publish", "alarm"),
    ]
    who = nobody(USERS)
    assert may(lines, who, "subscribe", "sensor/t")
    assert not may(lines, who, "subscribe", "sensor/secret")
    assert not may(lines, who, "subscribe", "sensor/secret/x")
    assert may(lines, who, "subscribe", "sensor/secret/ok/deeper")
    assert not may(lines, who, "subscribe", "other")  # default
    assert may(lines, who, "subscribe", "alarm")
    tie = [("default", "allow"), ("user:nobody publish", "a"), ("group:users publish", "!a")]
    assert not may(tie, who, "publish", "a/b")
    assert may(tie, who, "publish", "b")


def test_broadcast_and_catch_all_need_the_root_topic() -> None:
    """A rule on / decides for the broadcast; one on a topic does not."""
    lines = [("default", "deny"), ("* publish", "a"), ("* subscribe", "/")]
    assert not may(lines, nobody(), "publish", "/")
    assert may(lines, nobody(), "publish", "a")
    assert may(lines, nobody(), "subscribe", "/")
    assert not may([("* publish", "!/")], nobody(), "publish", "/")


def test_root_may_do_everything_but_speak_for_other_hosts() -> None:
    """uid 0 passes every rule; the federation subject is never uid 0's exemption."""
    lines = [("default", "deny"), ("* publish", "!/"), ("* admin", "!/")]
    assert may(lines, ROOT, "publish", "a") and may(lines, ROOT, "admin", "/")
    relayed = Identity("federation", uid=0, host="elsewhere")
    assert not may(lines, relayed, "publish", "a")
    assert may([("user:root publish", "!/")], relayed, "publish", "a")  # not root's rule


def test_rights_no_rule_restricts_cost_no_check() -> None:
    """A right with nothing denied has no cache to ask (None); one restricted has one."""
    access = Policy.parse([("user:nobody publish", "!secret")]).access(nobody())
    assert access.checks["subscribe"] is None
    checks = access.checks["publish"]
    assert checks is not None
    assert not checks[topic("secret/x")] and checks[topic("open")]
    assert Policy.parse([("default", "deny")]).access(nobody()).checks["admin"] is not None


def test_a_restricted_publisher_cannot_fill_its_cache_with_junk(tmp_path: Path) -> None:
    """Topics over the limits are refused (ProtocolError) before a restricted client's
    answers keep them."""
    broker = Broker(
        str(tmp_path / "b.sock"),
        b"k" * 32,
        policy=Policy.parse([("default", "deny"), ("* publish", "a")]),
    )
    left, right = socket.socketpair()
    with left, right:
        who = Identity("unix", uid=os.getuid() or 65534, account="uid 65534")
        client = session_on(left, 1, who, broker._exchange.policy.access(who))
        exchange = broker._exchange
        huge = proto.encode_topic(("x" * 10_000,))
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            exchange.handle(client, [(proto.PUB, proto.pub_frame(huge, b"p"))], 100)
        assert client.publishable is not None and huge not in client.publishable
        exchange.handle(client, [(proto.PUB, proto.pub_frame(topic("b"), b"p"))], 100)
        assert client.denied == 1 and client.publishable == {topic("b"): False}
    broker.close()


def test_admin_comes_from_its_rules_once_there_are_rules() -> None:
    """default decides publish and subscribe; admin only without any rule at all."""
    assert may([], nobody(), "admin", "/") and may([("default", "allow")], nobody(), "admin", "/")
    ruled = [("default", "allow"), ("tcp publish", "!/")]
    assert may(ruled, nobody(), "publish", "a") and may(ruled, nobody(), "subscribe", "a")
    assert not may(ruled, nobody(), "admin", "/")
    assert may([*ruled, ("user:nobody admin", "/")], nobody(), "admin", "/")
    assert not may([("default", "deny")], nobody(), "admin", "/")


def test_a_publisher_denied_any_topic_may_not_broadcast() -> None:
    """A broadcast reaches every subscriber, those of topics denied to its publisher too:
    it needs publish on / and no publish denied to that client."""
    assert not may([("* publish", "!admin")], nobody(), "publish", "/")
    assert may([("* publish", "!admin")], nobody(), "publish", "a")
    assert may([("tcp publish", "!admin")], nobody(), "publish", "/")  # not its rule
    assert not may([("default", "deny"), ("* publish", "/, !a")], nobody(), "publish", "/")
    assert may([("default", "deny"), ("* publish", "/")], nobody(), "publish", "/")


def test_a_clients_answers_are_bounded_in_bytes() -> None:
    """The answers one client keeps are bounded by their topics' bytes, not their number."""
    checks = Policy.parse([("* publish", "!x")]).access(nobody()).checks["publish"]
    assert checks is not None
    for n in range(2000):
        assert checks[proto.encode_topic((f"{n:04}" + "y" * 4000,))]
    assert sum(len(topic) for topic in checks) <= 64 * 1024


def test_a_reload_reaches_connections_still_authenticating(tmp_path: Path) -> None:
    """A policy changed while a connection authenticates holds for it once it is in."""
    broker = Broker(("127.0.0.1", 0), b"k" * 32)
    thread = threading.Thread(target=broker.start)
    thread.start()
    try:
        with (
            mpc.Client(broker.address, authkey=b"k" * 32) as conn,  # authenticated, no HELLO
            socket.socket(fileno=os.dup(conn.fileno())) as sock,
        ):
            changed = threading.Event()

            def reload() -> None:
                broker.reconfigure(policy=Policy.parse([("tcp publish", "!a")]))
                changed.set()

            broker.schedule(reload)
            assert changed.wait(10)
            sock.sendall(proto.frame(proto.HELLO, proto.HELLO_BODY.pack(proto.VERSION)))
            sock.sendall(proto.pub_frame(topic("a"), b"x") + proto.frame(proto.PING, b""))
            decoder, kinds = proto.FrameDecoder(1 << 20), []
            sock.settimeout(10)
            while proto.PONG not in kinds:
                kinds += [kind for kind, _ in decoder.feed(sock.recv(65536))]
        assert kinds == [proto.WELCOME, proto.DENIED, proto.PONG]
    finally:
        broker.stop()
        thread.join(10)


def test_a_publisher_warns_once_per_topic_and_raises_at_each_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each flush after a refused publish raises; the WARNING is logged once per topic."""
    broker = Broker(("127.0.0.1", 0), b"k" * 32, policy=Policy.parse([("tcp publish", "!a")]))
    thread = threading.Thread(target=broker.start)
    thread.start()
    try:
        with NetPubSub(broker.address, b"k" * 32) as pubsub:
            for _ in range(3):
                pubsub.publish("a", n=1)
                with pytest.raises(PermissionError, match=r"^the broker refused to publish on a: "):
                    pubsub.flush()
            pubsub.publish("b", n=1)
            assert pubsub.flush()
    finally:
        broker.stop()
        thread.join(10)
    warned = [r for r in caplog.records if r.name == "mpubsub.net.refused"]
    assert [r.getMessage() for r in warned] == [
        "the broker refused to publish on a: the policy forbids it"
    ]
