"""Servers and processes for the tests and the benchmarks alike (no pytest here).

Each starts on loopback, on a port free now, and is stopped by its pid:
never anything this process did not start.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *condition* until it is truthy; TimeoutError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def stop_process(proc: Optional[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM *proc* if it runs, SIGKILL it if it is still there after *timeout* s; reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    """A loopback TCP port free now, for a server started next.

    Below the range the kernel picks connections' own ports from: a port
    from it could become some connection's end before the server binds it
    (seen: nats-server's "address already in use" in a busy run).
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(10_000, low - 10_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port below the ephemeral range")


class NatsServer:
    """One nats-server on loopback, optionally a node of a cluster."""

    def __init__(self, base: Path, name: str, *args: str, port: int = 0) -> None:
        self.port, self.monitor = port or free_port(), free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log = base / f"{name}.log"
        self.args = [
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor),
            "-n",
            name,
            *args,
        ]
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, routes: int = 0) -> NatsServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log)
        wait_until(lambda: self._routes() >= routes, what=f"nats-server with {routes} routes")
        return self

    def _routes(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/routez", timeout=1) as r:
                return int(json.load(r)["num_routes"])
        except OSError:
            return -1

    def stop(self) -> None:
        stop_process(self.proc)
