"""Fixtures: real broker processes on real sockets, always stopped."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import settings

from mpubsub import NetPubSub
from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import read_credentials
from mpubsub._handshake import ServerHandshake
from mpubsub._identity import Identity
from mpubsub._policy import Access
from mpubsub._session import Session
from mpubsub.errors import MPubSubError
from mpubsub.typing import Topic

from . import needs
from .processes import stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
# Every test broker takes as its federation bridge a client showing this key.
BRIDGE_KEY = b"the test brokers' bridge key...."

# No per-example deadline: on a loaded two-core machine one example of a
# correct test may take longer than hypothesis's 200 ms, and fail for it.
# make soak fuzzes fifty times longer than make test.
settings.register_profile("test", deadline=None)
settings.register_profile("soak", deadline=None, max_examples=5000)
settings.load_profile("soak" if os.environ.get("MPUBSUB_SOAK") == "1" else "test")

_SKIPPED = pytest.StashKey["collections.Counter[str]"]()  # by reason
_FAILED_SKIPS = pytest.StashKey["collections.Counter[str]"]()  # the same, under CI=true


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI (CI=true) a test that skips fails: a green run must run every test."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and needs.in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        item.config.stash.setdefault(_FAILED_SKIPS, collections.Counter())[reason] += 1
        report.outcome = "failed"
        report.longrepr = f"CI=true, where every test must run, and this one skipped: {reason}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    skipped: collections.Counter[str] = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            skipped[report.longrepr[2].removeprefix("Skipped: ")] += 1
    config.stash[_SKIPPED] = skipped


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's last line: each group of tests skipped, and what would run it."""
    skipped = config.stash.get(_SKIPPED, None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if skipped is None or reporter is None:
        return
    failed = config.stash.get(_FAILED_SKIPS, collections.Counter())
    if failed:
        reporter.write_line(f"Tests failed, as CI=true wants, for want of: {_groups(failed)}")
    elif skipped:
        reporter.write_line(f"Tests skipped for want of what they need: {_groups(skipped)}")
    else:
        reporter.write_line("No test skipped: every group of tests ran.")


def _groups(counts: collections.Counter[str]) -> str:
    return "; ".join(f"{reason}: {n} tests" for reason, n in sorted(counts.items()))


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *condition* until it is truthy; fail the test after *timeout* seconds."""
    try:
        return wait_until(condition, timeout, what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


VENV_WHEELS = Path(sys.prefix) / "wheels"


def wait_closed(sock: socket.socket, what: str, timeout: float = 10.0) -> None:
    """Read *sock* until its peer closes it (data before is dropped); TimeoutError after
    *timeout* seconds."""
    sock.settimeout(0.1)

    def closed() -> bool:
        try:
            return sock.recv(4096) == b""
        except socket.timeout:
            return False

    wait_for(closed, timeout, what)


def make_install(
    base: Path, *variables: str, target: str = "install", wheels: Path = VENV_WHEELS
) -> str:
    """``make install`` with every file under *base* (PREFIX base/prefix, SYSCONFDIR base/etc).

    Offline: from *wheels* (by default those that making the venv left in
    it), and, as root, in a network namespace of its own, so that no
    download can hide in it. Returns what make printed. *target* may be
    ``uninstall`` (with a DESTDIR among *variables*: without one, it would
    stop the host's mpubsubd); *variables* add to make's, but CREATE_USER=no
    comes last: a test never creates a user on the machine that runs it.
    """
    staged = any(v.startswith("DESTDIR=") and v != "DESTDIR=" for v in variables)
    assert target == "install" or staged, f"make {target} outside a DESTDIR"
    assert wheels.is_dir(), f"no {wheels}: make .venv/.installed makes it"
    offline = ["unshare", "--net"] if needs.as_root() and needs.which("unshare") else []
    places = [f"PREFIX={base}/prefix", f"SYSCONFDIR={base}/etc", f"WHEELS={wheels}"]
    done = subprocess.run(
        [*offline, "make", "-s", target, *places, *variables, "CREATE_USER=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"make {target} failed: {done.stderr}"
    return done.stdout


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A working directory whose argparse.py and json.py leave NAME.imported when imported."""
    for name in ("argparse", "json"):
        mark = str(tmp_path / f"{name}.imported")
        (tmp_path / f"{name}.py").write_text(f"open({mark!r}, 'w').close()\n")
    return tmp_path


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def subscribed(pubsub: NetPubSub, topic: Topic) -> List[Dict[str, Any]]:
    """Subscribe *pubsub* to *topic*; the list its messages go to as they are delivered.

    Returns once the broker has the subscription.
    """
    got: List[Dict[str, Any]] = []
    pubsub.add_subscriber(topic, lambda topic, **message: got.append(message), weak=False)
    assert pubsub.flush()
    return got


class BrokerProcess:
    """A standalone broker (``python -m mpubsub.broker``) in a child process."""

    def __init__(
        self,
        credentials: Path,
        address: Optional[str],
        extra: List[str],
        prefix: List[str],
        bridge_key: bool = True,
    ) -> None:
        self.credentials = credentials
        self.log = credentials.with_suffix(".log")
        broker = [sys.executable, "-m", "mpubsub.broker", str(credentials), "-v", *extra]
        if bridge_key:  # BRIDGE_KEY makes a bridge
            key = credentials.with_suffix(".bridge-key")
            key.write_bytes(BRIDGE_KEY)
            key.chmod(0o600)
            broker += ["--bridge-key-file", str(key)]
        self.args = [*prefix, *broker]
        if address:
            self.args += ["--address", address]
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> BrokerProcess:
        with open(self.log, "wb") as log:  # a fresh log: readiness is read from it
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=ROOT)
        wait_for(self._ready, what="the broker to listen")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"broker exited with {self.proc.returncode}: {self.log.read_text()}")
        # The broker writes its credentials, then logs that it listens.
        return "broker listening on" in self.output()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def creds(self) -> Tuple[Any, bytes]:
        return read_credentials(self.credentials)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers on demand; every one is stopped at the end of the test."""
    started: List[BrokerProcess] = []

    def start(
        address: Optional[str] = None,
        *extra: str,
        name: str = "broker",
        prefix: Tuple[str, ...] = (),
        bridge_key: bool = True,
    ) -> BrokerProcess:
        broker = BrokerProcess(
            tmp_path / f"{name}.pckl", address, list(extra), list(prefix), bridge_key
        )
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture(params=["unix", "tcp"])
def broker(
    request: pytest.FixtureRequest, broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> BrokerProcess:
    """A broker on a Unix socket, then on TCP 127.0.0.1."""
    address = str(tmp_path / "b.sock") if request.param == "unix" else "127.0.0.1:0"
    return broker_factory(address)


@pytest.fixture
def clients() -> Iterator[List[NetPubSub]]:
    """NetPubSubs made by a test, all disconnected at its end."""
    made: List[NetPubSub] = []
    yield made
    for pubsub in made:
        with contextlib.suppress(RuntimeError):  # disconnected by the test already
            pubsub.disconnect()


def connected(broker: BrokerProcess, made: List[NetPubSub]) -> NetPubSub:
    pubsub = NetPubSub.from_file(broker.credentials)
    pubsub.connect()
    made.append(pubsub)
    return pubsub


def assert_serving(broker: BrokerProcess, made: List[NetPubSub]) -> None:
    """The broker is alive and still carries a message between two new clients."""
    assert broker.proc is not None and broker.proc.poll() is None
    pub, sub = connected(broker, made), connected(broker, made)
    got = subscribed(sub, "alive")
    pub.publish("alive", ok=True)
    wait_for(lambda: sub.poll(0.05) or got, what="a message through the broker")


def broker_rss(broker: BrokerProcess, field: str = "VmRSS") -> int:
    """The broker's resident memory, in bytes (its peak so far with field="VmHWM")."""
    with open(f"/proc/{broker.pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


class RawBridge:
    """A client speaking the bridge's side of the protocol on a plain socket."""

    def __init__(self, broker: BrokerProcess) -> None:
        address, authkey = broker.creds()
        self.sock = connect_socket(address, 5)
        handshake(self.sock, authkey)
        self.sock.sendall(proto.frame(proto.BRIDGE, BRIDGE_KEY))
        self.decoder = proto.FrameDecoder(proto.DEFAULT_MAX_MESSAGE)
        self.frames: List[Tuple[int, bytes]] = []

    def receive(self, count: int) -> List[Tuple[int, bytes]]:
        """(type, body) of the frames so far, once *count* came (deadline: the 5 s timeout)."""
        while len(self.frames) < count:
            data = self.sock.recv(65536)
            assert data, "the broker closed the bridge's connection"
            self.frames += [(kind, frame[5:]) for kind, frame in self.decoder.feed(data)]
        return self.frames


def as_nobody(*args: str) -> List[str]:
    """The command running /usr/bin/python3 ARGS as nobody (the venv's Python is under /root)."""
    return [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        *args,
    ]


@pytest.fixture
def library() -> Iterator[Path]:
    """A directory nobody can read, holding a copy of the mpubsub package (for PYTHONPATH)."""
    base = Path(tempfile.mkdtemp(prefix="mpubsub-lib-"))
    base.chmod(0o755)
    shutil.copytree(ROOT / "mpubsub", base / "mpubsub", ignore=shutil.ignore_patterns("*.pyc"))
    yield base
    shutil.rmtree(base)


class FakeBroker:
    """A broker that authenticates clients as multiprocessing does, then misbehaves.

    Each connection's HELLO is read (its version kept in ``hellos``), then
    *behave(sock)* runs (in the fake's own thread; the default WELCOME is
    sent first unless *welcome* is False), then the connection is closed.
    ``accepted`` counts connections.
    """

    def __init__(
        self,
        path: str,
        authkey: bytes,
        behave: Callable[[socket.socket], object],
        welcome: bool = True,
    ) -> None:
        self.listener = Listener(path, authkey=authkey)
        self.behave, self.welcome = behave, welcome
        self.accepted = 0
        self.hellos: List[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            with conn, socket.socket(fileno=os.dup(conn.fileno())) as sock:
                self.accepted += 1
                with contextlib.suppress(OSError, MPubSubError):
                    self.hellos.append(proto.hello_version(sock.recv(7)))
                    if self.welcome:
                        sock.sendall(proto.frame(proto.WELCOME, proto.welcome_body(proto.Limits())))
                    self.behave(sock)

    def close(self) -> None:
        self.listener.close()


def old_broker(path: str, authkey: bytes) -> FakeBroker:
    """A broker of protocol 1 (mpubsubd before senders and refusals): it refuses
    HELLO 2 as such a broker does, welcomes HELLO 1 and answers PINGs."""

    def behave(sock: socket.socket) -> None:
        version = fake.hellos[-1]
        if version != 1:
            reason = f"unsupported protocol version {version}; this broker speaks 1"
            sock.sendall(proto.frame(proto.ERROR, reason.encode()))
            return
        sock.sendall(proto.frame(proto.WELCOME, proto.welcome_body(proto.Limits())))
        while sock.recv(5) == proto.frame(proto.PING, b""):
            sock.sendall(proto.frame(proto.PONG, b""))

    fake = FakeBroker(path, authkey, behave, welcome=False)
    return fake


HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture
def helpers() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start helper processes (tests/helpers/NAME.py ARGS...); all are killed at the end."""
    started: List[subprocess.Popen[str]] = []

    def start(name: str, *args: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(HELPERS / f"{name}.py"), *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "ready\n", f"{name} did not start: {line!r}"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def stopped(helper: subprocess.Popen[str], report: str) -> int:
    r"""SIGTERM a helper that runs until told to stop; the N of its last words, matching *report*.

    *report* is a regular expression with one group, N: ``r"sent (\d+)"``
    for a publisher, ``r"stopped (\d+) in order"`` for a subscriber.
    """
    helper.send_signal(signal.SIGTERM)
    out, _ = helper.communicate(timeout=60)
    said = re.fullmatch(report + "\n", out)
    assert said, f"expected {report!r}, the helper said {out!r}"
    return int(said.group(1))


_PAIR = Identity("pair")


def session_on(
    sock: socket.socket,
    number: int = 1,
    identity: Identity = _PAIR,
    access: Optional[Access] = None,
) -> Session:
    """A broker's session of *sock* (one end of a pair), as the broker makes one at accept:
    *identity*'s, with *access* (everything, unless told)."""
    return Session(
        sock,
        number,
        0.0,
        ServerHandshake(b"k" * 32, proto.Limits()),
        identity=identity,
        access=access if access is not None else Access.everything(),
    )
