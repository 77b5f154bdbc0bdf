"""mpubsubd under a real systemd: the shipped unit in a private systemd-sandbox.

Skipped where the sandbox cannot run (not root, no unshare or systemd, no
``systemd-sandbox`` tool). ``make test-systemd`` runs only this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest

from . import needs
from .conftest import (
    make_install,
)
from .processes import NATS_SERVER, NatsServer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.systemd


def find_sandbox() -> str:
    candidates = [
        os.environ.get("SYSTEMD_SANDBOX", ""),
        str(ROOT.parent / "shared" / "tools" / "systemd-sandbox"),
        "/work/shared/tools/systemd-sandbox",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(needs.SANDBOX.reason())


@pytest.fixture
def installed() -> Iterator[Path]:
    """``make install`` into a directory outside /tmp (the sandbox mounts its own /tmp)."""
    needs.SYSTEMD.check(
        needs.as_root(), needs.which("unshare"), os.path.exists("/lib/systemd/systemd")
    )
    base = Path(tempfile.mkdtemp(prefix="mpubsub-systemd-", dir="/var/lib"))
    try:
        make_install(base)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Sandbox:
    """A private systemd running the installed unit; ``inside()`` runs a command in it."""

    def __init__(self, installed: Path) -> None:
        self.tool = find_sandbox()
        shipped = installed / "prefix" / "lib" / "systemd" / "system" / "mpubsubd.service"
        config = installed / "etc" / "mpubsub" / "mpubsubd.conf"
        # The installed unit, each of its mpubsubd commands given the installed configuration.
        unit = installed / "sandboxed" / "mpubsubd.service"
        unit.parent.mkdir(exist_ok=True)
        unit.write_text(shipped.read_text().replace("bin/mpubsubd ", f"bin/mpubsubd -c {config} "))
        started = subprocess.run(
            [self.tool, "start", str(unit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            pytest.skip(f"systemd-sandbox could not boot: {started.stderr.strip()}")
        self.pid = started.stdout.strip()
        self.pythonpath = f"PYTHONPATH={installed}/prefix/lib/mpubsub"

    def inside(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tool, "exec", self.pid, *args], capture_output=True, text=True, timeout=120
        )

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run *code* inside with the installed package, as an application would."""
        return self.inside("env", self.pythonpath, "/usr/bin/python3", "-c", code)

    def journal(self) -> str:
        return self.inside("journalctl", "-u", "mpubsubd", "--no-pager").stdout

    def stop(self) -> None:
        subprocess.run([self.tool, "stop", self.pid], capture_output=True, timeout=30)


@pytest.fixture
def sandbox(installed: Path) -> Iterator[Sandbox]:
    box = Sandbox(installed)
    try:
        yield box
    finally:
        box.stop()


def test_unit_under_systemd(sandbox: Sandbox) -> None:
    """start, connect through /run/mpubsub/broker.pckl, reload, read the journal, stop."""
    inside = sandbox.inside
    assert inside("systemctl", "start", "mpubsubd").returncode == 0
    assert inside("systemctl", "is-active", "mpubsubd").stdout == "active\n"
    client = sandbox.python(
        "from mpubsub import NetPubSub\n"
        "with NetPubSub.from_file('/run/mpubsub/broker.pckl') as p:\n"
        "    print('flushed', p.flush())\n",
    )
    assert client.stdout == "flushed True\n", client.stderr
    assert inside("systemctl", "reload", "mpubsubd").returncode == 0
    assert inside("systemctl", "is-active", "mpubsubd").stdout == "active\n"
    assert inside("systemctl", "stop", "mpubsubd").returncode == 0
    journal = sandbox.journal()
    lines: List[str] = [
        "mpubsubd 0.1.0 serving; clients read /run/mpubsub/broker.pckl",
        "SIGHUP: nothing to reopen, logging to stderr",
        "mpubsubd stopped",
    ]
    for line in lines:
        assert line in journal, journal
    assert inside("test", "-e", "/run/mpubsub/broker.pckl").returncode != 0


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A private nats-server on a free loopback port (the sandbox shares the network)."""
    needs.NATS.check(os.path.exists(NATS_SERVER))
    server = NatsServer(tmp_path, "nats").start()
    try:
        yield server.url
    finally:
        server.stop()


def test_federation_under_systemd(installed: Path, nats_url: str) -> None:
    """The hardened unit lets the bridge reach NATS; it logs to the journal, stops with the unit."""
    secret = installed / "etc" / "mpubsub" / "federation.key"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    config = installed / "etc" / "mpubsub" / "mpubsubd.conf"
    text = config.read_text()
    text = text.replace("\nservers =\n", f"\nservers = {nats_url}\n")
    text = text.replace("\nsecret_file =\n", f"\nsecret_file = {secret}\n")
    config.write_text(text)
    box = Sandbox(installed)
    try:
        assert box.inside("systemctl", "start", "mpubsubd").returncode == 0
        state = (
            "import json, time\n"
            "from mpubsub import NetPubSub\n"
            "with NetPubSub.from_file('/run/mpubsub/broker.pckl') as p:\n"
            "    for _ in range(200):\n"
            "        f = (p.broker_statistics() or {}).get('federation') or {}\n"
            "        if f.get('state') == 'connected':\n"
            "            break\n"
            "        time.sleep(0.05)\n"
            "    print(f.get('state'), f.get('server'))\n"
        )
        result = box.python(state)
        assert result.stdout == f"connected {nats_url}\n", (result.stderr, box.journal())
        status = box.inside("systemctl", "status", "--no-pager", "-l", "mpubsubd").stdout
        assert "from mpubsubd._bridge import main" in status, status  # in the unit's cgroup
        assert box.inside("systemctl", "stop", "mpubsubd").returncode == 0
        journal = box.journal()
        assert f"connected to NATS at {nats_url}" in journal, journal
        assert "federation bridge started" in journal and "bridge stopped" in journal
        assert "exited with status" not in journal  # stopped, not failed
    finally:
        box.stop()
