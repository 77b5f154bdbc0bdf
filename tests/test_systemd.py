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
    pytest.skip("systemd-sandbox is not available")


@pytest.fixture
def installed() -> Iterator[Path]:
    """``make install`` into a directory outside /tmp (the sandbox mounts its own /tmp)."""
    if (
        os.geteuid() != 0
        or not shutil.which("unshare")
        or not os.path.exists("/lib/systemd/systemd")
    ):
        pytest.skip("needs root, unshare and systemd")
    base = Path(tempfile.mkdtemp(prefix="mpubsub-systemd-", dir="/var/lib"))
    try:
        subprocess.run(
            ["make", "-s", "install", f"PREFIX={base}/prefix", f"SYSCONFDIR={base}/etc"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unit_under_systemd(installed: Path) -> None:
    """start, connect through /run/mpubsub/broker.pckl, reload, read the journal, stop."""
    sandbox = find_sandbox()
    unit = installed / "prefix" / "lib" / "systemd" / "system" / "mpubsubd.service"
    dropin = installed / "10-test.conf"
    command = (
        f"{installed}/prefix/bin/mpubsubd --foreground -c {installed}/etc/mpubsub/mpubsubd.conf"
    )
    dropin.write_text(f"[Service]\nExecStart=\nExecStart={command}\n")
    started = subprocess.run(
        [sandbox, "start", str(unit), "--", str(dropin)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if started.returncode != 0:
        pytest.skip(f"systemd-sandbox could not boot: {started.stderr.strip()}")
    pid = started.stdout.strip()
    try:

        def inside(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sandbox, "exec", pid, *args], capture_output=True, text=True, timeout=120
            )

        assert inside("systemctl", "start", "mpubsubd").returncode == 0
        assert inside("systemctl", "is-active", "mpubsubd").stdout == "active\n"
        client = inside(
            "env",
            f"PYTHONPATH={installed}/prefix/lib/mpubsub",
            "/usr/bin/python3",
            "-c",
            "from mpubsub import NetPubSub\n"
            "with NetPubSub.from_file('/run/mpubsub/broker.pckl') as p:\n"
            "    print('flushed', p.flush())\n",
        )
        assert client.stdout == "flushed True\n", client.stderr
        assert inside("systemctl", "reload", "mpubsubd").returncode == 0
        assert inside("systemctl", "is-active", "mpubsubd").stdout == "active\n"
        assert inside("systemctl", "stop", "mpubsubd").returncode == 0
        journal = inside("journalctl", "-u", "mpubsubd", "--no-pager").stdout
        lines: List[str] = [
            "mpubsubd 0.1.0 serving; clients read /run/mpubsub/broker.pckl",
            "SIGHUP: nothing to reopen, logging to stderr",
            "mpubsubd stopped",
        ]
        for line in lines:
            assert line in journal, journal
        assert inside("test", "-e", "/run/mpubsub/broker.pckl").returncode != 0
    finally:
        subprocess.run([sandbox, "stop", pid], capture_output=True, timeout=30)
