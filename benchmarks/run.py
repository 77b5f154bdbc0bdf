"""``make bench``: this project beside mpubsub 0.0.1 and a pyzmq proxy, in one run.

mpubsub 0.0.1 is imported as ``mpubsub`` too, so it lives in its own
virtualenv (``.bench-venv``, with pyzmq beside it). Every measurement runs
in a fresh interpreter; the rounds alternate between the systems so that
the machine's noise hits them alike, and the median of the rounds is
reported with its ratio to 0.0.1 and to the pyzmq proxy. The tables are
printed and written to ``benchmarks/results/latest.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
BASELINE_VENV = HERE.parent / ".bench-venv"
BASELINE_PACKAGES = ["mpubsub==0.0.1", "pyzmq"]
RESULTS = HERE / "results" / "latest.md"

THIS, V001, ZMQ = "mpubsub (this)", "mpubsub 0.0.1", "pyzmq XSUB/XPUB proxy"

# (title, scenario arguments, figure, unit, higher is better)
REMOTE = [
    (
        "1 publisher -> 1 subscriber",
        ["throughput", "--subscribers", "1"],
        "deliveries_per_s",
        "msg/s",
        True,
    ),
    (
        "1 publisher -> 4 subscribers",
        ["throughput", "--subscribers", "4"],
        "deliveries_per_s",
        "deliveries/s",
        True,
    ),
    ("round trip, median", ["rtt"], "rtt_p50_us", "us", False),
    ("round trip, p99", ["rtt"], "rtt_p99_us", "us", False),
]


def baseline_python() -> Path:
    """The baseline's interpreter, creating its virtualenv the first time."""
    python = BASELINE_VENV / "bin" / "python"
    stamp = BASELINE_VENV / ".installed"
    wanted = "\n".join(BASELINE_PACKAGES) + "\n"
    if not stamp.exists() or stamp.read_text() != wanted:
        venv.create(BASELINE_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *BASELINE_PACKAGES], check=True
        )
        stamp.write_text(wanted)
    return python


def run_json(python: Path, script: str, *args: str) -> Dict[str, Any]:
    # -I keeps the project's source tree off sys.path, so each interpreter
    # imports its own installed mpubsub.
    out = subprocess.run(
        [str(python), "-I", str(HERE / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result: Dict[str, Any] = json.loads(out)
    return result


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def ratio(value: float, base: Optional[float]) -> str:
    return f"{value / base:.2f}x" if base else "-"


class Bench:
    def __init__(self, quick: bool, rounds: int) -> None:
        self.quick = quick
        self.rounds = 1 if quick else rounds
        this = Path(sys.executable)
        if quick:
            self.local = {THIS: this}
            self.remote = {THIS: (this, "this")}
        else:
            baseline = baseline_python()
            self.local = {THIS: this, V001: baseline}
            self.remote = {THIS: (this, "this"), V001: (baseline, "v001"), ZMQ: (baseline, "zmq")}
        self.samples: Dict[Tuple[str, str], List[float]] = {}

    def add(self, system: str, key: str, value: float) -> None:
        self.samples.setdefault((system, key), []).append(value)

    def median(self, system: str, key: str) -> Optional[float]:
        values = self.samples.get((system, key))
        return statistics.median(values) if values else None

    def measure(self) -> None:
        number = "2000" if self.quick else "200000"
        count = {
            "throughput": "2000" if self.quick else "50000",
            "rtt": "200" if self.quick else "3000",
        }
        for _ in range(self.rounds):
            for system, python in self.local.items():
                result = run_json(python, "local_publish.py", "--number", number)
                self.add(system, "publish_ns", result["publish_ns"])
                self.add(system, "call_ns", result["call_ns"])
            for _title, args, _key, _unit, _ in REMOTE[:3]:
                for system, (python, name) in self.remote.items():
                    result = run_json(
                        python,
                        "remote.py",
                        "--system",
                        name,
                        "--scenario",
                        args[0],
                        "--count",
                        count[args[0]],
                        *args[1:],
                    )
                    for key, value in result.items():
                        self.add(system, f"{' '.join(args)}:{key}", value)

    def report(self) -> str:
        date = datetime.date.today().isoformat()
        lines = [f"Measured {date} on {machine()}; median of {self.rounds} round(s).", ""]
        lines += ["## Local publish (two-level topic, one subscriber)", ""]
        lines += ["| system | ns per publish | vs 0.0.1 |", "|---|---:|---:|"]
        base = self.median(V001, "publish_ns")
        for system in self.local:
            value = self.median(system, "publish_ns")
            assert value is not None
            lines.append(f"| {system} | {value:.0f} | {ratio(value, base)} |")
        floor = self.median(THIS, "call_ns")
        lines += [f"| plain function call (floor) | {floor:.0f} | - |", ""]
        lines += ["## Remote, through a broker (64-byte payload, Unix sockets)", ""]
        lines += [
            "| scenario | system | figure | vs 0.0.1 | vs pyzmq |",
            "|---|---|---:|---:|---:|",
        ]
        for title, args, key, unit, _higher in REMOTE:
            full = f"{' '.join(args)}:{key}"
            v001, zmq = self.median(V001, full), self.median(ZMQ, full)
            for system in self.remote:
                value = self.median(system, full)
                assert value is not None
                lines.append(
                    f"| {title} | {system} | {value:,.0f} {unit} | {ratio(value, v001)} "
                    f"| {ratio(value, zmq)} |"
                )
        return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bench = Bench(args.quick, args.rounds)
    print(f"# Machine: {machine()}", flush=True)
    bench.measure()
    report = bench.report()
    print(report)
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text("# mpubsub benchmarks\n\n" + report)


if __name__ == "__main__":
    main()
