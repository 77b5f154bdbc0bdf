"""Across hosts through NATS: this project's federation beside plain nats-py, in one run.

- ``--system this``: two hosts, each an ``mpubsubd -f`` with its own socket
  and its bridge, joined by a private nats-server on loopback; the publisher
  (or pinger) is a NetPubSub on host a, the subscribers (or echo) on host b.
  The same scenarios as ``remote.py`` (throughput, rtt), through
  broker a -> bridge a -> NATS -> bridge b -> broker b.
- ``--system nats``: what a user would write by hand with nats-py alone:
  asyncio clients publishing pickled messages straight to the same kind of
  nats-server (no signature, no local broker), as ``host.py`` measures them.
  The floor to compare with.

Runs in this project's virtualenv (mpubsubd and nats-py); prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -I: find remote.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # and the tests' servers

import host
import remote

from tests.processes import NATS_SERVER, NatsServer, stop_process, wait_until

SECRET = os.urandom(32)


def start_nats(workdir: str) -> NatsServer:
    return NatsServer(Path(workdir), "nats").start()


class Federated(remote.System):
    """Two mpubsubd hosts and a nats-server; publisher on a, everyone else on b."""

    def start(self) -> None:
        self.hosts: Dict[str, subprocess.Popen[bytes]] = {}
        self.nats = start_nats(self.workdir)
        try:
            self._start_hosts()
        except BaseException:
            self.stop()  # a host that failed must not leave the others running
            raise

    def _start_hosts(self) -> None:
        secret = Path(self.workdir) / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        for name in ("a", "b"):
            base = Path(self.workdir) / name
            base.mkdir()
            config = base / "mpubsubd.conf"
            config.write_text(
                f"[mpubsubd]\naddress = {base / 'broker.sock'}\n"
                f"credentials = {base / 'broker.pckl'}\npidfile = {base / 'mpubsubd.pid'}\n"
                "log_level = WARNING\n"
                f"[federation]\nservers = {self.nats.url}\nsecret_file = {secret}\nname = {name}\n"
            )
            with open(base / "stderr.log", "wb") as log:
                self.hosts[name] = subprocess.Popen(
                    [sys.executable, "-m", "mpubsubd", "-f", "-c", str(config)],
                    stdout=log,
                    stderr=log,
                )
        for name in self.hosts:
            wait_until(functools.partial(self._connected, name), 30, f"host {name} to join NATS")

    def _connected(self, name: str) -> bool:
        if self.hosts[name].poll() is not None:
            raise RuntimeError(f"mpubsubd {name} exited")
        if not self._credentials(name).exists():
            return False
        from mpubsub import NetPubSub  # noqa: PLC0415

        with NetPubSub.from_file(str(self._credentials(name))) as pubsub:
            stats = pubsub.broker_statistics() or {}
        return bool((stats.get("federation") or {}).get("state") == "connected")

    def _credentials(self, name: str) -> Path:
        return Path(self.workdir) / name / "broker.pckl"

    def stop(self) -> None:
        for proc in self.hosts.values():
            stop_process(proc, 20)
        self.nats.stop()

    @property
    def broker_pid(self) -> int:
        return self.hosts["b"].pid

    def _client_on(self, name: str) -> Any:
        from mpubsub import NetPubSub  # noqa: PLC0415

        pubsub = NetPubSub.from_file(str(self._credentials(name)))
        pubsub.connect()
        return remote.MpubsubClient(pubsub, legacy=False)

    def client(self) -> Any:
        return self._client_on("b")

    def publisher(self) -> Any:
        return self._client_on("a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["this", "nats"], required=True)
    parser.add_argument("--scenario", choices=["throughput", "rtt"], required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if not os.path.exists(NATS_SERVER):
        json.dump({}, sys.stdout)  # no nats-server here: nothing to measure
        return
    with tempfile.TemporaryDirectory(prefix="mpubsub-bench-fed-") as workdir:
        args.subscribers, args.stall, args.idle = 1, 60.0, 0
        if args.system == "this":
            result = remote.run_scenario(Federated(workdir), args)
        else:
            result = host.run_scenario(host.Nats(workdir), args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
