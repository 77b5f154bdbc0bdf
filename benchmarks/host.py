"""On one host: the brokers a sysadmin would run instead, each with its usual client.

The same scenarios and message as ``remote.py`` (topic ``bench``, the dict
``seq=..., data=b"x" * size``; ``ping``/``pong`` with ``seq=...`` for the
round trip), one system a run:

- ``aio``: this project's broker (``remote.Mpubsub``) and its asyncio client,
  ``mpubsub.aio``: plain-function subscribers, ``publish`` not awaited (it
  buffers), one ``await flush()`` at the end. ``aio-uvloop``: the same on uvloop.
- ``nats``: a private nats-server, nats-py: ``await nc.publish`` in a loop,
  then ``await nc.flush()``.
- ``mqtt``: a private mosquitto, paho-mqtt at QoS 0, each client on a
  manual loop in its own thread (``loop()``, as ``loop_forever`` would; a
  publish is written at once, the socket waited on when it is full), through
  ``remote.py``'s own synchronous scenarios.
- ``dbus``: a private dbus-daemon, dbus-fast: each topic a signal member, each
  subscription a match rule, ``bus.send`` not awaited; a ``Peer.Ping`` to the
  daemon is the flush.

mpubsub serialises the dict itself; nats-py, paho-mqtt and dbus-fast carry
bytes, so there the application pickles it (protocol 5, as ``remote.py``'s
pyzmq and Redis adapters do). Every broker listens on a free loopback port
or a Unix socket in a temporary folder and is stopped at the end, whatever
happens; subscribers are separate processes (fork), and a throughput run
publishes probes until every subscriber has one before the clock starts.
The MQTT and D-Bus clients run in the peers' virtualenv, the others in this
project's. A system whose broker binary is missing prints ``{}``.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Dict, List, Optional, Set, Tuple, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -I: find remote.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # and the tests' servers

import remote

from tests.processes import NATS_SERVER, NatsServer, free_port, stop_process, wait_until

MOSQUITTO = "/usr/sbin/mosquitto"
DBUS_DAEMON = "/usr/bin/dbus-daemon"
T = TypeVar("T")
# What a callback may return: a publish still to be awaited (nats-py's is a coroutine).
Pending = Optional[Awaitable[Any]]


def start_broker(workdir: str, *argv: str) -> subprocess.Popen[bytes]:
    """A broker's process, what it says in broker.log of the work folder."""
    with open(os.path.join(workdir, "broker.log"), "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


# --- asyncio clients: the same verbs for every system -------------------------------
#
# subscribe(topic, callback): callback(topic, **message) for each message, in place
#   at the broker when it returns; what the callback returns, if not None, is awaited.
# publish(topic, **message): sends; what it returns, if not None, is awaited.
# flush(): returns when the broker has everything published before.
# close().


class AsyncSystem(remote.System):
    """A broker, and asyncio clients of it: run() runs a coroutine in an event loop."""

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(main)

    async def aclient(self) -> Any:
        raise NotImplementedError


class Aio(remote.Mpubsub, AsyncSystem):
    """This project's broker and its asyncio client."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir, legacy=False)

    async def aclient(self) -> Any:
        import mpubsub.aio  # noqa: PLC0415

        for _ in range(500):  # until the broker listens
            pubsub = mpubsub.aio.NetPubSub(self.address, remote.AUTHKEY)
            try:
                await pubsub.connect()
                return AioClient(pubsub)
            except OSError:
                await asyncio.sleep(0.01)
        raise RuntimeError("the broker did not come up")


class AioUvloop(Aio):
    def run(self, main: Coroutine[Any, Any, T]) -> T:
        import uvloop  # noqa: PLC0415

        return uvloop.run(main)


class AioClient:
    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub
        self.publish = pubsub.publish  # the client's own: nothing between
        self.callbacks: List[Callable[..., Any]] = []

    async def subscribe(self, topic: str, callback: Callable[..., Any]) -> None:
        self.callbacks.append(callback)  # whether the client holds it weakly or not
        self.pubsub.add_subscriber(topic, callback)
        await self.pubsub.flush()

    async def flush(self) -> None:
        await self.pubsub.flush()

    async def close(self) -> None:
        await self.pubsub.disconnect()


class Nats(AsyncSystem):
    """A private nats-server on a free loopback port; nats-py clients."""

    def start(self) -> None:
        self.server = NatsServer(Path(self.workdir), "nats").start()

    def stop(self) -> None:
        self.server.stop()

    async def aclient(self) -> Any:
        import nats  # noqa: PLC0415

        return NatsClient(await nats.connect(self.server.url))


class NatsClient:
    def __init__(self, nc: Any) -> None:
        self.nc = nc

    async def subscribe(self, topic: str, callback: Callable[..., Pending]) -> None:
        async def on_message(msg: Any) -> None:
            pending = callback(msg.subject, **pickle.loads(msg.data))
            if pending is not None:
                await pending

        await self.nc.subscribe(topic, cb=on_message)
        await self.nc.flush()

    def publish(self, topic: str, **message: Any) -> Pending:
        return self.nc.publish(topic, pickle.dumps(message, protocol=5))  # type: ignore[no-any-return]

    async def flush(self) -> None:
        await self.nc.flush()

    async def close(self) -> None:
        await self.nc.close()


DBUS = "org.freedesktop.DBus"
# dbus-fast's writer drops the connection when the socket is full (EAGAIN, as
# dbus-next's issue 153 says, still open): a publisher waits for the daemon
# every so many signals, fewer than fill a socket's buffer.
DBUS_WINDOW = 100
BENCH_PATH, BENCH_INTERFACE = "/org/mpubsub/Bench", "org.mpubsub.Bench"
DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class Dbus(AsyncSystem):
    """A private dbus-daemon on a Unix socket; dbus-fast clients, topics as signals."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.path = os.path.join(workdir, "bus.sock")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        config = Path(self.workdir) / "bus.conf"
        config.write_text(DBUS_CONFIG.format(path=self.path))
        self.proc = start_broker(
            self.workdir, DBUS_DAEMON, "--nofork", "--nopidfile", f"--config-file={config}"
        )
        wait_until(lambda: os.path.exists(self.path), 10, "dbus-daemon")

    def stop(self) -> None:
        stop_process(self.proc)

    async def aclient(self) -> Any:
        from dbus_fast.aio import MessageBus  # noqa: PLC0415

        return DbusClient(await MessageBus(bus_address=f"unix:path={self.path}").connect())


class DbusClient:
    def __init__(self, bus: Any) -> None:
        from dbus_fast import Message  # noqa: PLC0415

        self.bus = bus
        self.message = Message
        self.sent = 0
        self.tasks: Set[asyncio.Future[Any]] = set()

    async def subscribe(self, topic: str, callback: Callable[..., Any]) -> None:
        def on_message(msg: Any) -> None:
            if msg.member == topic and msg.interface == BENCH_INTERFACE:
                pending = callback(topic, **pickle.loads(msg.body[0]))
                if pending is not None:  # a handler is a plain function: a task awaits it
                    self.tasks.add(task := asyncio.ensure_future(pending))
                    task.add_done_callback(self.tasks.discard)

        self.bus.add_message_handler(on_message)
        rule = f"type='signal',interface='{BENCH_INTERFACE}',member='{topic}'"
        await self._call(DBUS, "AddMatch", "s", [rule])

    def publish(self, topic: str, **message: Any) -> Pending:
        payload = pickle.dumps(message, protocol=5)
        self.bus.send(self.message.new_signal(BENCH_PATH, BENCH_INTERFACE, topic, "ay", [payload]))
        self.sent += 1
        return self.flush() if self.sent % DBUS_WINDOW == 0 else None

    async def flush(self) -> None:
        await self._call(f"{DBUS}.Peer", "Ping")  # the daemon answers in order

    async def _call(self, interface: str, member: str, signature: str = "", body: Any = ()) -> None:
        await self.bus.call(
            self.message(
                destination=DBUS,
                path="/org/freedesktop/DBus",
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )

    async def close(self) -> None:
        self.bus.disconnect()
        await self.bus.wait_for_disconnect()


# --- MQTT: paho-mqtt is synchronous, so remote.py's scenarios drive it ---------------

MOSQUITTO_CONFIG = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
# Queue without limit, as the others do: drop nothing (QoS 0 stops at 1,000 by default).
max_queued_messages 0
log_dest none
"""


class Mosquitto(remote.System):
    """A private mosquitto on a free loopback port; paho-mqtt clients at QoS 0."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        config = Path(self.workdir) / "mosquitto.conf"
        config.write_text(MOSQUITTO_CONFIG.format(port=self.port))
        self.proc = start_broker(self.workdir, MOSQUITTO, "-c", str(config))
        wait_until(self._listening, 10, "mosquitto")

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def broker_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self) -> Any:
        return PahoClient(self.port)


class PahoClient:
    def __init__(self, port: int) -> None:
        from paho.mqtt import client as mqtt  # noqa: PLC0415

        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.mqtt.on_message = self._on_message
        self.callbacks: Dict[str, Callable[..., None]] = {}
        self.mqtt.connect("127.0.0.1", port)
        wait_until(self._connected, 10, "the CONNACK")

    def _connected(self) -> bool:
        self.mqtt.loop(0.01)
        return bool(self.mqtt.is_connected())

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.callbacks[msg.topic]((msg.topic,), **pickle.loads(msg.payload))

    def subscribe(self, topic: str, callback: Callable[..., None]) -> None:
        self.callbacks[topic] = callback
        self.mqtt.subscribe(topic, qos=0)

    def publish(self, topic: str, **message: Any) -> None:
        self.mqtt.publish(topic, pickle.dumps(message, protocol=5), qos=0)
        while self.mqtt.want_write():  # the socket was full (or in a callback): write the rest
            select.select([], [self.mqtt.socket()], [], 1.0)
            self.mqtt.loop_write()

    def poll(self, timeout: float) -> None:
        self.mqtt.loop(timeout)

    def close(self) -> None:
        self.mqtt.disconnect()


# --- the scenarios, for asyncio clients -------------------------------------------


async def subscriber(
    system: AsyncSystem, count: int, stall: float, ready: Any
) -> Tuple[float, int]:
    client = await system.aclient()
    seen = [0, 0.0]
    warm, done = asyncio.Event(), asyncio.Event()

    def on_data(topic: Any, seq: int, data: bytes) -> None:
        if seq < 0:  # warm-up
            ready.set()
            warm.set()
            return
        seen[0] += 1
        seen[1] = time.monotonic()
        if seen[0] >= count:
            done.set()

    await client.subscribe("bench", on_data)
    await asyncio.wait_for(warm.wait(), 60)
    with contextlib.suppress(asyncio.TimeoutError):  # what has not come by then is lost
        await asyncio.wait_for(done.wait(), stall + 5)
    await client.close()
    return seen[1], int(seen[0])


def subscriber_main(
    system: AsyncSystem, count: int, stall: float, ready: Any, results: Any
) -> None:
    results.put(system.run(subscriber(system, count, stall, ready)))


async def publish_burst(system: AsyncSystem, readies: List[Any], count: int, size: int) -> float:
    """Probes until every subscriber has one, then *count* messages; when they started."""
    client = await system.aclient()
    deadline = time.monotonic() + 30
    while not all(r.is_set() for r in readies):
        pending = client.publish("bench", seq=-1, data=b"")
        if pending is not None:
            await pending
        await asyncio.sleep(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not come up")
    data = b"x" * size
    publish = client.publish
    started = time.monotonic()
    for seq in range(count):
        pending = publish("bench", seq=seq, data=data)
        if pending is not None:
            await pending
    await client.flush()
    await client.close()
    return started


def throughput(
    system: AsyncSystem, subscribers: int, count: int, size: int, stall: float
) -> Dict[str, Any]:
    results = remote.CTX.Queue()
    readies = [remote.CTX.Event() for _ in range(subscribers)]
    procs = [
        remote.CTX.Process(target=subscriber_main, args=(system, count, stall, ready, results))
        for ready in readies
    ]
    for proc in procs:
        proc.start()
    try:
        started = system.run(asyncio.wait_for(publish_burst(system, readies, count, size), stall))
    except asyncio.TimeoutError:
        for proc in procs:
            proc.kill()
        return {"deliveries_per_s": 0.0, "stalled": 1, "lost": subscribers * count}
    ends = [results.get(timeout=stall + 60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return remote.delivery_figures(started, ends, subscribers * count)


async def echo(system: AsyncSystem, ready: Any, stop: Any) -> None:
    client = await system.aclient()

    def on_ping(topic: Any, seq: int) -> Pending:
        return client.publish("pong", seq=seq)  # type: ignore[no-any-return]

    await client.subscribe("ping", on_ping)
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await client.close()


def echo_main(system: AsyncSystem, ready: Any, stop: Any) -> None:
    system.run(echo(system, ready, stop))


async def ping(system: AsyncSystem, count: int) -> List[float]:
    client = await system.aclient()
    got: List[int] = []
    arrived = asyncio.Event()

    def on_pong(topic: Any, seq: int) -> None:
        got.append(seq)
        arrived.set()

    async def send(seq: int) -> None:
        pending = client.publish("ping", seq=seq)
        if pending is not None:
            await pending

    await client.subscribe("pong", on_pong)
    deadline = time.monotonic() + 30
    while not got:  # warm up until the echo answers
        await send(-1)
        await asyncio.sleep(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError("the echo did not answer")
    samples = []
    for seq in range(count):
        started = time.perf_counter()
        arrived.clear()
        await send(seq)
        while got[-1] != seq:
            await arrived.wait()
            arrived.clear()
        samples.append(time.perf_counter() - started)
    await client.close()
    return samples


def rtt(system: AsyncSystem, count: int) -> Dict[str, Any]:
    ready, stop = remote.CTX.Event(), remote.CTX.Event()
    proc = remote.CTX.Process(target=echo_main, args=(system, ready, stop))
    proc.start()
    try:
        ready.wait(30)
        samples = system.run(asyncio.wait_for(ping(system, count), 60 + count * 0.01))
    finally:
        stop.set()
        proc.join(timeout=30)
    return remote.rtt_figures(samples)


SYSTEMS: Dict[str, Tuple[str, Callable[[str], remote.System]]] = {
    "aio": ("", Aio),
    "aio-uvloop": ("", AioUvloop),
    "nats": (NATS_SERVER, Nats),
    "mqtt": (MOSQUITTO, Mosquitto),
    "dbus": (DBUS_DAEMON, Dbus),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=list(SYSTEMS), required=True)
    parser.add_argument("--scenario", choices=["throughput", "rtt"], required=True)
    parser.add_argument("--stall", type=float, default=30, help="seconds before giving up")
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    binary, make = SYSTEMS[args.system]
    if binary and not os.path.exists(binary):
        json.dump({}, sys.stdout)  # no such broker here: nothing to measure
        return
    with tempfile.TemporaryDirectory(prefix="mpubsub-bench-host-") as workdir:
        json.dump(run_scenario(make(workdir), args), sys.stdout)


def run_scenario(system: remote.System, args: argparse.Namespace) -> Dict[str, Any]:
    """Start *system*, measure the scenario *args* name, stop it."""
    if not isinstance(system, AsyncSystem):
        args.idle = 0
        return remote.run_scenario(system, args)
    system.start()
    try:
        if args.scenario == "throughput":
            return throughput(system, args.subscribers, args.count, args.size, args.stall)
        return rtt(system, args.count)
    finally:
        system.stop()


if __name__ == "__main__":
    main()
