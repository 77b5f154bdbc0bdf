"""``make bench``: this project beside its peers, measured in one run.

Peers: mpubsub 0.0.1 (imported as ``mpubsub`` too, so it lives in its own
virtualenv, ``.bench-venv``, with the others), blinker and PyPubSub in
process; a pyzmq XSUB/XPUB proxy and Redis pub/sub (redis-py, when a
``redis-server`` binary exists) across processes. Every measurement runs in
fresh processes; the rounds alternate between the systems so that the
machine's noise hits them alike; each figure is the median of the rounds,
printed with its ratio to 0.0.1 and to the pyzmq proxy. Across hosts,
two mpubsubd federated through a private nats-server stand beside nats-py
used alone (``federation.py``; skipped without ``nats-server``). On one host
(``host.py``): this project's clients, threaded and asyncio, beside the
brokers people run as system services, each with its usual client:
nats-server and nats-py, mosquitto and paho-mqtt, dbus-daemon and
dbus-fast (the latter two in the peers' virtualenv, hence not in a
``--quick`` run before a full one made it). The tables go to
``benchmarks/results/latest.md`` and a chart to ``latest.png``. Under
attack (``churn.py``): another client's round trips while one churns its
subscriptions beside 100,000 of them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
BASELINE_VENV = HERE.parent / ".bench-venv"
PEERS_STAMP = BASELINE_VENV / ".installed"  # the PEERS it holds
PEERS = [
    "mpubsub==0.0.1",
    "pyzmq",
    "blinker",
    "pypubsub",
    "redis",
    "matplotlib",
    "paho-mqtt",
    "dbus-fast",
]
RESULTS = HERE / "results"

THIS, V001, ZMQ, REDIS = "mpubsub (this)", "mpubsub 0.0.1", "pyzmq proxy", "Redis pub/sub"
BLINKER, PYPUBSUB = "blinker", "PyPubSub"
LOCAL_SYSTEMS = {THIS: "this", V001: "v001", BLINKER: "blinker", PYPUBSUB: "pypubsub"}
LOCAL = [
    ("1/1", "1 subscriber, 1-level topic"),
    ("1/2", "1 subscriber, 2-level topic"),
    ("1/3", "1 subscriber, 3-level topic"),
    ("10/1", "10 subscribers, 1-level topic"),
    ("10/3", "10 subscribers, 3-level topic"),
]

# (title, remote.py arguments, figure, unit, higher is better)
Remote = Tuple[str, List[str], str, str, bool]
REMOTE: List[Remote] = [
    ("1 -> 1, 64 B", ["throughput"], "deliveries_per_s", "msg/s", True),
    (
        "1 -> 4, 64 B",
        ["throughput", "--subscribers", "4"],
        "deliveries_per_s",
        "deliveries/s",
        True,
    ),
    ("round trip p50", ["rtt"], "rtt_p50_us", "us", False),
    ("round trip p99", ["rtt"], "rtt_p99_us", "us", False),
    ("1 -> 1, 1 KiB", ["throughput", "--size", "1024"], "deliveries_per_s", "msg/s", True),
    ("1 -> 1, 64 KiB", ["throughput", "--size", "65536"], "deliveries_per_s", "msg/s", True),
    (
        "1 -> 1, 100 idle clients",
        ["throughput", "--idle", "100", "--stall", "5"],
        "deliveries_per_s",
        "msg/s",
        True,
    ),
]
# On one host: the same scenarios through the brokers a sysadmin would run instead;
# the threaded client's figures are those of REMOTE's rows, in the same round.
AIO, AIO_UVLOOP = "asyncio mpubsub", "asyncio mpubsub, uvloop"
NATS_HOST, MQTT, DBUS = "nats-py + nats-server", "paho-mqtt + mosquitto", "dbus-fast + dbus-daemon"
ON_HOST = REMOTE[:4]
# The cost of a policy: the same scenarios, clients as nobody, without and with 20 rules.
NOBODY, POLICY = "this, clients as nobody", "the same, 20-rule policy"
POLICIES = {NOBODY: ["--as-nobody"], POLICY: ["--as-nobody", "--policy"]}
POLICY_SCENARIOS = REMOTE[:2]
SCALE = [1, 10, 100, 500]
CHURN = ["ping_max_ms", "ping_p99_ms", "ping_p50_ms", "churn_round_s"]

FEDERATED, NATS_PY = "mpubsub, two hosts via NATS", "nats-py alone"
ACROSS = {FEDERATED: "this", NATS_PY: "nats"}
# (title, federation.py arguments, figure, unit, higher is better)
ACROSS_HOSTS: List[Remote] = [
    ("1 -> 1 across hosts, 64 B", ["throughput"], "deliveries_per_s", "msg/s", True),
    ("round trip across hosts p50", ["rtt"], "rtt_p50_us", "us", False),
    ("round trip across hosts p99", ["rtt"], "rtt_p99_us", "us", False),
]


def peers_python() -> Path:
    """The peers' interpreter, creating their virtualenv the first time."""
    python = BASELINE_VENV / "bin" / "python"
    if not peers_installed():
        venv.create(BASELINE_VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEERS], check=True)
        PEERS_STAMP.write_text("\n".join(PEERS) + "\n")
    return python


def peers_installed() -> bool:
    """Whether the peers' virtualenv holds every peer (a --quick run installs none)."""
    return PEERS_STAMP.exists() and PEERS_STAMP.read_text() == "\n".join(PEERS) + "\n"


def run_json(python: Path, script: str, *args: str) -> Dict[str, Any]:
    # -I keeps the project's tree off sys.path: each interpreter imports its own mpubsub.
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


def scenario(script: str, args: List[str]) -> str:
    """Where the figures of one scenario are filed: its script and arguments."""
    return f"{script} {' '.join(args)}:"


def ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


class Bench:
    def __init__(self, quick: bool, rounds: int) -> None:
        self.quick = quick
        self.rounds = 1 if quick else rounds
        this = Path(sys.executable)
        self.pythons = {THIS: this, FEDERATED: this, NATS_PY: this}
        self.remote = {THIS: "this"}
        if not quick:
            peers = peers_python()
            self.pythons.update({V001: peers, BLINKER: peers, PYPUBSUB: peers, ZMQ: peers})
            self.remote.update({V001: "v001", ZMQ: "zmq"})
            if shutil.which("redis-server"):
                self.pythons[REDIS] = peers
                self.remote[REDIS] = "redis"
        self.host = {AIO: "aio", AIO_UVLOOP: "aio-uvloop", NATS_HOST: "nats"}
        if not importlib.util.find_spec("uvloop"):
            del self.host[AIO_UVLOOP]
        self.pythons.update({system: this for system in self.host})
        if peers_installed():  # MQTT's and D-Bus's clients are peers
            self.host.update({MQTT: "mqtt", DBUS: "dbus"})
            self.pythons.update({MQTT: peers_python(), DBUS: peers_python()})
        self.samples: Dict[Tuple[str, str], List[float]] = {}

    def add(self, system: str, key: str, value: float) -> None:
        self.samples.setdefault((system, key), []).append(value)

    def median(self, system: str, key: str) -> Optional[float]:
        values = self.samples.get((system, key))
        return statistics.median(values) if values else None

    def count(self, args: List[str]) -> str:
        if args[0] == "rtt":
            return "200" if self.quick else "1000"
        size = int(args[args.index("--size") + 1]) if "--size" in args else 64
        full = min(10_000, 20_000_000 // size)  # at most 20 MB per run
        return "500" if self.quick else str(full)

    def measure(self) -> None:
        for _ in range(self.rounds):
            self.measure_local()
            self.measure_scenarios(REMOTE, self.remote, "remote.py")
            self.measure_scenarios(ON_HOST, self.host, "host.py")
            self.measure_policy()
            self.measure_scenarios(ACROSS_HOSTS, ACROSS, "federation.py")
        self.measure_scale()  # one round: a table of this project alone, not a comparison
        self.record(  # the same: one round, this project alone
            THIS,
            "churn:",
            self.pythons[THIS],
            "churn.py",
            "--seconds",
            "0.5" if self.quick else "3",
        )

    def record(self, system: str, prefix: str, python: Path, *args: str) -> None:
        """Run a benchmark script; file each figure it prints under *prefix*."""
        for key, value in run_json(python, *args).items():
            self.add(system, f"{prefix}{key}", value)

    def measure_local(self) -> None:
        number = "2000" if self.quick else "50000"
        for system, name in LOCAL_SYSTEMS.items():
            if system in self.pythons:
                self.record(
                    system,
                    "local:",
                    self.pythons[system],
                    "local_publish.py",
                    *("--system", name, "--number", number, "--repeat", "3"),
                )

    def measure_scenarios(self, table: List[Remote], systems: Dict[str, str], script: str) -> None:
        """Each distinct scenario of *table* once per system, with *script*."""
        for args in {" ".join(args): args for _, args, *_ in table}.values():
            for system, name in systems.items():
                self.record(
                    system,
                    scenario(script, args),
                    self.pythons[system],
                    script,
                    *("--system", name, "--scenario", args[0], "--count", self.count(args)),
                    *args[1:],
                )

    def measure_policy(self) -> None:
        """The throughput scenarios without and with a policy, alternating, as nobody."""
        if os.geteuid() != 0:
            return  # clients as nobody need root to become it
        for _, args, *_ in POLICY_SCENARIOS:
            # Five times the messages: a difference of a few per cent must show.
            count = str(int(self.count(args)) * (1 if self.quick else 5))
            for system, flags in POLICIES.items():
                self.record(
                    system,
                    scenario("remote.py", args),
                    self.pythons[THIS],
                    "remote.py",
                    *("--system", "this", "--scenario", args[0], "--count", count),
                    *args[1:],
                    *flags,
                )

    def measure_scale(self) -> None:
        for subscribers in SCALE[:2] if self.quick else SCALE:
            self.record(
                THIS,
                f"scale {subscribers}:",
                self.pythons[THIS],
                "remote.py",
                *("--system", "this", "--scenario", "scale", "--subscribers", str(subscribers)),
                *("--count", "20" if self.quick else "100"),
            )

    def report(self) -> str:
        date = datetime.date.today().isoformat()
        lines = [f"Measured {date} on {machine()}; median of {self.rounds} round(s).", ""]
        lines += ["## In process: ns per publish", ""]
        lines += [
            "| scenario | "
            + " | ".join(s for s in LOCAL_SYSTEMS if s in self.pythons)
            + " | this vs 0.0.1 | plain call |"
        ]
        lines += ["|---" * (len([s for s in LOCAL_SYSTEMS if s in self.pythons]) + 3) + "|"]
        for key, title in LOCAL:
            values = [self.median(s, f"local:{key}") for s in LOCAL_SYSTEMS if s in self.pythons]
            cells = " | ".join(f"{v:,.0f}" for v in values if v is not None)
            base = self.median(V001, f"local:{key}")
            floor = self.median(THIS, "local:call") or 0
            lines.append(f"| {title} | {cells} | {ratio(values[0], base)} | {floor:.0f} |")
        lines += ["", "## Across processes, through a broker (Unix sockets)", ""]
        lines += [
            "| scenario | system | figure | vs 0.0.1 | vs pyzmq |",
            "|---|---|---:|---:|---:|",
        ]
        for title, args, key, unit, _higher in REMOTE:
            full = scenario("remote.py", args) + key
            for system in self.remote:
                value, shown = self.shown(system, scenario("remote.py", args), key, unit)
                versus = [ratio(value, self.median(base, full)) for base in (V001, ZMQ)]
                lines.append(f"| {title} | {system} | {shown} | {versus[0]} | {versus[1]} |")
        lines += self.report_on_host()
        lines += ["", "## The cost of a policy (same run)", ""]
        lines += [
            "Clients as user nobody (root may do everything, whatever the policy), without"
            " and with a 20-rule policy whose default is deny: each publish is checked and"
            " each route filtered.",
            "",
            f"| scenario | {NOBODY} | {POLICY} | ratio |",
            "|---|---:|---:|---:|",
        ]
        for title, args, key, unit, _higher in POLICY_SCENARIOS:
            full = scenario("remote.py", args) + key
            plain, ruled = (self.median(system, full) for system in POLICIES)
            if plain is not None and ruled is not None:
                lines.append(
                    f"| {title} | {plain:,.0f} {unit} | {ruled:,.0f} {unit} | "
                    f"{ratio(ruled, plain)} |"
                )
        lines += ["", "## Across hosts, through a private nats-server (loopback)", ""]
        lines += [
            "Publisher on host a, subscriber on host b: broker a -> bridge a -> NATS ->"
            " bridge b -> broker b, every message signed and checked; beside it, two"
            " nats-py clients talking straight to NATS.",
            "",
            "| scenario | system | figure | vs nats-py |",
            "|---|---|---:|---:|",
        ]
        for title, args, key, unit, _higher in ACROSS_HOSTS:
            full = scenario("federation.py", args) + key
            for system in ACROSS:
                value = self.median(system, full)
                if value is None:
                    continue  # no nats-server on this machine
                against = ratio(value, self.median(NATS_PY, full))
                lines.append(f"| {title} | {system} | {value:,.0f} {unit} | {against} |")
        count = "20" if self.quick else "100"
        lines += ["", f"## Scale: one publisher, {count} messages paced 5 ms apart (one round)", ""]
        lines += [
            "| subscribers | broker CPU per message | latency p50 | latency p99 |",
            "|---:|---:|---:|---:|",
        ]
        for subscribers in SCALE:
            cpu = self.median(THIS, f"scale {subscribers}:broker_cpu_us_per_message")
            p50 = self.median(THIS, f"scale {subscribers}:latency_p50_us")
            p99 = self.median(THIS, f"scale {subscribers}:latency_p99_us")
            if cpu is not None and p50 is not None and p99 is not None:
                lines.append(f"| {subscribers} | {cpu:,.0f} us | {p50:,.0f} us | {p99:,.0f} us |")
        lines += ["", "## Under attack: subscription churn beside 100,000 subscriptions", ""]
        lines += [
            "One client holds 100,000 subscriptions and sends rounds of 400 x (SUB,"
            " broadcast, UNSUB, broadcast) for 3 s; another client pings meanwhile"
            " (the broker before issue 12: 8 s per round, and the ping waited for it).",
            "",
            "| ping worst | ping p99 | ping p50 | broker time per round of churn |",
            "|---:|---:|---:|---:|",
        ]
        figures = [self.median(THIS, f"churn:{key}") for key in CHURN]
        if all(value is not None for value in figures):
            worst, p99, p50, per_round = (value or 0.0 for value in figures)
            lines.append(
                f"| {worst:,.2f} ms | {p99:,.2f} ms | {p50:,.2f} ms | {per_round * 1000:,.2f} ms |"
            )
        return "\n".join(lines) + "\n"

    def shown(self, system: str, prefix: str, key: str, unit: str) -> Tuple[Optional[float], str]:
        """A figure, and how a table shows it: "stalled", or with what was lost."""
        value = self.median(system, prefix + key)
        lost = self.median(system, prefix + "lost")
        shown = "stalled" if not value else f"{value:,.0f} {unit}"
        if lost:
            shown += f" ({lost:,.0f} lost)"
        return value, shown

    def on_host(self, system: str, args: List[str]) -> str:
        """Where an on-one-host figure is filed: the threaded client's is remote.py's."""
        return scenario("remote.py" if system == THIS else "host.py", args)

    def report_on_host(self) -> List[str]:
        lines = ["", "## On one host: the brokers a sysadmin would run instead (same run)", ""]
        lines += [
            "Each broker started privately for the run, with its usual Python client:"
            " mpubsub's and dbus-daemon on a Unix socket, nats-server and mosquitto on"
            " loopback TCP. The same message everywhere, a small dict: nats-py, paho-mqtt"
            " (QoS 0) and dbus-fast carry bytes, so the application pickles it. The"
            " threaded mpubsub's figures are the table above's.",
            "",
            "| scenario | system | figure | vs nats-py |",
            "|---|---|---:|---:|",
        ]
        for title, args, key, unit, _higher in ON_HOST:
            base = self.median(NATS_HOST, scenario("host.py", args) + key)
            for system in [THIS, *self.host]:
                if self.median(system, self.on_host(system, args) + key) is None:
                    continue  # no such broker on this machine
                value, shown = self.shown(system, self.on_host(system, args), key, unit)
                lines.append(f"| {title} | {system} | {shown} | {ratio(value, base)} |")
        return lines

    def chart(self, path: Path) -> None:
        """Bars per scenario, one colour per system (matplotlib, from the peers' venv)."""
        data: Dict[str, Any] = {
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
            "panels": [],
        }
        for key, title in LOCAL:
            data["panels"].append(
                {
                    "title": f"in process: {title}",
                    "unit": "ns per publish",
                    "higher": False,
                    "bars": {
                        s: self.median(s, f"local:{key}")
                        for s in LOCAL_SYSTEMS
                        if s in self.pythons
                    },
                }
            )
        tables = ((REMOTE, self.remote, "remote.py"), (ACROSS_HOSTS, ACROSS, "federation.py"))
        for table, systems, script in tables:
            for title, args, key, unit, higher in table:
                full = scenario(script, args) + key
                data["panels"].append(
                    {
                        "title": title,
                        "unit": unit,
                        "higher": higher,
                        "bars": {s: self.median(s, full) for s in systems},
                    }
                )
        for title, args, key, unit, higher in ON_HOST:
            data["panels"].append(
                {
                    "title": f"on one host: {title}",
                    "unit": unit,
                    "higher": higher,
                    "bars": {
                        s: self.median(s, self.on_host(s, args) + key) for s in [THIS, *self.host]
                    },
                }
            )
        spec = RESULTS / "latest.json"
        spec.write_text(json.dumps(data, indent=1))
        subprocess.run(
            [str(peers_python()), str(HERE / "chart.py"), str(spec), str(path)], check=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench = Bench(args.quick, args.rounds)
    print(f"# Machine: {machine()}", flush=True)
    bench.measure()
    report = bench.report()
    print(report)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.md").write_text("# mpubsub benchmarks\n\n" + report)
        bench.chart(RESULTS / "latest.png")


if __name__ == "__main__":
    main()
