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
from typing import Dict, Iterator, List

import pytest

from . import needs
from .conftest import make_install, wait_for
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
    base.chmod(0o755)  # mpubsubd reads its package here once it is nobody
    try:
        make_install(base)
        config = base / "etc" / "mpubsub" / "mpubsubd.conf"
        # The tests never create users: the broker serves as nobody instead of mpubsub.
        config.write_text(config.read_text().replace("\nuser = mpubsub\n", "\nuser = nobody\n"))
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Sandbox:
    """A private systemd running the installed units; ``inside()`` runs a command in it.

    The units are those ``make install`` wrote (with the test's PREFIX and
    SYSCONFDIR: they name the installed configuration, ``etc/mpubsub/NAME.conf``
    for mpubsubd@NAME), with *extra* lines added to their [Service] section.
    """

    def __init__(self, installed: Path, extra: str = "") -> None:
        self.tool = find_sandbox()
        shipped = installed / "prefix" / "lib" / "systemd" / "system"
        etc = installed / "etc" / "mpubsub"
        units = installed / "sandboxed"
        units.mkdir(exist_ok=True)
        for name, config in (("mpubsubd", "mpubsubd.conf"), ("mpubsubd@", "%i.conf")):
            text = (shipped / f"{name}.service").read_text()
            assert f" -c {etc}/{config}" in text  # make install's SYSCONFDIR, in each command
            (units / f"{name}.service").write_text(text)
        dropin = units / "10-test.conf"
        dropin.write_text(f"[Service]\n{extra}")
        started = subprocess.run(
            [self.tool, "start", str(units / "mpubsubd.service"), "--", str(dropin)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            pytest.skip(f"systemd-sandbox could not boot: {started.stderr.strip()}")
        self.pid = started.stdout.strip()
        self.pythonpath = f"PYTHONPATH={installed}/prefix/lib/mpubsub"
        # The template is no unit to boot with: it joins the sandbox afterwards.
        template = "/run/systemd/system/mpubsubd@.service"
        self.inside("cp", str(units / "mpubsubd@.service"), template)
        self.inside("mkdir", "-p", f"{template}.d")
        self.inside("cp", str(dropin), f"{template}.d/10-test.conf")
        self.inside("systemctl", "daemon-reload")

    def inside(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tool, "exec", self.pid, *args], capture_output=True, text=True, timeout=120
        )

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run *code* inside with the installed package, as an application would."""
        return self.inside("env", self.pythonpath, "/usr/bin/python3", "-c", code)

    def journal(self, unit: str = "mpubsubd", *options: str) -> str:
        return self.inside("journalctl", "-u", unit, "--no-pager", *options).stdout

    def show(self, unit: str, *properties: str) -> Dict[str, str]:
        """systemctl show's *properties* of *unit*."""
        shown = self.inside("systemctl", "show", "-p", ",".join(properties), unit).stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def owner(self, path: str) -> str:
        """USER:GROUP:MODE of *path* inside."""
        return self.inside("stat", "-c", "%U:%G:%a", path).stdout.strip()

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
    # Its last line may reach journald a moment after the unit stopped.
    journal = wait_for(lambda: "mpubsubd stopped" in sandbox.journal() and sandbox.journal())
    lines: List[str] = [
        "mpubsubd 0.1.0 serving; clients read /run/mpubsub/broker.pckl",
        "reloaded /var/lib/mpubsub-systemd-",
        "mpubsubd stopped",
    ]
    for line in lines:
        assert line in journal, journal
    assert inside("test", "-e", "/run/mpubsub/broker.pckl").returncode != 0


def test_serves_as_its_user_with_root_owned_files(sandbox: Sandbox) -> None:
    """The unit's broker serves as the configured user (nobody here); root keeps its files."""
    assert sandbox.inside("systemctl", "start", "mpubsubd").returncode == 0
    main = sandbox.show("mpubsubd", "MainPID")["MainPID"]
    assert sandbox.inside("ps", "-o", "user=", "-p", main).stdout.strip() == "nobody"
    assert sandbox.owner("/run/mpubsub/broker.pckl") == "root:root:600"
    assert sandbox.owner("/run/mpubsub/broker.sock") == "root:root:600"
    processes = sandbox.inside("ps", "-o", "user=,ppid=", "--ppid", main).stdout.split()
    assert processes == ["root", main]  # the keeper: root's work, and nothing else
    client = sandbox.python(
        "from mpubsub import NetPubSub\n"
        "with NetPubSub.from_file('/run/mpubsub/broker.pckl') as p:\n"
        "    print('flushed', p.flush())\n",
    )
    assert client.stdout == "flushed True\n", client.stderr
    assert sandbox.inside("systemctl", "stop", "mpubsubd").returncode == 0
    warnings = sandbox.journal("mpubsubd", "-p", "warning")
    assert "user = nobody: other services run as nobody too" in warnings
    assert warnings.count("\n") == 1, warnings  # that one only


def test_config_is_checked_before_start_and_reload(installed: Path, sandbox: Sandbox) -> None:
    """A typo fails the reload (the broker serves on) and the start (no restarts, status 78);
    journalctl -p warning shows exactly the warnings and errors."""
    config = installed / "etc" / "mpubsub" / "mpubsubd.conf"
    good = config.read_text()
    inside = sandbox.inside
    assert inside("systemctl", "start", "mpubsubd").returncode == 0
    main = sandbox.show("mpubsubd", "MainPID")["MainPID"]
    config.write_text(good.replace("\n[federation]\n", "\nmax_bufer = 1\n[federation]\n"))
    assert inside("systemctl", "reload", "mpubsubd").returncode != 0
    assert sandbox.show("mpubsubd", "ActiveState", "MainPID") == {
        "ActiveState": "active",
        "MainPID": main,
    }
    assert f"{config}:" in sandbox.journal()
    assert "unknown key 'max_bufer' in [mpubsubd]" in sandbox.journal()
    config.write_text(
        good.replace("\nlog_level = INFO\n", "\nlog_level = DEBUG\n").replace(
            "\naddress = /run/mpubsub/broker.sock\n", "\naddress = /run/mpubsub/other.sock\n"
        )
    )
    assert inside("systemctl", "reload", "mpubsubd").returncode == 0
    assert sandbox.show("mpubsubd", "MainPID")["MainPID"] == main
    journal = sandbox.journal()
    assert f"reloaded {config}: log_level changed" in journal, journal
    warnings = sandbox.journal("mpubsubd", "-p", "warning")
    assert f"reload: address changed in {config}, but takes effect only at the next restart" in (
        warnings
    )
    assert "unknown key 'max_bufer'" in warnings and "serving" not in warnings
    config.write_text(good.replace("\n[federation]\n", "\nmax_bufer = 1\n[federation]\n"))
    assert inside("systemctl", "restart", "mpubsubd").returncode != 0
    shown = sandbox.show("mpubsubd", "ActiveState", "NRestarts", "ExecMainStatus")
    assert shown == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "78"}, (
        sandbox.journal()
    )


def test_blocked_chown_is_named(installed: Path) -> None:
    """A SystemCallFilter= that forbids chown: the start fails saying what root could not do."""
    config = installed / "etc" / "mpubsub" / "mpubsubd.conf"
    config.write_text(config.read_text().replace("\ngroup =\n", "\ngroup = users\n"))
    box = Sandbox(installed, extra="SystemCallFilter=~@chown\n")
    try:
        assert box.inside("systemctl", "start", "mpubsubd").returncode != 0
        assert (
            "cannot give /run/mpubsub/broker.pckl to group users: Operation not permitted "
            "(root may not chown here: does a SystemCallFilter= without @chown, "
            "or a CapabilityBoundingSet= without CAP_CHOWN, forbid it?)"
        ) in box.journal()
    finally:
        box.stop()


def test_two_buses_side_by_side(installed: Path, sandbox: Sandbox) -> None:
    """mpubsubd@sensors and mpubsubd@lab: their own files in /run/mpubsub-NAME, their own
    groups, their own names in the journal, beside the main bus."""
    etc = installed / "etc" / "mpubsub"
    (etc / "sensors.conf").write_text("[mpubsubd]\nuser = nobody\ngroup = users\n")
    (etc / "lab.conf").write_text("[mpubsubd]\nuser = nobody\n")
    inside = sandbox.inside
    for unit in ("mpubsubd", "mpubsubd@sensors", "mpubsubd@lab"):
        assert inside("systemctl", "start", unit).returncode == 0, sandbox.journal(unit)
    assert sandbox.owner("/run/mpubsub-sensors/broker.pckl") == "root:users:640"
    assert sandbox.owner("/run/mpubsub-lab/broker.pckl") == "root:root:600"
    code = (
        "from mpubsub import NetPubSub\n"
        "for bus in ('mpubsub', 'mpubsub-sensors', 'mpubsub-lab'):\n"
        "    with NetPubSub.from_file(f'/run/{bus}/broker.pckl') as p:\n"
        "        print(bus, p.address, p.flush())\n"
    )
    client = sandbox.python(code)
    assert client.stdout.splitlines() == [
        "mpubsub /run/mpubsub/broker.sock True",
        "mpubsub-sensors /run/mpubsub-sensors/broker.sock True",
        "mpubsub-lab /run/mpubsub-lab/broker.sock True",
    ], client.stderr
    named = inside("journalctl", "-t", "mpubsubd@sensors", "--no-pager").stdout
    assert "clients read /run/mpubsub-sensors/broker.pckl" in named
    assert inside("systemctl", "reload", "mpubsubd@sensors").returncode == 0
    assert "reloaded " in sandbox.journal("mpubsubd@sensors")
    for unit in ("mpubsubd@sensors", "mpubsubd@lab"):
        assert inside("systemctl", "stop", unit).returncode == 0
    assert inside("test", "-e", "/run/mpubsub-lab").returncode != 0  # RuntimeDirectory=
    assert inside("systemctl", "is-active", "mpubsubd").stdout == "active\n"


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
        processes = box.inside("ps", "-e", "-o", "user=,pid=,comm=").stdout.splitlines()
        bridge = [line.split()[:2] for line in processes if "mpubsubd-bridge" in line]
        assert [user for user, _ in bridge] == ["nobody"]  # as mpubsubd's user, too
        cgroup = box.inside("cat", f"/proc/{bridge[0][1]}/cgroup").stdout
        assert "/mpubsubd.service" in cgroup, cgroup  # in the unit's cgroup: stops with it
        # Not dumpable: its /proc files are root's, so nobody else's process reads its keys.
        assert box.owner(f"/proc/{bridge[0][1]}/mem").startswith("root:")
        assert box.inside("systemctl", "stop", "mpubsubd").returncode == 0
        # The bridge's last line may reach journald a moment after the unit stopped.
        journal = wait_for(lambda: "bridge stopped" in box.journal() and box.journal())
        assert f"connected to NATS at {nats_url}" in journal, journal
        assert "federation bridge started" in journal
        assert "exited with status" not in journal  # stopped, not failed
    finally:
        box.stop()
