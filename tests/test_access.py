"""The broker's access policy, its clients' identities and per-user quotas, with real processes:
mpubsubd with an ``[access]`` section, clients run as root, as nobody, and as nobody in users."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

import pytest

from mpubsub import NetPubSub, Sender, current_sender

from . import needs, test_daemon
from .conftest import wait_for
from .processes import free_port, stop_process
from .test_daemon import Daemon, log_has

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
mpubsubd = test_daemon.mpubsubd  # its fixture: a daemon configuration, always stopped

# A client run as nobody: it follows its plan, a JSON list of steps, and says what each
# did on a line of JSON (with its pid). Topics are written as mpubsubd.conf writes them.
CLIENT = r"""
import dataclasses, json, logging, os, sys, time
from mpubsub import NetPubSub, current_sender

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
credentials, plan = sys.argv[1], json.loads(sys.argv[2])
pubsub = NetPubSub.from_file(credentials, timeout=5)
pubsub.connect()
got, held = [], []

def say(**what):
    print(json.dumps(dict(pid=os.getpid(), **what)), flush=True)

def topic_of(text):
    return tuple(part for part in text.split("/") if part)

def record(topic, **message):
    sender = current_sender()
    got.append(["/".join(topic) or "/", sender and dataclasses.asdict(sender)])

def flushed(client):
    try:
        return client.flush()
    except PermissionError as exc:
        return f"PermissionError: {exc}"

for step, *args in plan:
    if step == "sub":  # subscribe to each topic, then flush
        for text in args:
            pubsub.add_subscriber(topic_of(text), record, weak=False)
        say(sub=flushed(pubsub))
    elif step == "pub":  # publish on each topic, each followed by a flush
        outcomes = []
        for text in args:
            pubsub.publish(topic_of(text), n=len(outcomes))
            outcomes.append([text, flushed(pubsub)])
        say(pub=outcomes)
    elif step == "wait":  # deliver until a message on args[0] came (8 s at most)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not any(g[0] == args[0] for g in got):
            pubsub.poll(0.05)
        say(got=got)
    elif step == "clients":
        try:
            say(clients=[[c["uid"], c["pid"]] for c in pubsub.broker_clients()])
        except PermissionError as exc:
            say(clients=f"PermissionError: {exc}")
    elif step == "connect":  # open connections until one is refused (args[0] at most)
        error = None
        while len(held) < args[0] and error is None:
            try:
                held.append(NetPubSub.from_file(credentials, timeout=5))
                held[-1].connect()
            except Exception as exc:
                held.pop()
                error = f"{type(exc).__name__}: {exc}"
        say(connections=len(held), error=error)
    elif step == "subscribe":  # subscribe to q/0, q/1... until one is refused
        count, error = 0, None
        while count < args[0] and error is None:
            pubsub.add_subscriber(("q", str(count)), record, weak=False)
            outcome = flushed(pubsub)
            count, error = (count + 1, None) if outcome is True else (count, outcome)
        say(subscriptions=count, error=error)
    elif step == "stall":  # args[0] more connections subscribed to args[1], never read
        for _ in range(args[0]):
            held.append(NetPubSub.from_file(credentials, timeout=5))
            held[-1].connect()
            held[-1].add_subscriber(topic_of(args[1]), record, weak=False)
        say(stalled=[flushed(other) for other in held])
    elif step == "go":  # wait for the test's word
        sys.stdin.readline()
"""


class Client:
    """A client process run as nobody, and what it said (see CLIENT)."""

    def __init__(self, proc: subprocess.Popen[str], stderr: Path) -> None:
        self.proc, self.stderr, self.pid = proc, stderr, proc.pid
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[str]) -> None:
        with stdout:
            for line in stdout:
                self._lines.put(line)
        self._lines.put(None)

    def answer(self, timeout: float = 10.0) -> Dict[str, Any]:
        """Its next line: what its next step did."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"nobody's client said nothing in {timeout} s: {self.stderr.read_text()}")
        if line is None:
            pytest.fail(f"nobody's client exited: {self.stderr.read_text()}")
        said: Dict[str, Any] = json.loads(line)
        assert said.pop("pid") == self.pid
        return said

    def go(self) -> None:
        """Let it past its next ``go`` step."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """Stop it if it still runs, and close its pipes."""
        stop_process(self.proc)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):  # a pipe it no longer reads
            self.proc.stdin.close()
        self._reader.join(10)


class Bus:
    """mpubsubd with an [access] section; its clients as root (here) and as nobody (processes)."""

    def __init__(self, daemon: Daemon, made: List[NetPubSub]) -> None:
        self.daemon, self.made = daemon, made
        self.lib = daemon.base / "lib"  # a copy nobody can read: /root is 0700
        shutil.copytree(ROOT / "mpubsub", self.lib / "mpubsub")
        (self.lib / "client.py").write_text(CLIENT)
        self.clients: List[Client] = []
        self.pid = 0

    def configure(self, access: str, **extra: str) -> None:
        """The configuration, with *access* as the [access] section; group nogroup, nobody's
        own, may connect."""
        self.daemon.configure(group="nogroup", **extra)
        with self.daemon.config.open("a") as f:
            f.write("[access]\n" + textwrap.dedent(access).strip() + "\n")

    def serve(self, access: str, **extra: str) -> None:
        """Start mpubsubd (see configure)."""
        self.configure(access, **extra)
        self.pid = self.daemon.started()

    def reload(self, what: str) -> str:
        """SIGHUP mpubsubd and wait until its log says *what* once more; the log."""
        before = self.daemon.log.read_text().count(what)
        os.kill(self.pid, signal.SIGHUP)
        wait_for(lambda: self.log().count(what) > before, what=f"the reload: {what}")
        return self.log()

    def log(self) -> str:
        return self.daemon.log.read_text()

    def root(self) -> NetPubSub:
        """A client in this process (root), disconnected at the end of the test."""
        pubsub = NetPubSub.from_file(str(self.daemon.credentials), timeout=5)
        pubsub.connect()
        self.made.append(pubsub)
        return pubsub

    def nobody(self, *plan: List[Any], groups: Tuple[str, ...] = ()) -> Client:
        """A client run as nobody (and in *groups*) following *plan* (see CLIENT)."""
        ids = ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
        stderr = self.daemon.base / f"client-{len(self.clients)}.stderr"
        script = [str(self.lib / "client.py"), str(self.daemon.credentials), json.dumps(plan)]
        with open(stderr, "w") as err:
            proc = subprocess.Popen(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", *ids, "/usr/bin/python3", *script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={"PYTHONPATH": str(self.lib), "PATH": "/usr/bin:/bin"},
                cwd="/",
            )
        self.clients.append(Client(proc, stderr))
        return self.clients[-1]


@pytest.fixture
def bus(mpubsubd: Daemon, clients: List[NetPubSub]) -> Iterator[Bus]:
    """A Bus on *mpubsubd*; its clients run as nobody are stopped at the end."""
    needs.check_other_users()
    made = Bus(mpubsubd, clients)
    try:
        yield made
    finally:
        for client in made.clients:
            client.stop()


Got = List[Tuple[str, Optional[Sender]]]


def recording(pubsub: NetPubSub, *topics: str) -> Got:
    """Subscribe *pubsub* to *topics*; the list of each message's topic and sender."""
    got: Got = []

    def record(topic: Tuple[str, ...], **message: Any) -> None:
        got.append(("/".join(topic) or "/", current_sender()))

    for text in topics:
        pubsub.add_subscriber(tuple(p for p in text.split("/") if p), record, weak=False)
    assert pubsub.flush()
    return got


def until(pubsub: NetPubSub, got: Got, topic: str) -> List[str]:
    """Deliver *pubsub*'s messages until one on *topic* came; the topics of all it got."""
    wait_for(
        lambda: pubsub.poll(0.05) is not None and any(t == topic for t, _ in got),
        what=f"a message on {topic}",
    )
    return [t for t, _ in got]


def published(pubsub: NetPubSub, *topics: str) -> None:
    """Publish on each of *topics* and flush."""
    for text in topics:
        pubsub.publish(tuple(text.split("/")), n=1)
    assert pubsub.flush()


def refused(right: str, topic: str) -> str:
    """What the client said of a flush after the broker refused it *right* on *topic*."""
    verb = {"subscribe": "subscribe to"}.get(right, "publish on")
    return f"PermissionError: the broker refused to {verb} {topic}: the policy forbids it"


def named(client: Client) -> str:
    """How the broker's log names *client*, at WARNING (a regular expression)."""
    return rf"WARNING: client \d+ \(uid 65534 nobody, pid {client.pid} python3\)"


def denial(client: Client, right: str, topic: str) -> str:
    """The broker's WARNING about *client*, denied *right* on *topic* (without the reason)."""
    return named(client) + re.escape(f" denied: {right} on {topic} (")


def entry(pubsub: NetPubSub, client: Client) -> Dict[str, Any]:
    """What broker_clients() says of *client*."""
    listed = pubsub.broker_clients()
    assert listed is not None
    (found,) = [c for c in listed if c["pid"] == client.pid]
    return found


@pytest.mark.parametrize(
    "case",
    [
        ("user:nobody", "user:daemon", ()),
        ("uid:65534", "uid:1", ()),
        ("group:users", "group:daemon", ("100",)),  # a supplementary group
        ("group:nogroup", "group:users", ()),  # the primary group; not in users
        ("*", "tcp", ()),
    ],
    ids=["user", "uid", "group-supplementary", "group-primary", "everyone"],
)
def test_each_subject_holds_for_its_clients_only(bus: Bus, case: Tuple[str, str, Any]) -> None:
    """A rule binds the clients its subject names, and no other (the default allows the rest)."""
    subject, other, groups = case
    bus.serve(f"default = allow\n{subject} publish = !blocked\n{other} publish = !open")
    subscriber = bus.root()
    got = recording(subscriber, "blocked", "open")
    client = bus.nobody(["pub", "blocked", "open"], groups=groups)
    assert client.answer() == {"pub": [["blocked", refused("publish", "blocked")], ["open", True]]}
    assert until(subscriber, got, "open") == ["open"]


def test_longest_prefix_then_deny_then_default_decide_and_root_may_do_all(bus: Bus) -> None:
    """The longest matching prefix decides, a deny beats an allow of the same length whichever
    rule says which, default = deny refuses the rest; uid 0 passes them all, its own deny too."""
    bus.serve(
        """
        default = deny
        user:nobody publish = a, !a/b, tie1, !tie2
        group:users publish = a/b/c, !tie1, tie2
        user:root publish = !z
        """
    )
    subscriber = bus.root()
    got = recording(subscriber, "/")  # root subscribes where no rule allows it
    topics = ["a/x", "a/b/x", "a/b/c/x", "tie1/x", "tie2/x", "z", "a/y"]
    client = bus.nobody(["pub", *topics], groups=("100",))
    allowed = {"a/x", "a/b/c/x", "a/y"}
    assert client.answer() == {
        "pub": [[t, True if t in allowed else refused("publish", t)] for t in topics]
    }
    published(bus.root(), "z")
    assert until(subscriber, got, "z") == ["a/x", "a/b/c/x", "a/y", "z"]


def test_a_broader_subscription_never_brings_a_denied_subtopic(bus: Bus) -> None:
    """nobody may subscribe to sensor but not sensor/secret: its subscription to sensor
    brings every sensor message but those of sensor/secret and below."""
    bus.serve("default = deny\nuser:nobody subscribe = sensor, !sensor/secret")
    watcher = bus.root()
    seen = recording(watcher, "sensor")
    client = bus.nobody(["sub", "sensor"], ["wait", "sensor/done"])
    assert client.answer() == {"sub": True}
    topics = ["sensor/a", "sensor/secret", "sensor/secret/deep", "sensor/b", "sensor/done"]
    published(bus.root(), *topics)
    assert until(watcher, seen, "sensor/done") == topics  # root's subscription brings all
    got = client.answer()["got"]
    assert [topic for topic, _ in got] == ["sensor/a", "sensor/b", "sensor/done"]


def test_denied_subscription_is_refused_and_not_installed(bus: Bus) -> None:
    """A subscription the policy forbids: flush raises naming it, the broker logs it, lists
    the client without it, and its topic's messages never come."""
    bus.serve("default = allow\nuser:nobody subscribe = !vault")
    client = bus.nobody(["sub", "news"], ["sub", "vault"], ["wait", "news/done"])
    assert client.answer() == {"sub": True}
    assert client.answer() == {"sub": refused("subscribe", "vault")}
    admin = bus.root()
    found = entry(admin, client)
    assert (found["uid"], found["user"], found["denied"]) == (NOBODY, "nobody", 1)
    assert found["topics"] == ["news"]  # not vault
    published(admin, "vault", "vault/x", "news/done")
    assert [topic for topic, _ in client.answer()["got"]] == ["news/done"]
    assert re.search(denial(client, "subscribe", "vault"), bus.log())


def test_denied_publish_is_dropped_counted_logged_and_raised(bus: Bus) -> None:
    """A refused publish reaches no subscriber; each next flush raises naming the topic, the
    publisher logs one WARNING, the broker counts both and logs one line naming the client."""
    bus.serve("default = allow\nuser:nobody publish = !secret")
    subscriber = bus.root()
    got = recording(subscriber, "secret", "open")
    client = bus.nobody(["pub", "secret/x", "secret/x", "open/done"], ["go"])
    refusal = ["secret/x", refused("publish", "secret/x")]
    assert client.answer() == {"pub": [refusal, refusal, ["open/done", True]]}
    assert until(subscriber, got, "open/done") == ["open/done"]
    found = entry(subscriber, client)
    assert (found["messages_in"], found["denied"]) == (3, 2)
    client.go()
    assert client.proc.wait(timeout=10) == 0
    warnings = [line for line in client.stderr.read_text().splitlines() if "WARNING" in line]
    assert warnings == ["WARNING the broker refused to publish on secret/x: the policy forbids it"]
    lines = re.findall(denial(client, "publish", "secret/x") + ".*", bus.log())
    assert len(lines) == 1, lines  # rate-limited: the second refusal is only counted


def test_broadcast_and_catch_all_need_the_right_on_the_root_topic(bus: Bus) -> None:
    """Broadcasting needs publish on /, a catch-all subscription subscribe on /: nobody in
    users has both, nobody alone neither, and no broadcast reaches it."""
    bus.serve(
        """
        default = deny
        * publish = news
        * subscribe = news
        group:users publish = /
        group:users subscribe = /
        """
    )
    plan = (["sub", "news"], ["sub", "/"], ["go"], ["pub", "/"], ["wait", "news/done"])
    alone, member = bus.nobody(*plan), bus.nobody(*plan, groups=("100",))
    assert [alone.answer(), alone.answer()] == [{"sub": True}, {"sub": refused("subscribe", "/")}]
    assert [member.answer(), member.answer()] == [{"sub": True}, {"sub": True}]
    subscriber = bus.root()
    got = recording(subscriber, "/")
    alone.go()
    assert alone.answer() == {"pub": [["/", refused("publish", "/")]]}
    member.go()
    assert member.answer() == {"pub": [["/", True]]}
    published(bus.root(), "other/x", "news/done")  # a catch-all subscription brings other/x
    assert until(subscriber, got, "news/done") == ["/", "other/x", "news/done"]
    assert got[0][1] is not None and got[0][1].pid == member.pid  # the member's broadcast
    # What came from the broker (a client's own broadcast is delivered to it locally too).
    assert sorted({t for t, sender in alone.answer()["got"] if sender}) == ["news/done"]
    assert sorted({t for t, sender in member.answer()["got"] if sender}) == ["news/done", "other/x"]


def test_current_sender_names_the_publishing_process(bus: Bus) -> None:
    """A subscriber is told who published, as the kernel says: nobody's pid and uid, or root's;
    None outside a delivery and for a local publish inside one."""
    bus.serve("default = allow")
    subscriber = bus.root()
    seen: List[Tuple[Optional[Sender], Optional[Sender], Optional[Sender]]] = []
    echoed: List[Optional[Sender]] = []
    subscriber.add_subscriber(
        "echo", lambda topic, **m: echoed.append(current_sender()), weak=False
    )

    def on_id(topic: Tuple[str, ...], **message: Any) -> None:
        before = current_sender()
        subscriber.publish("echo", n=1)  # a local publish, inside a delivery
        seen.append((before, echoed[-1], current_sender()))

    subscriber.add_subscriber("id", on_id, weak=False)
    assert subscriber.flush()
    reader = bus.nobody(["sub", "id2"], ["wait", "id2"])
    assert reader.answer() == {"sub": True}
    client = bus.nobody(["pub", "id"])
    assert client.answer() == {"pub": [["id", True]]}
    wait_for(lambda: subscriber.poll(0.05) is not None and seen, what="nobody's message")
    nobody = Sender(uid=NOBODY, gid=NOBODY, pid=client.pid, user="nobody")
    assert seen == [(nobody, None, nobody)]
    assert current_sender() is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        nobody.uid = 0  # type: ignore[misc]
    published(bus.root(), "id", "id2")
    wait_for(lambda: subscriber.poll(0.05) is not None and len(seen) == 2, what="root's message")
    root = Sender(uid=0, gid=0, pid=os.getpid(), user="root")
    assert seen[1] == (root, None, root)
    assert reader.answer()["got"] == [["id2", dataclasses.asdict(root)]]


def test_tcp_peers_are_their_address(bus: Bus) -> None:
    """On TCP even root is its address: the tcp rule binds it, the sender is the address, and
    the connections of one IP address share its quota."""
    tcp = {"address": f"127.0.0.1:{free_port()}", "max_connections_per_user": "3"}
    bus.serve("default = allow\ntcp publish = !/, public", **tcp)
    subscriber, publisher = bus.root(), bus.root()
    got = recording(subscriber, "t", "public")
    publisher.publish(("t", "1"), n=1)
    with pytest.raises(PermissionError, match="publish on t/1: the policy forbids it"):
        publisher.flush()
    published(publisher, "public/1")
    assert until(subscriber, got, "public/1") == ["public/1"]
    sender = got[0][1]
    assert sender is not None and sender.address is not None
    assert (sender.uid, sender.pid, sender.user) == (None, None, None)
    assert sender.address[0] == "127.0.0.1"
    log = log_has(bus.daemon, "denied: publish on t/1", "the refusal in the log")
    assert f"(127.0.0.1:{sender.address[1]}) denied: publish on t/1 (" in log
    bus.root()  # the address's third connection
    fourth = NetPubSub.from_file(str(bus.daemon.credentials), timeout=5)
    with pytest.raises(ConnectionResetError, match="closed the connection during the handshake"):
        fourth.connect()
    cap = "127.0.0.1 has 3 connections, at its limit of 3 (max_connections_per_user)"
    log_has(bus.daemon, cap, "the address's quota in the log")
    assert publisher.flush()  # its connections already there go on


def test_reload_applies_a_new_policy_to_connected_clients(bus: Bus) -> None:
    """SIGHUP with a new [access]: a client connected before may publish what it could not,
    not what it could, a subscription now forbidden brings nothing, and the log says so."""
    bus.serve("default = allow\nuser:nobody publish = !locked")
    subscriber = bus.root()
    got = recording(subscriber, "locked", "open", "feed")
    plan = [["sub", "feed", "marker"], ["pub", "locked/1"], ["go"], ["pub", "locked/2", "open/2"]]
    client = bus.nobody(*plan, ["wait", "marker"])
    assert client.answer() == {"sub": True}
    assert client.answer() == {"pub": [["locked/1", refused("publish", "locked/1")]]}
    bus.configure("default = allow\nuser:nobody publish = !open\nuser:nobody subscribe = !feed")
    log = bus.reload(f"reloaded {bus.daemon.config}: ")
    client.go()
    assert client.answer() == {
        "pub": [["locked/2", True], ["open/2", refused("publish", "open/2")]]
    }
    published(bus.root(), "feed", "marker")
    assert until(subscriber, got, "feed") == ["locked/2", "feed"]
    # Its subscription to feed, installed before, stays and brings nothing.
    assert [topic for topic, _ in client.answer()["got"]] == ["marker"]
    # The log says what the reload did, and no WARNING that it waits for a restart.
    assert f"reloaded {bus.daemon.config}: [access] changed" in log
    assert "only at the next restart" not in log, log


def test_reload_that_allows_a_refused_topic_lets_its_publisher_flush(bus: Bus) -> None:
    """A topic refused before a reload that allows it: published again on the same connection,
    it is delivered, and the publisher's flush does not raise."""
    bus.serve("default = allow\nuser:nobody publish = !locked")
    subscriber = bus.root()
    got = recording(subscriber, "locked")
    client = bus.nobody(["pub", "locked/1"], ["go"], ["pub", "locked/1"])
    assert client.answer() == {"pub": [["locked/1", refused("publish", "locked/1")]]}
    bus.configure("default = allow")
    bus.reload(f"reloaded {bus.daemon.config}: ")
    client.go()
    outcome = client.answer()
    assert until(subscriber, got, "locked/1") == ["locked/1"]  # the broker delivered it
    assert outcome == {"pub": [["locked/1", True]]}


def test_reload_refuses_a_bad_policy_and_keeps_the_old(bus: Bus) -> None:
    """A bad rule at reload is one ERROR naming file and line; the old policy still binds the
    clients connected before and those that come after."""
    bus.serve("default = allow\nuser:nobody publish = !locked")
    subscriber = bus.root()
    got = recording(subscriber, "locked", "open")
    before = bus.nobody(["pub", "locked/1"], ["go"], ["pub", "locked/2", "open/1"])
    assert before.answer() == {"pub": [["locked/1", refused("publish", "locked/1")]]}
    bus.configure("default = allow\nuser:nobody publish = locked\nuser:nobody publsh = x")
    line = bus.daemon.config.read_text().splitlines().index("user:nobody publsh = x") + 1
    errors = [text for text in bus.reload("reload refused").splitlines() if "ERROR" in text]
    assert len(errors) == 1, errors
    assert errors[0].endswith(
        f"ERROR: reload refused, the running configuration stays: {bus.daemon.config}:{line}: "
        "user:nobody publsh: unknown right 'publsh': publish, subscribe or admin"
    )
    before.go()
    locked = [["locked/2", refused("publish", "locked/2")], ["open/1", True]]
    assert before.answer() == {"pub": locked}
    after = bus.nobody(["pub", "locked/3", "open/2"])
    assert after.answer() == {
        "pub": [["locked/3", refused("publish", "locked/3")], ["open/2", True]]
    }
    assert until(subscriber, got, "open/2") == ["open/1", "open/2"]


def test_one_users_quotas_leave_another_users_traffic_alone(bus: Bus) -> None:
    """nobody opens connections and subscriptions until its caps, each refusal logged naming
    it, while root's publisher and subscriber go on, every message delivered in order."""
    caps = {"max_connections_per_user": "4", "max_subscriptions_per_user": "5"}
    bus.serve("default = allow", **caps)
    publisher, subscriber = bus.root(), bus.root()
    received: List[int] = []
    subscriber.add_subscriber("flow", lambda topic, n: received.append(n), weak=False)
    assert subscriber.flush()
    sent, stop = [0], threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            publisher.publish("flow", n=sent[0])
            sent[0] += 1
            subscriber.poll(0)

    flowing = threading.Thread(target=traffic)
    flowing.start()
    try:
        wait_for(lambda: sent[0] > 100, what="root's traffic")
        client = bus.nobody(["connect", 20], ["subscribe", 20], ["go"])
        started = sent[0]
        connections, subscriptions = client.answer(), client.answer()
        during = sent[0] - started
    finally:
        stop.set()
        flowing.join(10)
    assert connections == {  # and the plan's own connection: 4
        "connections": 3,
        "error": "ConnectionResetError: the broker closed the connection during the handshake",
    }
    assert subscriptions == {
        "subscriptions": 5,
        "error": "PermissionError: the broker refused to subscribe to q/5: uid 65534 has 5 "
        "subscriptions, at its limit of 5 (max_subscriptions_per_user)",
    }
    log = log_has(bus.daemon, "(max_subscriptions_per_user)", "the subscription refused")
    assert (
        f"WARNING: refusing a connection from uid 65534 nobody, pid {client.pid} python3: "
        "uid 65534 has 4 connections, at its limit of 4 (max_connections_per_user)"
    ) in log
    assert re.search(denial(client, "subscribe", "q/5"), log)
    assert recording(bus.root(), "more") == []  # root connects and subscribes as before
    assert publisher.flush()
    wait_for(lambda: subscriber.poll(0.05) is not None and len(received) == sent[0], what="all")
    assert received == list(range(sent[0]))
    assert during > 0  # root's traffic went on while nobody hit its caps


def test_a_user_over_its_buffer_quota_loses_its_slowest_connection(bus: Bus) -> None:
    """nobody's connections that never read hold more than max_buffer_per_user: one is cut,
    the log naming it, while root's subscriber gets every message."""
    sizes = {"max_message_size": "65536", "max_buffer": "1048576"}
    bus.serve("default = allow", max_buffer_per_user="1572864", **sizes)
    client = bus.nobody(["stall", 2, "bulk"], ["go"])
    assert client.answer() == {"stalled": [True, True]}
    publisher, subscriber = bus.root(), bus.root()
    received: List[int] = []
    subscriber.add_subscriber("bulk", lambda topic, n, data: received.append(n), weak=False)
    assert subscriber.flush()

    def caught_up(count: int) -> bool:
        return subscriber.poll(0.05) is not None and len(received) == count

    for n in range(400):  # 6.4 MB, root's subscriber never more than 20 messages behind
        publisher.publish("bulk", n=n, data=b"x" * 16384)
        if n % 20 == 19:
            assert publisher.flush()
            wait_for(lambda: caught_up(n + 1), what="root's subscriber")  # noqa: B023
    assert received == list(range(400))
    log = bus.log()
    assert re.search(
        named(client) + r" cut off: slow consumer, \d+ bytes waiting, while uid 65534's "
        r"connections hold \d+, over its limit of 1572864 \(max_buffer_per_user\)",
        log,
    ), log
    assert "(uid 0 root" not in "".join(re.findall(".*cut off.*", log))


def test_broker_clients_needs_the_admin_right(bus: Bus) -> None:
    """Listing the broker's clients needs admin on /: root and nobody in users get the list,
    nobody alone a PermissionError (and the broker a WARNING)."""
    bus.serve("default = deny\ngroup:users admin = /")
    alone = bus.nobody(["clients"], ["go"])
    assert re.fullmatch(
        rf"PermissionError: client \d+ \(uid 65534 nobody, pid {alone.pid} python3\) may not "
        "list clients: it needs the admin right on /",
        alone.answer()["clients"],
    )
    member = bus.nobody(["clients"], ["go"], groups=("100",))
    assert [NOBODY, member.pid] in member.answer()["clients"]
    listed = bus.root().broker_clients()
    assert listed is not None
    found = {c["pid"]: (c["uid"], c["user"], c["command"]) for c in listed}
    assert found[alone.pid] == found[member.pid] == (NOBODY, "nobody", "python3")
    assert found[os.getpid()][:2] == (0, "root")
    assert re.search(denial(alone, "admin", "/"), bus.log())


def test_admin_is_never_given_by_default(bus: Bus) -> None:
    """default = allow lets everyone publish and subscribe, not list who is connected (once
    there are rules); a refused listing is not a refusal the next flush() raises."""
    bus.serve("default = allow\n* publish = /")
    client = bus.nobody(["clients"], ["pub", "ok/1"])
    assert client.answer()["clients"].startswith("PermissionError: ")
    assert client.answer() == {"pub": [["ok/1", True]]}
    assert bus.root().broker_clients() is not None  # uid 0 may


def test_refusals_escape_the_topic_they_name(bus: Bus) -> None:
    """A refused topic with a newline or escape sequence forges no log line: it is escaped
    in the broker's log, the client's WARNING and its PermissionError."""
    bus.serve("default = allow\ntcp publish = !/", address=f"127.0.0.1:{free_port()}")
    publisher = bus.root()
    publisher.publish(("x\nforged line", "\x1b[2J"), n=1)
    with pytest.raises(PermissionError) as refused_error:
        publisher.flush()
    assert "\n" not in str(refused_error.value) and "\x1b" not in str(refused_error.value)
    log = log_has(bus.daemon, "denied: publish on x", "the refusal in the log")
    assert not any(line.startswith("forged line") for line in log.splitlines()), log
    assert "\x1b" not in log
