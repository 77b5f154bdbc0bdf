"""``make bench``: this project beside mpubsub 0.0.1, measured in one run.

mpubsub 0.0.1 is imported as ``mpubsub`` too, so it lives in its own
virtualenv (``.bench-venv``); each measurement runs in a fresh interpreter,
alternating between the systems so that machine noise hits both alike, and
the median of the rounds is reported with the ratio to 0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
BASELINE_VENV = HERE.parent / ".bench-venv"
BASELINE = "mpubsub==0.0.1"


def baseline_python() -> Path:
    """The baseline's interpreter, creating its virtualenv the first time."""
    python = BASELINE_VENV / "bin" / "python"
    stamp = BASELINE_VENV / ".installed"
    if not stamp.exists():
        venv.create(BASELINE_VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", BASELINE], check=True)
        stamp.write_text(BASELINE + "\n")
    return python


def run_local(python: Path, number: int) -> Dict[str, Any]:
    # -I keeps the project's source tree off sys.path, so each interpreter
    # imports its own installed mpubsub.
    out = subprocess.run(
        [str(python), "-I", str(HERE / "local_publish.py"), "--number", str(number)],
        check=True,
        capture_output=True,
        text=True,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    systems = {"mpubsub (this)": Path(sys.executable)}
    if not args.quick:
        systems["mpubsub 0.0.1"] = baseline_python()
    rounds, number = (1, 2_000) if args.quick else (args.rounds, 200_000)

    print(f"# Machine: {machine()}")
    samples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, python in systems.items():
            samples[name].append(run_local(python, number))

    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in ("publish_ns", "call_ns")}
        for name, runs in samples.items()
    }
    base = medians.get("mpubsub 0.0.1")
    print("\n## Local publish, two-level topic, one subscriber (median of rounds)\n")
    print("| system | ns per publish | vs 0.0.1 |")
    print("|---|---:|---:|")
    for name, m in medians.items():
        ratio = f"{m['publish_ns'] / base['publish_ns']:.2f}x" if base else "-"
        print(f"| {name} | {m['publish_ns']:.0f} | {ratio} |")
    floor = statistics.median(m["call_ns"] for m in medians.values())
    print(f"| plain function call (floor) | {floor:.0f} | - |")


if __name__ == "__main__":
    main()
