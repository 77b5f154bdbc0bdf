"""Remote pub-sub figures for one system, in whichever interpreter runs this.

``run.py`` runs it in this project's virtualenv (``--system this``) and in
the baseline's (``--system v001`` for mpubsub 0.0.1, ``--system zmq`` for a
pyzmq XSUB/XPUB proxy), so the same scenarios measure every system:

- ``throughput``: one publisher sends N small messages to S subscriber
  processes through a broker process; the figure is deliveries per second,
  from the first publish until every subscriber has the last message.
- ``rtt``: a client publishes a ping, an echo process answers with a pong,
  the client waits for it; the figures are the median and p99 round trip.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

AUTHKEY = b"benchmark key"
CTX = mp.get_context("fork")


# --- adapters: the same four verbs for every system ------------------------------


class System:
    """start_broker() in a child; client() returns an object with the verbs below."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def broker_main(self) -> None:
        raise NotImplementedError

    def client(self) -> Any:
        raise NotImplementedError


class Mpubsub(System):
    """This project, or mpubsub 0.0.1 (the same API for what is measured here)."""

    def __init__(self, workdir: str, legacy: bool) -> None:
        super().__init__(workdir)
        self.address = os.path.join(workdir, "broker.sock")
        self.legacy = legacy

    def broker_main(self) -> None:
        from mpubsub.broker import Broker  # noqa: PLC0415  (whichever mpubsub is installed)

        Broker(self.address, AUTHKEY).start()

    def client(self) -> Any:
        from mpubsub.net import PubSub  # noqa: PLC0415

        pubsub = PubSub(self.address, AUTHKEY)
        for _ in range(500):
            try:
                pubsub.connect()
                break
            except OSError:
                time.sleep(0.01)
        return MpubsubClient(pubsub, self.legacy)


class MpubsubClient:
    def __init__(self, pubsub: Any, legacy: bool) -> None:
        self.pubsub = pubsub
        self.legacy = legacy

    def subscribe(self, topic: str, callback: Callable[..., None]) -> None:
        self.pubsub.add_subscriber(topic, callback)
        if not self.legacy:
            self.pubsub.flush()

    def publish(self, topic: str, **message: Any) -> None:
        self.pubsub.publish(topic, **message)

    def poll(self, timeout: float) -> None:
        self.pubsub.poll(timeout)

    def close(self) -> None:
        self.pubsub.disconnect()


class Zmq(System):
    """A pyzmq XSUB/XPUB proxy on ipc:// sockets; messages pickled like mpubsub's."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.front = f"ipc://{workdir}/xsub"
        self.back = f"ipc://{workdir}/xpub"

    def broker_main(self) -> None:
        import zmq  # noqa: PLC0415

        context = zmq.Context()
        xsub, xpub = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
        for sock in (xsub, xpub):  # queue without limit, as the others do: drop nothing
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        xsub.bind(self.front)
        xpub.bind(self.back)
        zmq.proxy(xsub, xpub)

    def client(self) -> Any:
        import zmq  # noqa: PLC0415

        return ZmqClient(zmq, self.front, self.back)


class ZmqClient:
    def __init__(self, zmq: Any, front: str, back: str) -> None:
        self.zmq = zmq
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.connect(front)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(back)
        self.callbacks: Dict[bytes, Callable[..., None]] = {}

    def subscribe(self, topic: str, callback: Callable[..., None]) -> None:
        self.callbacks[topic.encode()] = callback
        self.sub.setsockopt(self.zmq.SUBSCRIBE, topic.encode())

    def publish(self, topic: str, **message: Any) -> None:
        self.pub.send_multipart([topic.encode(), pickle.dumps(message, protocol=5)])

    def poll(self, timeout: float) -> None:
        if not self.sub.poll(int(timeout * 1000)):
            return
        while True:
            try:
                topic, payload = self.sub.recv_multipart(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            self.callbacks[topic]((topic.decode(),), **pickle.loads(payload))

    def close(self) -> None:
        self.context.destroy(linger=0)


def make_system(name: str, workdir: str) -> System:
    if name == "zmq":
        return Zmq(workdir)
    return Mpubsub(workdir, legacy=name == "v001")


# --- scenarios --------------------------------------------------------------------


def subscriber_main(system: System, count: int, ready: Any, results: Any) -> None:
    client = system.client()
    seen = [0, 0.0]

    def on_data(topic: Tuple[str, ...], seq: int, data: bytes) -> None:
        if seq < 0:  # warm-up
            ready.set()
            return
        seen[0] += 1
        seen[1] = time.monotonic()

    client.subscribe("bench", on_data)
    deadline = time.monotonic() + 120
    while seen[0] < count and time.monotonic() < deadline:
        client.poll(0.05)
    results.put((seen[1], seen[0]))
    client.close()


def throughput(system: System, subscribers: int, count: int, size: int) -> Dict[str, Any]:
    results = CTX.Queue()
    readies = [CTX.Event() for _ in range(subscribers)]
    procs = [
        CTX.Process(target=subscriber_main, args=(system, count, ready, results))
        for ready in readies
    ]
    for proc in procs:
        proc.start()
    client = system.client()
    data = b"x" * size
    deadline = time.monotonic() + 30
    while not all(r.is_set() for r in readies):  # until every subscriber is in place
        client.publish("bench", seq=-1, data=b"")
        client.poll(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not come up")
    started = time.monotonic()
    for seq in range(count):
        client.publish("bench", seq=seq, data=data)
    ends = [results.get(timeout=300) for _ in procs]
    elapsed = max(end for end, _ in ends) - started
    received = sum(n for _, n in ends)
    for proc in procs:
        proc.join(timeout=30)
    client.close()
    return {
        "deliveries_per_s": received / elapsed,
        "elapsed_s": elapsed,
        "lost": subscribers * count - received,
    }


def echo_main(system: System, ready: Any, stop: Any) -> None:
    client = system.client()

    def on_ping(topic: Tuple[str, ...], seq: int) -> None:
        client.publish("pong", seq=seq)

    client.subscribe("ping", on_ping)
    ready.set()
    while not stop.is_set():
        client.poll(0.05)
    client.close()


def rtt(system: System, count: int) -> Dict[str, Any]:
    ready, stop = CTX.Event(), CTX.Event()
    echo = CTX.Process(target=echo_main, args=(system, ready, stop))
    echo.start()
    ready.wait(30)
    client = system.client()
    got: List[int] = []

    def on_pong(topic: Tuple[str, ...], seq: int) -> None:
        got.append(seq)

    client.subscribe("pong", on_pong)  # held by weak reference: keep on_pong alive
    deadline = time.monotonic() + 30
    while not got:  # warm up until the echo answers
        client.publish("ping", seq=-1)
        client.poll(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("the echo did not answer")
    samples = []
    for seq in range(count):
        started = time.perf_counter()
        client.publish("ping", seq=seq)
        while got[-1] != seq:
            client.poll(1.0)
        samples.append(time.perf_counter() - started)
    stop.set()
    echo.join(timeout=30)
    client.close()
    samples.sort()
    return {
        "rtt_p50_us": statistics.median(samples) * 1e6,
        "rtt_p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["this", "v001", "zmq"], required=True)
    parser.add_argument("--scenario", choices=["throughput", "rtt"], required=True)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpubsub-bench-") as workdir:
        system = make_system(args.system, workdir)
        broker = CTX.Process(target=system.broker_main, daemon=True)
        broker.start()
        try:
            if args.scenario == "throughput":
                result = throughput(system, args.subscribers, args.count, args.size)
            else:
                result = rtt(system, args.count)
        finally:
            broker.terminate()
            broker.join(timeout=10)
            if broker.is_alive():
                broker.kill()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
