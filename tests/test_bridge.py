"""Tests for mpubsubd._bridge: hosts (mpubsubd -f) federated through real nats-server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

import mpubsub
from mpubsub import NetPubSub
from mpubsub._protocol import encode_topic
from mpubsub.typing import Topic
from mpubsubd._federation import Signer, subject

from . import needs
from .conftest import (
    alive,
    stopped,
    wait_for,
)
from .processes import NATS_SERVER, NatsServer, free_port, stop_process

pytestmark = pytest.mark.skipif(not os.path.exists(NATS_SERVER), reason=needs.NATS.reason())
SECRET = b"0123456789abcdef0123456789abcdef"


class Host:
    """An mpubsubd in the foreground with its own files: one host of the federation."""

    def __init__(
        self,
        base: Path,
        name: str,
        servers: str,
        settings: Optional[Dict[str, str]] = None,
        access: str = "",
        **federation: str,
    ) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir()
        self.credentials = self.dir / "broker.pckl"
        self.log = self.dir / "stderr.log"
        self.config = self.dir / "mpubsubd.conf"
        secret = base / "secret"
        if not secret.exists():
            secret.write_bytes(SECRET)
            secret.chmod(0o600)
        federation = {"servers": servers, "secret_file": str(secret), "name": name, **federation}
        self.config.write_text(
            "[mpubsubd]\n"
            f"address = {self.dir / 'broker.sock'}\n"
            f"credentials = {self.credentials}\n"
            f"pidfile = {self.dir / 'mpubsubd.pid'}\n"
            "log_level = DEBUG\n"
            + "".join(f"{k} = {v}\n" for k, v in (settings or {}).items())
            + "[federation]\n"
            + "".join(f"{k} = {v}\n" for k, v in federation.items())
            + (f"[access]\n{access}" if access else "")
        )
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.clients: List[NetPubSub] = []
        self.command = [sys.executable, "-m", "mpubsubd"]

    def start(
        self,
        connected: bool = True,
        cwd: Optional[Path] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> Host:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "-f", "-c", str(self.config)],
                stdout=log,
                stderr=log,
                cwd=cwd,
                env=env,
            )
        wait_for(lambda: self._alive() and self.credentials.exists(), what=f"{self.name} to serve")
        if connected:
            self.wait_state("connected")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"mpubsubd {self.name} exited: {self.log.read_text()[-3000:]}")
        return True

    def client(self) -> NetPubSub:
        pubsub = NetPubSub.from_file(str(self.credentials))
        pubsub.connect()
        self.clients.append(pubsub)
        return pubsub

    def federation(self) -> Dict[str, Any]:
        pubsub = self.clients[0] if self.clients else self.client()
        stats = pubsub.broker_statistics()
        assert stats is not None
        return stats.get("federation") or {}

    def wait_state(self, state: str, timeout: float = 20.0) -> Dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (f := self.federation()).get("state") == state and f,
            timeout,
            what=f"{self.name}'s bridge to be {state}",
        )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        for pubsub in self.clients:
            pubsub.disconnect()
        stop_process(self.proc, 20)


class Federation:
    """The NATS servers and hosts of one test, all stopped at its end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: List[NatsServer] = []
        self.hosts: List[Host] = []

    def nats(self, name: str = "nats", *args: str, port: int = 0) -> NatsServer:
        server = NatsServer(self.base, name, *args, port=port)
        self.servers.append(server)
        return server.start()

    def cluster(self, size: int = 3) -> List[NatsServer]:
        nodes = [NatsServer(self.base, f"node{i}") for i in range(size)]
        ports = [free_port() for _ in nodes]
        for node, port in zip(nodes, ports):
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports if p != port)
            node.args += ["--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{port}"]
            node.args += ["--routes", routes]
            self.servers.append(node)
            assert node.start().proc is not None
        wait_for(lambda: all(n._routes() >= size - 1 for n in nodes), 30, what="cluster routes")
        return nodes

    def host(
        self,
        name: str,
        servers: str,
        *,
        connected: bool = True,
        settings: Optional[Dict[str, str]] = None,
        access: str = "",
        **federation: str,
    ) -> Host:
        """Start a host; *settings* go in its [mpubsubd] section, *federation* in [federation],
        *access* (lines) in [access]."""
        host = Host(self.base, name, servers, settings, access, **federation)
        self.hosts.append(host)
        return host.start(connected)

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        for server in self.servers:
            server.stop()


@contextlib.contextmanager
def federated() -> Iterator[Federation]:
    """A Federation in a fresh directory, everything in it stopped and removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="mpubsub-fed-"))
    fed = Federation(base)
    try:
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def federation() -> Iterator[Federation]:
    with federated() as fed:
        yield fed


Inbox = List[Tuple[Topic, Dict[str, Any]]]


def collect(pubsub: NetPubSub, topic: Topic) -> Inbox:
    got: Inbox = []
    pubsub.add_subscriber(topic, lambda topic, **m: got.append((topic, m)), weak=False)
    assert pubsub.flush()
    return got


def pump(clients: Sequence[NetPubSub], until: Callable[[], Any], what: str) -> None:
    """Poll every client until *until* holds (deadline 20 s)."""

    def step() -> Any:
        for pubsub in clients:
            pubsub.poll(0.005)
        return until()

    wait_for(step, 20, what=what)


def reach(publisher: NetPubSub, topic: Topic, inbox: Inbox, clients: Sequence[NetPubSub]) -> None:
    """Publish probes on *topic* until *inbox* gets one: interest has crossed NATS."""
    sent = [0.0]

    def arrived() -> bool:
        now = time.monotonic()
        if now - sent[0] > 0.2:
            publisher.publish(topic, probe=True)
            assert publisher.flush()
            sent[0] = now
        return any(m.get("probe") for _, m in inbox)

    pump(clients, arrived, f"a probe on {topic} to cross")


def real(inbox: Inbox) -> List[Tuple[Topic, Dict[str, Any]]]:
    return [(t, m) for t, m in inbox if not m.get("probe")]


def test_cross_host_delivery(federation: Federation) -> None:
    """Hierarchy, catch-all and broadcast reach the other host's subscribers, once each."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub_a, local_a = a.client(), a.client()
    prefix_b, all_b = b.client(), b.client()
    on_a = collect(local_a, ("a", "b"))
    on_b = collect(prefix_b, ("a",))
    every_b = collect(all_b, ())
    clients = [pub_a, local_a, prefix_b, all_b]
    reach(pub_a, ("a", "b"), on_b, clients)
    reach(pub_a, ("a", "b"), every_b, clients)

    pub_a.publish(("a", "b", "c"), n=1)
    pub_a.publish(("a",), n=2)
    pub_a.publish(("x", "y.z", "", "*", ">"), n=3)
    pub_a.publish((), n=4)  # broadcast: every subscriber of every host
    pub_a.publish(("a", "end"), n=5)
    pump(clients, lambda: any(m.get("n") == 5 for _, m in real(on_b)), "the last message on b")
    pump(clients, lambda: any(m.get("n") == 4 for _, m in real(on_a)), "the broadcast on a")
    assert [m["n"] for _, m in real(on_b)] == [1, 2, 4, 5]
    assert [m["n"] for _, m in real(every_b)] == [1, 2, 3, 4, 5]
    assert real(every_b)[2][0] == ("x", "y.z", "", "*", ">")
    assert [m["n"] for _, m in real(on_a)] == [1, 4]  # the origin host: once, not echoed back

    # And back from b to a.
    pub_b = prefix_b
    pub_b.publish(("a", "b"), n=6)
    pump(clients, lambda: any(m.get("n") == 6 for _, m in real(on_a)), "b's message on a")
    assert [m["n"] for _, m in real(on_a)] == [1, 4, 6]
    # The bridges report their counters every second.
    wait_for(lambda: a.federation()["forwarded_out"] >= 5, what="a's count of messages sent")
    wait_for(lambda: b.federation()["forwarded_in"] >= 5, what="b's count of messages taken")


def test_the_sender_crosses_hosts_and_the_federation_policy_holds(
    federation: Federation,
) -> None:
    """A subscriber on b sees who published on a, as a's broker stamped it, and host a;
    b's policy for the federation subject drops what other hosts may not publish there."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    b = federation.host("b", nats.url, access="federation publish = !admin\n")
    pub_a, sub_b = a.client(), b.client()
    senders: List[Optional[mpubsub.Sender]] = []
    got: Inbox = []

    def on_message(topic: Topic, **message: Any) -> None:
        got.append((topic, message))
        senders.append(mpubsub.current_sender())

    sub_b.add_subscriber((), on_message, weak=False)
    assert sub_b.flush()
    reach(pub_a, ("news",), got, [pub_a, sub_b])
    pub_a.publish(("admin", "reboot"), n=1)
    pub_a.publish(("news",), n=2)
    pump([pub_a, sub_b], lambda: any(m.get("n") == 2 for _, m in got), "the news on b")
    assert [m["n"] for _, m in real(got)] == [2]  # admin/reboot: denied on b
    sender = senders[-1]
    assert sender is not None
    assert (sender.host, sender.pid, sender.uid) == ("a", os.getpid(), os.getuid())
    assert sender.user == pwd.getpwuid(os.getuid()).pw_name
    wait_for(
        lambda: "denied: publish on admin/reboot (the policy forbids it)" in b.output(),
        what="b's log of the denial",
    )


def test_exactly_once_on_every_host(federation: Federation) -> None:
    """Three hosts, overlapping subscriptions: every message to every subscriber once, in order."""
    nats = federation.nats()
    hosts = [federation.host(name, nats.url) for name in ("a", "b", "c")]
    pubs = [h.client() for h in hosts]
    subs = [h.client() for h in hosts]
    inboxes = {}
    for host, sub in zip(hosts, subs):
        for topic in [("t",), ("t", "x"), ()]:
            inboxes[host.name, topic] = collect(sub, topic)
    clients = pubs + subs
    for pub in pubs:
        for inbox in inboxes.values():
            reach(pub, ("t", "x"), inbox, clients)

    count = 200
    for i in range(count):
        for host, pub in zip(hosts, pubs):
            pub.publish(("t", "x") if i % 2 else ("t",), origin=host.name, seq=i)
    for pub in pubs:
        pub.publish(("t", "x"), origin="end")
    ends = len(hosts)

    def done() -> bool:
        return all(sum(m.get("origin") == "end" for _, m in i) == ends for i in inboxes.values())

    pump(clients, done, "the end markers everywhere")
    for (name, topic), inbox in inboxes.items():
        for origin in ("a", "b", "c"):
            seqs = [m["seq"] for _, m in real(inbox) if m.get("origin") == origin]
            wanted = [i for i in range(count) if topic != ("t", "x") or i % 2]
            assert seqs == wanted, f"{name} {topic} from {origin}"
    for host in hosts:
        assert host.federation()["dropped_unverified"] == 0


async def _publish_raw(url: str, messages: List[Tuple[str, bytes]]) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url)
    for name, body in messages:
        await nc.publish(name, body)
    await nc.flush()
    await nc.close()


def test_forged_messages_are_dropped(federation: Federation, tmp_path: Path) -> None:
    """Anything published straight into NATS without the secret is dropped and logged."""
    nats = federation.nats()
    b = federation.host("b", nats.url)
    pub_b, sub_b = b.client(), b.client()
    got = collect(sub_b, ())
    evidence = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Tuple[Any, Tuple[str]]:
            return (os.system, (f"touch {evidence}",))

    topic = encode_topic(("a",))
    forged = [
        ("mpubsub.a", pickle.dumps(Exploit())),  # a bare pickle
        ("mpubsub.a", Signer(b"not the secret", "a").seal(topic, pickle.dumps(Exploit()))),
        ("mpubsub.a", Signer(SECRET, "a").seal(encode_topic(("z",)), pickle.dumps({"n": 1}))),
        ("mpubsub.a_zz", Signer(SECRET, "a").seal(topic, pickle.dumps({"n": 2}))),
    ]
    asyncio.run(_publish_raw(nats.url, forged))
    wait_for(
        lambda: b.federation().get("dropped_unverified") == len(forged),
        what="the forgeries dropped",
    )
    genuine = Signer(SECRET, "a").seal(topic, pickle.dumps({"n": 3}))
    asyncio.run(_publish_raw(nats.url, [(subject("mpubsub", topic), genuine)]))
    pump([sub_b, pub_b], lambda: got, "the genuine message")
    assert got == [(("a",), {"n": 3})]
    assert not evidence.exists()
    assert "bad signature" in b.output() and "malformed subject token" in b.output()


def test_nats_down_and_back_under_traffic(
    federation: Federation, helpers: Callable[..., subprocess.Popen[str]]
) -> None:
    """Local delivery goes on while NATS is down; the bridge reconnects and says so."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub_a, sub_b = a.client(), b.client()
    on_b = collect(sub_b, ("load",))
    reach(pub_a, ("load",), on_b, [pub_a, sub_b])
    # All three run until told to stop: traffic goes on, however long NATS takes to return.
    local = helpers("subscriber", a.credentials, "load", 0, "--seconds", 60)
    remote = helpers("subscriber", b.credentials, "load", 0, "--gaps", "--seconds", 60)
    publisher = helpers("publisher", a.credentials, "load", 0, "p", "--pause", 0.01)
    pump([sub_b], lambda: len(real(on_b)) > 20, "traffic across")
    nats.stop()
    a.wait_state("disconnected")
    seen = len(real(on_b))
    nats.start()
    a.wait_state("connected")
    b.wait_state("connected")
    pump([sub_b], lambda: len(real(on_b)) > seen + 20, "traffic across again")
    sent = stopped(publisher, r"sent (\d+)")
    assert stopped(local, r"stopped (\d+) in order") == sent
    # remote lost what NATS could not carry (at most once), and had what on_b had, on b too.
    received = stopped(remote, r"stopped (\d+) in order")
    assert seen + 20 < received <= sent
    assert a.federation()["reconnects"] >= 1
    assert "disconnected from NATS" in a.output() and "reconnected to NATS" in a.output()


def test_three_node_cluster(federation: Federation) -> None:
    """Each host on its own node of a NATS cluster; a node's loss moves its host to another."""
    nodes = federation.cluster(3)
    hosts = [federation.host(n, node.url) for n, node in zip("abc", nodes)]
    pubs = [h.client() for h in hosts]
    subs = [h.client() for h in hosts]
    inboxes = [collect(s, ("c",)) for s in subs]
    clients = pubs + subs
    for pub in pubs:
        for inbox in inboxes:
            reach(pub, ("c",), inbox, clients)
    for host, pub in zip(hosts, pubs):
        for i in range(50):
            pub.publish(("c", host.name), origin=host.name, seq=i)
    expected = {h.name: list(range(50)) for h in hosts}

    def by_origin(inbox: Inbox) -> Dict[str, List[int]]:
        found: Dict[str, List[int]] = {}
        for _, m in real(inbox):
            found.setdefault(m["origin"], []).append(m["seq"])
        return found

    pump(clients, lambda: all(by_origin(i) == expected for i in inboxes), "50 x 3 everywhere")

    nodes[0].stop()  # host a's node: a moves to a node it learnt from the cluster
    others = (nodes[1].url, nodes[2].url)
    wait_for(lambda: hosts[0].federation()["server"] in others, 30, what="a on another node")
    for inbox in inboxes:
        inbox.clear()
    for inbox in inboxes[1:]:
        reach(pubs[0], ("c",), inbox, clients)
    pubs[0].publish(("c", "a"), origin="a", seq=0)
    pump(
        clients,
        lambda: all(by_origin(i).get("a") == [0] for i in inboxes[1:]),
        "a's message after failover",
    )


def test_local_only_topics_stay(federation: Federation) -> None:
    """Excluded prefixes and *local topics never reach another host."""
    nats = federation.nats()
    a = federation.host("a", nats.url, local_only="private, metrics/raw")
    b = federation.host("b", nats.url)
    pub_a, sub_a, sub_b = a.client(), a.client(), b.client()
    on_a, on_b = collect(sub_a, ()), collect(sub_b, ())
    clients = [pub_a, sub_a, sub_b]
    reach(pub_a, ("x",), on_b, clients)
    pub_a.publish(("private", "x"), n=1)
    pub_a.publish(("metrics", "raw", "cpu"), n=2)
    pub_a.publish(("metrics", "cooked"), n=3)
    pub_a.publish(("x", "*local"), n=4)
    pub_a.publish(("end",), n=5)
    pump(clients, lambda: any(m.get("n") == 5 for _, m in on_b), "the end on b")
    pump(clients, lambda: any(m.get("n") == 5 for _, m in on_a), "the end on a")
    assert [m["n"] for _, m in real(on_b)] == [3, 5]
    assert [m["n"] for _, m in real(on_a)] == [1, 2, 3, 5]  # *local: not even the broker


def test_bridge_restarted_and_nats_late(federation: Federation) -> None:
    """NATS absent at start: local delivery works, the bridge waits; a killed bridge returns."""
    port = free_port()
    a = federation.host("a", f"nats://127.0.0.1:{port}", connected=False)
    a.wait_state("disconnected")
    pub, sub = a.client(), a.client()
    got = collect(sub, ("x",))
    pub.publish(("x",), n=1)
    pump([pub, sub], lambda: got, "local delivery without NATS")
    assert "cannot reach NATS" in a.output()

    federation.nats("late", port=port)
    a.wait_state("connected", 30)

    pid = int(re.findall(r"federation bridge started \(pid (\d+)\)", a.output())[-1])
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: len(re.findall(r"federation bridge started", a.output())) == 2,
        what="the bridge to be restarted",
    )
    assert "the federation bridge exited with status -9; restarting" in a.output()
    assert "the federation bridge is gone" in a.output()  # the broker's side
    a.wait_state("connected", 30)


def test_secret_file_problems_stop_mpubsubd(tmp_path: Path) -> None:
    """A missing or group-readable secret file is one line on stderr and exit status 78."""
    secret = tmp_path / "secret"
    config = tmp_path / "mpubsubd.conf"
    config.write_text(
        f"[mpubsubd]\naddress = {tmp_path / 's'}\ncredentials = {tmp_path / 'c'}\n"
        f"pidfile = {tmp_path / 'p'}\n[federation]\nservers = nats://127.0.0.1:1\n"
        f"secret_file = {secret}\n"
    )
    command = [sys.executable, "-m", "mpubsubd", "-f", "-c", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78  # EX_CONFIG
    assert result.stderr.splitlines()[-1] == (
        f"mpubsubd: {config}:7: secret_file: cannot read {secret}: No such file or directory"
    )
    secret.write_bytes(SECRET)
    secret.chmod(0o640)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and "must be readable by its owner only" in result.stderr
    assert "Traceback" not in result.stderr
    secret.chmod(0o600)
    config.write_text(config.read_text() + "tls_ca_file = /nonexistent/ca.pem\n")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert result.stderr.splitlines()[-1] == (
        f"mpubsubd: {config}:8: tls_ca_file: cannot read /nonexistent/ca.pem: "
        "No such file or directory"
    )


def test_stats_show_the_federation(federation: Federation) -> None:
    """mpubsub stats shows the bridge's state and counters, and when the bridge is gone."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    command = [sys.executable, "-m", "mpubsub", "stats", "-c", str(a.credentials)]
    lines = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"^federation +connected$", lines, re.M), lines
    assert re.search(r"^this host +a$", lines, re.M)
    assert re.search(rf"^NATS server +{nats.url}$", lines, re.M)
    assert re.search(r"^dropped, unverified +0$", lines, re.M)


def test_order_across_subscriptions(federation: Federation) -> None:
    """A subscriber of two topics gets one publisher's messages in their order."""
    nats = federation.nats()
    a, b = federation.host("a", nats.url), federation.host("b", nats.url)
    pub, sub = a.client(), b.client()
    got: List[int] = []

    def numbered(topic: Topic, seq: int = -1, **message: Any) -> None:
        if seq >= 0:  # not a probe
            got.append(seq)

    for topic in ("left", "right"):
        sub.add_subscriber(topic, numbered, weak=False)
    assert sub.flush()
    probes: Inbox = []
    sub.add_subscriber("left", lambda topic, **m: probes.append((topic, m)), weak=False)
    reach(pub, ("left",), probes, [pub, sub])
    reach(pub, ("right",), probes, [pub, sub])
    got.clear()
    count = 2000
    for seq in range(count):
        pub.publish("left" if seq % 3 else "right", seq=seq)
    pump([sub], lambda: len(got) >= count, f"{count} messages")
    assert got == list(range(count))


def test_credentials_and_limits(federation: Federation) -> None:
    """A NATS token is passed through (a wrong one is reported); NATS's max_payload is respected."""
    nats = federation.nats("auth", "--auth", "s3cret-token")
    a = federation.host("a", nats.url, token="s3cret-token")
    b = federation.host("b", nats.url, token="s3cret-token")
    wrong = federation.host("c", nats.url, token="wrong", connected=False)
    wrong.wait_state("disconnected")
    assert re.search(r"cannot reach NATS at .*[Aa]uthorization", wrong.output()), wrong.output()

    pub, sub = a.client(), b.client()
    got = collect(sub, ("big",))
    reach(pub, ("big",), got, [pub, sub])
    pub.publish(("big",), blob=b"x" * (2 * 1024 * 1024))  # over NATS's default 1 MiB
    pub.publish(("big",), n=1)
    pump([pub, sub], lambda: any(m.get("n") == 1 for _, m in got), "the small message")
    assert [m for _, m in real(got)] == [{"n": 1}]
    wait_for(lambda: a.federation()["dropped_out"] == 1, what="the big message counted")
    assert "exceeds NATS's max_payload" in a.output()


def _certificates(base: Path) -> Dict[str, Path]:
    """A CA, and a server and a client certificate it signed, for 127.0.0.1."""
    files = {n: base / f"{n}.pem" for n in ("ca", "ca-key", "srv", "srv-key", "cli", "cli-key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-days", "2", "-subj", "/CN=test CA", "-keyout", str(files["ca-key"]),
        "-out", str(files["ca"]),
    )  # fmt: skip
    for name in ("srv", "cli"):
        csr = base / f"{name}.csr"
        openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", f"/CN={name}", "-keyout", str(files[f"{name}-key"]), "-out", str(csr),
        )  # fmt: skip
        ext = base / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(files["ca"]),
            "-CAkey", str(files["ca-key"]), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(files[name]),
        )  # fmt: skip
    return files


@pytest.mark.skipif(not needs.which("openssl"), reason=needs.OPENSSL.reason())
def test_mutual_tls(federation: Federation) -> None:
    """TLS settings are passed through: the bridge verifies the server and shows its own."""
    certs = _certificates(federation.base)
    nats = federation.nats(
        "tls", "--tls", "--tlscert", str(certs["srv"]), "--tlskey", str(certs["srv-key"]),
        "--tlsverify", "--tlscacert", str(certs["ca"]),
    )  # fmt: skip
    url = nats.url.replace("nats://", "tls://")
    ca, cert, key = str(certs["ca"]), str(certs["cli"]), str(certs["cli-key"])
    a = federation.host("a", url, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key)
    b = federation.host("b", url, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key)
    assert a.federation()["server"].startswith("tls://")
    pub, sub = a.client(), b.client()
    got = collect(sub, ("secure",))
    reach(pub, ("secure",), got, [pub, sub])
    stranger = federation.host("c", url, connected=False, tls_ca_file=ca)  # no certificate
    stranger.wait_state("disconnected")


def test_classic_daemon_logs_and_stops_its_bridge(federation: Federation) -> None:
    """Without -f the bridge logs to log_file, and stops with mpubsubd (no process left)."""
    nats = federation.nats()
    host = Host(federation.base, "d", nats.url)
    log = host.dir / "mpubsubd.log"
    text = host.config.read_text().replace("[federation]", f"log_file = {log}\n[federation]")
    host.config.write_text(text)
    command = [sys.executable, "-m", "mpubsubd", "-c", str(host.config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = int((host.dir / "mpubsubd.pid").read_text())
    try:
        found = wait_for(
            lambda: re.search(
                r"mpubsubd\.bridge\[(\d+)\] INFO: connected to NATS", log.read_text()
            ),
            what="the bridge's line in the log file",
        )
        bridge = int(found.group(1))
        assert bridge != pid and _parent(bridge) == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid) and not alive(bridge), what="mpubsubd and its bridge gone")
    assert "federation bridge exited" not in log.read_text()  # a stop, not a failure


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().split(")")[-1].split()[1])


def test_user_and_password(federation: Federation) -> None:
    """A NATS user and password are passed through as they are."""
    nats = federation.nats("users", "--user", "bridge", "--pass", "p@ss word")
    a = federation.host("a", nats.url, user="bridge", password="p@ss word")
    assert a.federation()["server"] == nats.url
    stranger = federation.host("b", nats.url, user="bridge", password="nope", connected=False)
    stranger.wait_state("disconnected")


def test_missing_nats_py_is_one_line(tmp_path: Path) -> None:
    """With [federation] set but nats-py absent, mpubsubd says which extra to install."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    config = tmp_path / "mpubsubd.conf"
    config.write_text(
        f"[mpubsubd]\naddress = {tmp_path / 's'}\ncredentials = {tmp_path / 'c'}\n"
        f"pidfile = {tmp_path / 'p'}\n[federation]\nservers = nats://127.0.0.1:1\n"
        f"secret_file = {secret}\n"
    )
    code = (
        "import sys; sys.modules['nats'] = None; from mpubsubd._main import main; "
        f"main(['-f', '-c', {str(config)!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "mpubsubd: federation needs nats-py: install the federation extra, "
        "pip install 'mpubsub[federation]'"
    )


def test_killed_mpubsubd_leaves_no_bridge(federation: Federation) -> None:
    """kill -9 of mpubsubd: its bridge sees the broker gone and exits by itself."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    bridge = int(re.findall(r"federation bridge started \(pid (\d+)\)", a.output())[-1])
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait(10)
    wait_for(lambda: not alive(bridge), what="the orphaned bridge to exit")


def test_stuck_nats_stalls_nothing(
    federation: Federation, helpers: Callable[..., subprocess.Popen[str]]
) -> None:
    """NATS frozen (SIGSTOP): local delivery goes on, the bridge drops instead of stalling."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    count = 600  # 38 MiB: more than the socket buffers and the bridge's 16 MiB hold
    subscriber = helpers("subscriber", a.credentials, "bulk", count)
    assert nats.proc is not None
    os.kill(nats.proc.pid, signal.SIGSTOP)
    try:
        publisher = helpers("publisher", a.credentials, "bulk", count, "p", "--size", 65536)
        assert publisher.communicate(timeout=60)[0].strip() == f"sent {count}"
        assert subscriber.communicate(timeout=60)[0].strip() == f"received {count} in order"
        wait_for(lambda: a.federation()["dropped_out"] > 0, what="the bridge to drop, not wait")
    finally:
        os.kill(nats.proc.pid, signal.SIGCONT)
    assert len(re.findall(r"federation bridge started", a.output())) == 1  # never cut off
    assert "NATS is not keeping up" in a.output()


def test_bridge_behind_loses_messages_not_its_place(
    federation: Federation, helpers: Callable[..., subprocess.Popen[str]]
) -> None:
    """A bridge that cannot keep up (stopped) is not cut off: the broker drops for it."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    bridge = int(re.findall(r"federation bridge started \(pid (\d+)\)", a.output())[-1])
    count = 600  # 38 MiB: over the broker's 32 MiB per-client buffer
    subscriber = helpers("subscriber", a.credentials, "bulk", count)
    os.kill(bridge, signal.SIGSTOP)
    try:
        publisher = helpers("publisher", a.credentials, "bulk", count, "p", "--size", 65536)
        assert publisher.communicate(timeout=60)[0].strip() == f"sent {count}"
        assert subscriber.communicate(timeout=60)[0].strip() == f"received {count} in order"
    finally:
        os.kill(bridge, signal.SIGCONT)
    wait_for(lambda: a.federation().get("dropped_behind", 0) > 0, what="the broker's drops")
    assert "the federation bridge is behind: dropped" in a.output()
    assert "slow consumer" not in a.output()
    assert len(re.findall(r"federation bridge started", a.output())) == 1
    a.wait_state("connected")


def test_reload_gives_the_bridge_its_new_log_level(federation: Federation) -> None:
    """log_level is live for the bridge too: a reload from DEBUG to INFO reaches the running
    bridge, whose DEBUG lines stop."""
    nats = federation.nats()
    a = federation.host("a", nats.url)
    a.config.write_text(a.config.read_text().replace("log_level = DEBUG\n", "log_level = INFO\n"))
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "mpubsubd.bridge: log level now INFO" in a.output(), what="the bridge")
    assert "log_level changed" in a.output()
