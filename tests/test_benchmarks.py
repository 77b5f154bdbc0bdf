"""The benchmark scripts still run (a seconds-long smoke run, not a measurement)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs() -> None:
    """`make bench QUICK=1` prints a table with this project's figure."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "| mpubsub (this) |" in out
    assert "# Machine:" in out
    if shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists():
        assert "| mpubsub, two hosts via NATS |" in out
    ours = [
        line for line in out.splitlines() if "| mpubsub (this) |" in line or "two hosts" in line
    ]
    for line in ours:  # our own rows carry figures: nothing stalled, nothing lost
        assert "stalled" not in line and " lost)" not in line, line
    # On one host: the threaded and the asyncio clients, and nats-py (CI installs nats-server),
    # each scenario of the table with a figure.
    on_host = out.split("## On one host")[1].split("\n## ")[0]
    systems = ["mpubsub (this)", "asyncio mpubsub"]
    if shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists():
        systems.append("nats-py + nats-server")
    for system in systems:
        rows = [line for line in on_host.splitlines() if line.split(" | ")[1:2] == [system]]
        assert len(rows) == 4, (system, on_host)
        for row in rows:
            assert re.search(r"\| [\d,]+ (msg/s|deliveries/s|us) \|", row), row
            assert "stalled" not in row and " lost)" not in row, row
    if os.geteuid() == 0:  # the policy's rows: both scenarios, each measured both ways
        policy = out.split("## The cost of a policy")[1].split("##")[0]
        assert policy.count(" msg/s |") == 2 and policy.count(" deliveries/s |") == 2
