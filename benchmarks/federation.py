"""Across hosts through NATS: this project's federation beside plain nats-py, in one run.

- ``--system this``: two hosts, each an ``mpubsubd -f`` with its own socket
  and its bridge, joined by a private nats-server on loopback; the publisher
  (or pinger) is a NetPubSub on host a, the subscribers (or echo) on host b.
  The same scenarios as ``remote.py`` (throughput, rtt), through
  broker a -> bridge a -> NATS -> bridge b -> broker b.
- ``--system nats``: what a user would write by hand with nats-py alone:
  asyncio clients publishing pickled messages straight to the same kind of
  nats-server (no signature, no local broker). The floor to compare with.

Runs in this project's virtualenv (mpubsubd and nats-py); prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -I: find remote.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # and the tests' servers

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


# --- nats-py alone ---------------------------------------------------------------


def nats_subscriber(url: str, count: int, ready: Any, results: Any) -> None:
    import nats  # noqa: PLC0415

    async def main() -> None:
        nc = await nats.connect(url)
        seen = [0, 0.0]
        done = asyncio.Event()

        async def on_data(msg: Any) -> None:
            message = pickle.loads(msg.data)
            if message["seq"] < 0:
                ready.set()
                return
            seen[0] += 1
            seen[1] = time.monotonic()
            if seen[0] >= count:
                done.set()

        await nc.subscribe("bench", cb=on_data)
        await nc.flush()
        with contextlib.suppress(asyncio.TimeoutError):  # report what came
            await asyncio.wait_for(done.wait(), 120)
        results.put((seen[1], seen[0]))
        await nc.close()

    asyncio.run(main())


def nats_throughput(url: str, count: int, size: int) -> Dict[str, Any]:
    import nats  # noqa: PLC0415

    ready, results = remote.CTX.Event(), remote.CTX.Queue()
    proc = remote.CTX.Process(target=nats_subscriber, args=(url, count, ready, results))
    proc.start()
    data = b"x" * size

    async def main() -> float:
        nc = await nats.connect(url)
        while not ready.is_set():
            await nc.publish("bench", pickle.dumps({"seq": -1, "data": b""}, protocol=5))
            await asyncio.sleep(0.01)
        started = time.monotonic()
        for seq in range(count):
            await nc.publish("bench", pickle.dumps({"seq": seq, "data": data}, protocol=5))
        await nc.flush()
        await nc.close()
        return started

    started = asyncio.run(main())
    end, received = results.get(timeout=180)
    proc.join(30)
    elapsed = end - started if received else 1.0
    return {"deliveries_per_s": received / elapsed, "elapsed_s": elapsed, "lost": count - received}


def nats_echo(url: str, ready: Any, stop_event: Any) -> None:
    import nats  # noqa: PLC0415

    async def main() -> None:
        nc = await nats.connect(url)

        async def on_ping(msg: Any) -> None:
            message = pickle.loads(msg.data)
            await nc.publish("pong", pickle.dumps({"seq": message["seq"]}, protocol=5))

        await nc.subscribe("ping", cb=on_ping)
        await nc.flush()
        ready.set()
        while not stop_event.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    asyncio.run(main())


def nats_rtt(url: str, count: int) -> Dict[str, Any]:
    import nats  # noqa: PLC0415

    ready, stop_event = remote.CTX.Event(), remote.CTX.Event()
    proc = remote.CTX.Process(target=nats_echo, args=(url, ready, stop_event))
    proc.start()
    ready.wait(30)

    async def main() -> List[float]:
        nc = await nats.connect(url)
        pongs: asyncio.Queue[int] = asyncio.Queue()

        async def on_pong(msg: Any) -> None:
            pongs.put_nowait(pickle.loads(msg.data)["seq"])

        await nc.subscribe("pong", cb=on_pong)
        await nc.flush()
        samples = []
        for seq in range(count):
            started = time.perf_counter()
            await nc.publish("ping", pickle.dumps({"seq": seq}, protocol=5))
            while await pongs.get() != seq:
                pass
            samples.append(time.perf_counter() - started)
        await nc.close()
        return samples

    samples = sorted(asyncio.run(main()))
    stop_event.set()
    proc.join(30)
    return {
        "rtt_p50_us": statistics.median(samples) * 1e6,
        "rtt_p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


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
        if args.system == "this":
            args.subscribers, args.stall, args.idle = 1, 60.0, 0
            result = remote.run_scenario(Federated(workdir), args)
        else:
            server = start_nats(workdir)
            try:
                if args.scenario == "throughput":
                    result = nats_throughput(server.url, args.count, args.size)
                else:
                    result = nats_rtt(server.url, args.count)
            finally:
                server.stop()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
