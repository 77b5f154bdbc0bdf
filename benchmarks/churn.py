"""Another client's round trip while one client churns beside 100,000 subscriptions.

The attack of issue 12: one client holds 100,000 subscriptions and sends
rounds of 400 x (SUB, broadcast, UNSUB, broadcast), 17 KB each; meanwhile
an honest client pings the broker (``flush()``) as fast as it can, for a
few seconds. Prints JSON: the honest client's worst, p99 and median round
trip (ms) and the time the broker took per round of churn (s). The old
broker spent 8 s per round, and the honest ping waited for it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

from mpubsub import NetPubSub
from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import read_credentials

EMPTY_DICT = b"\x80\x05}\x94."  # pickle.dumps({}, protocol=5)


def start_broker(directory: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "mpubsub.broker", str(directory / "b.pckl")]
    command += ["--address", str(directory / "b.sock")]
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True).stdout
    if "--max-subscriptions" in usage:  # a broker with caps: let the attack through
        command += ["--max-subscriptions", "200000", "--max-subscription-bytes", "100000000"]
    broker = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (directory / "b.pckl").exists():
        if time.monotonic() > deadline or broker.poll() is not None:
            raise RuntimeError("the broker did not start")
        time.sleep(0.01)
    return broker


def ping_raw(sock: socket.socket) -> None:
    """PING on a raw connection; wait for its PONG, skipping whatever else arrives."""
    sock.sendall(proto.frame(proto.PING, b""))
    decoder = proto.FrameDecoder(1 << 30)
    while True:
        if any(kind == proto.PONG for kind, _ in decoder.feed(sock.recv(1 << 20))):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriptions", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="churn for this long at least")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpubsub-churn-") as tmp:
        directory = Path(tmp)
        broker = start_broker(directory)
        try:
            address, authkey = read_credentials(directory / "b.pckl")
            churner = connect_socket(address, 60)
            handshake(churner, authkey)
            churner.sendall(
                b"".join(
                    proto.frame(proto.SUB, proto.encode_topic(("s", str(n))))
                    for n in range(args.subscriptions)
                )
            )
            ping_raw(churner)
            pinger = NetPubSub(address, authkey, timeout=60)
            pinger.connect()
            pinger.add_subscriber("elsewhere", print)
            pinger.flush()
            churn = b""
            broadcast = proto.pub_frame(b"", EMPTY_DICT)
            for n in range(400):
                extra = proto.encode_topic(("churn", str(n)))
                churn += proto.frame(proto.SUB, extra) + broadcast
                churn += proto.frame(proto.UNSUB, extra) + broadcast
            pings: List[float] = []
            done = threading.Event()
            took: List[float] = []

            def churning() -> None:
                started = time.perf_counter()
                rounds = 0
                while not rounds or time.perf_counter() - started < args.seconds:
                    churner.sendall(churn)
                    ping_raw(churner)
                    rounds += 1
                took.append((time.perf_counter() - started) / rounds)
                done.set()

            thread = threading.Thread(target=churning)
            thread.start()
            while not done.is_set():
                started = time.perf_counter()
                pinger.flush()
                pings.append((time.perf_counter() - started) * 1000)
            thread.join()
            pinger.disconnect()
            churner.close()
        finally:
            broker.terminate()
            broker.wait(10)
    pings.sort()
    print(
        json.dumps(
            {
                "ping_max_ms": pings[-1],
                "ping_p99_ms": pings[min(len(pings) - 1, int(len(pings) * 0.99))],
                "ping_p50_ms": statistics.median(pings),
                "churn_round_s": took[0],
                "pings": len(pings),
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
