"""Remote pub-sub figures for one system, in whichever interpreter runs this.

``run.py`` runs it in this project's virtualenv (``--system this``) and in
the baseline's (``--system v001`` for mpubsub 0.0.1, ``--system zmq`` for a
pyzmq XSUB/XPUB proxy), so the same scenarios measure every system:

- ``throughput``: one publisher sends N small messages to S subscriber
  processes through a broker process; the figure is deliveries per second,
  from the first publish until every subscriber has the last message.
- ``rtt``: a client publishes a ping, an echo process answers with a pong,
  the client waits for it; the figures are the median and p99 round trip.

``--as-nobody`` runs the clients as user nobody (when started as root: uid
0 may do everything, whatever the policy), and ``--policy`` gives this
project's broker a policy of 20 rules, several of them the clients', so
that every publish and every route passes through it: the cost of a policy.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

AUTHKEY = b"benchmark key"
CTX = mp.get_context("fork")


# --- adapters: the same four verbs for every system ------------------------------


class System:
    """start() runs broker_main() in a child; client() returns an object with the verbs below."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.broker: Any = None

    def start(self) -> None:
        self.broker = CTX.Process(target=self.broker_main, daemon=True)
        self.broker.start()

    def stop(self) -> None:
        self.broker.terminate()
        self.broker.join(timeout=10)
        if self.broker.is_alive():
            self.broker.kill()

    @property
    def broker_pid(self) -> int:
        return int(self.broker.pid)

    def broker_main(self) -> None:
        raise NotImplementedError

    def client(self) -> Any:
        raise NotImplementedError

    def publisher(self) -> Any:
        """The client that publishes (or pings): elsewhere than the others, across hosts."""
        return self.client()


# Twenty rules, a few of which are the benchmark's clients' (nobody, in nogroup):
# default deny, so each publish is checked, and a denied subtopic under the
# subscribed one, so each route is filtered.
POLICY = [
    ("default", "deny"),
    ("uid:65534 publish", "bench, ping, pong, !bench/secret"),
    ("uid:65534 subscribe", "bench, ping, pong, !bench/secret"),
    ("group:nogroup publish", "!admin"),
    ("* subscribe", "!secret, !admin/keys"),
    ("tcp publish", "!/"),
    ("tcp subscribe", "!/"),
    ("federation publish", "!admin, !bench/secret"),
    ("federation subscribe", "!secret"),
    ("user:root admin", "/"),
    ("uid:1000 publish", "home, sensor"),
    ("uid:1000 subscribe", "home, sensor, alarm"),
    ("uid:1001 publish", "sensor/temperature"),
    ("uid:1001 subscribe", "alarm"),
    ("uid:1002 publish", "logs"),
    ("uid:1002 subscribe", "logs, !logs/auth"),
    ("group:root publish", "/"),
    ("group:root subscribe", "/"),
    ("uid:1003 admin", "/"),
    ("uid:1004 publish", "metrics, !metrics/private"),
]


class Mpubsub(System):
    """This project, or mpubsub 0.0.1 (the same API for what is measured here)."""

    def __init__(self, workdir: str, legacy: bool, policy: bool = False) -> None:
        super().__init__(workdir)
        self.address = os.path.join(workdir, "broker.sock")
        self.legacy = legacy
        self.policy = policy

    def broker_main(self) -> None:
        from mpubsub.broker import Broker  # noqa: PLC0415  (whichever mpubsub is installed)

        if not self.policy:
            Broker(self.address, AUTHKEY).start()
            return
        from mpubsub.broker import Policy  # noqa: PLC0415  (this project only)

        Broker(self.address, AUTHKEY, policy=Policy.parse(POLICY)).start()

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


class Redis(System):
    """A private redis-server on a Unix socket, through redis-py; messages pickled."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.path = os.path.join(workdir, "redis.sock")

    def broker_main(self) -> None:
        server = shutil.which("redis-server") or "redis-server"
        os.execv(
            server,
            [
                server,
                "--port",
                "0",
                "--unixsocket",
                self.path,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--logfile",
                os.path.join(self.workdir, "redis.log"),
            ],
        )

    def client(self) -> Any:
        import redis  # noqa: PLC0415

        for _ in range(500):
            if os.path.exists(self.path):
                break
            time.sleep(0.01)
        return RedisClient(redis.Redis(unix_socket_path=self.path))


class RedisClient:
    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pubsub = connection.pubsub(ignore_subscribe_messages=True)
        self.callbacks: Dict[bytes, Callable[..., None]] = {}

    def subscribe(self, topic: str, callback: Callable[..., None]) -> None:
        self.callbacks[topic.encode()] = callback
        self.pubsub.subscribe(topic)

    def publish(self, topic: str, **message: Any) -> None:
        self.connection.publish(topic, pickle.dumps(message, protocol=5))

    def poll(self, timeout: float) -> None:
        item = self.pubsub.get_message(timeout=timeout)
        while item is not None:
            self.callbacks[item["channel"]](
                (item["channel"].decode(),), **pickle.loads(item["data"])
            )
            item = self.pubsub.get_message(timeout=0)

    def close(self) -> None:
        self.pubsub.close()
        self.connection.close()


def make_system(name: str, workdir: str, policy: bool = False) -> System:
    if name == "zmq":
        return Zmq(workdir)
    if name == "redis":
        return Redis(workdir)
    return Mpubsub(workdir, legacy=name == "v001", policy=policy)


def become_nobody(workdir: str) -> None:
    """From now on, this process (and the broker and clients it forks) runs as nobody."""
    # Imported while root may still read the files (/root may be closed to others).
    for module in (
        "mpubsub.broker",
        "mpubsub.net",
        "multiprocessing.popen_fork",
        "multiprocessing.queues",
        "multiprocessing.synchronize",
    ):
        importlib.import_module(module)

    os.chown(workdir, 65534, 65534)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


# --- scenarios --------------------------------------------------------------------


def subscriber_main(system: System, count: int, stall: float, ready: Any, results: Any) -> None:
    client = system.client()
    seen = [0, 0.0]

    def on_data(topic: Tuple[str, ...], seq: int, data: bytes) -> None:
        if seq < 0:  # warm-up
            ready.set()
            return
        seen[0] += 1
        seen[1] = time.monotonic()

    client.subscribe("bench", on_data)
    while not ready.is_set():
        client.poll(0.05)
    deadline = time.monotonic() + stall + 5  # what has not come by then is lost
    while seen[0] < count and time.monotonic() < deadline:
        client.poll(0.05)
    results.put((seen[1], seen[0]))
    client.close()


class Stalled(Exception):
    """The system stopped moving (mpubsub 0.0.1 stalls when a client does not read)."""


def _stalled(signum: int, frame: object) -> None:
    raise Stalled


def throughput(
    system: System, subscribers: int, count: int, size: int, stall: float
) -> Dict[str, Any]:
    results = CTX.Queue()
    readies = [CTX.Event() for _ in range(subscribers)]
    procs = [
        CTX.Process(target=subscriber_main, args=(system, count, stall, ready, results))
        for ready in readies
    ]
    for proc in procs:
        proc.start()
    client = system.publisher()
    data = b"x" * size
    deadline = time.monotonic() + 30
    while not all(r.is_set() for r in readies):  # until every subscriber is in place
        client.publish("bench", seq=-1, data=b"")
        client.poll(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not come up")
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _stalled)
    signal.setitimer(signal.ITIMER_REAL, stall)
    try:
        for seq in range(count):
            client.publish("bench", seq=seq, data=data)
    except Stalled:
        for proc in procs:
            proc.kill()
        return {"deliveries_per_s": 0.0, "stalled": 1, "lost": subscribers * count}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    ends = [results.get(timeout=stall + 60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    client.close()
    return delivery_figures(started, ends, subscribers * count)


def delivery_figures(started: float, ends: List[Tuple[float, int]], sent: int) -> Dict[str, Any]:
    """Throughput's figures: *ends* are each subscriber's (last arrival, messages received)."""
    elapsed = max(end for end, _ in ends) - started if any(n for _, n in ends) else 1.0
    received = sum(n for _, n in ends)
    return {"deliveries_per_s": received / elapsed, "elapsed_s": elapsed, "lost": sent - received}


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
    client = system.publisher()
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
    return rtt_figures(samples)


def rtt_figures(samples: List[float]) -> Dict[str, Any]:
    """The round trip's figures, from each round trip in seconds."""
    samples = sorted(samples)
    return {
        "rtt_p50_us": statistics.median(samples) * 1e6,
        "rtt_p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def scale_main(system: System, clients: int, count: int, ready: Any, results: Any) -> None:
    """Hold *clients* subscribers in this process; report each delivery's latency."""
    import selectors  # noqa: PLC0415

    latencies: List[float] = []
    subscribers = [system.client() for _ in range(clients)]
    seen = [0]

    def on_data(topic: Tuple[str, ...], seq: int, sent: float) -> None:
        if seq < 0:
            ready.set()
            return
        latencies.append(time.monotonic() - sent)
        seen[0] += 1

    with selectors.DefaultSelector() as selector:
        for subscriber in subscribers:
            subscriber.subscribe("bench", on_data)
            selector.register(subscriber.pubsub.fileno(), selectors.EVENT_READ, subscriber)
        deadline = time.monotonic() + 120
        while seen[0] < clients * count and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                key.data.poll(0)
    results.put(latencies)
    for subscriber in subscribers:
        subscriber.close()


def broker_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale(system: System, broker_pid: int, subscribers: int, count: int) -> Dict[str, Any]:
    """Paced messages to many subscribers: broker CPU per message, and latency."""
    processes = min(subscribers, 4)
    shares = [subscribers // processes + (i < subscribers % processes) for i in range(processes)]
    results = CTX.Queue()
    readies = [CTX.Event() for _ in shares]
    procs = [
        CTX.Process(target=scale_main, args=(system, share, count, ready, results))
        for share, ready in zip(shares, readies)
    ]
    for proc in procs:
        proc.start()
    client = system.client()
    deadline = time.monotonic() + 60
    while not all(r.is_set() for r in readies):
        client.publish("bench", seq=-1, sent=0.0)
        client.poll(0.02)
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not come up")
    time.sleep(0.5)  # let the warm-up messages drain
    cpu = broker_cpu(broker_pid)
    for seq in range(count):
        client.publish("bench", seq=seq, sent=time.monotonic())
        time.sleep(0.005)
    latencies = sorted(x for _ in procs for x in results.get(timeout=300))
    cpu = broker_cpu(broker_pid) - cpu
    for proc in procs:
        proc.join(timeout=30)
    client.close()
    return {
        "broker_cpu_us_per_message": cpu / count * 1e6,
        "latency_p50_us": statistics.median(latencies) * 1e6,
        "latency_p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "lost": subscribers * count - len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["this", "v001", "zmq", "redis"], required=True)
    parser.add_argument("--scenario", choices=["throughput", "rtt", "scale"], required=True)
    parser.add_argument("--idle", type=int, default=0, help="idle clients connected meanwhile")
    parser.add_argument("--stall", type=float, default=30, help="seconds before giving up")
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--as-nobody", action="store_true", help="clients as user nobody")
    parser.add_argument("--policy", action="store_true", help="a broker with 20 rules")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpubsub-bench-") as workdir:
        system = make_system(args.system, workdir, args.policy)
        json.dump(run_scenario(system, args), sys.stdout)


def run_scenario(system: System, args: argparse.Namespace) -> Dict[str, Any]:
    """Start *system*, measure the scenario *args* name, stop it."""
    if getattr(args, "as_nobody", False) and os.geteuid() == 0:
        become_nobody(system.workdir)
    system.start()
    try:
        idle = [system.client() for _ in range(args.idle)]
        if args.scenario == "throughput":
            result = throughput(system, args.subscribers, args.count, args.size, args.stall)
        elif args.scenario == "scale":
            result = scale(system, system.broker_pid, args.subscribers, args.count)
        else:
            result = rtt(system, args.count)
        for client in idle:
            client.close()
    finally:
        system.stop()
    return result


if __name__ == "__main__":
    main()
