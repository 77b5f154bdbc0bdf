"""Publishers and subscribers in separate processes, through one broker.

Each publisher sends numbered messages; each subscriber checks that it got
every message of every publisher once and in order, then reports. Run it
with ``python examples/demo.py [--publishers N] [--subscribers N] [--messages N]``;
it exits 0 when every subscriber saw everything.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import sys
import time
from typing import Any, Dict, List, Set, Tuple

from mpubsub import Broker, NetPubSub


def run_broker(address: Any, authkey: bytes) -> None:
    Broker(address, authkey).start()


def subscriber(address: Any, authkey: bytes, publishers: int, ready: Any, results: Any) -> None:
    expected: Dict[str, int] = {}
    errors: List[str] = []
    finished: Set[str] = set()

    def on_data(topic: Tuple[str, ...], publisher: str, seq: int) -> None:
        if seq != expected.get(publisher, 0):
            errors.append(f"{publisher}: got #{seq}, expected #{expected.get(publisher, 0)}")
        expected[publisher] = seq + 1

    def on_done(topic: Tuple[str, ...], publisher: str, count: int) -> None:
        if expected.get(publisher, 0) != count:
            errors.append(f"{publisher}: {expected.get(publisher, 0)} of {count} messages")
        finished.add(publisher)

    with NetPubSub(address, authkey) as pubsub:
        pubsub.add_subscriber(("demo", "data"), on_data)
        pubsub.add_subscriber(("demo", "done"), on_done)
        if not pubsub.flush():
            errors.append("the broker went away before it had the subscriptions")
        ready.release()
        deadline = time.monotonic() + 60
        while len(finished) < publishers and time.monotonic() < deadline:
            pubsub.poll(0.1)
    if len(finished) < publishers:
        errors.append(f"only {len(finished)} of {publishers} publishers finished in time")
    results.put((mp.current_process().name, sum(expected.values()), errors))


def publisher(address: Any, authkey: bytes, messages: int) -> None:
    name = mp.current_process().name
    with NetPubSub(address, authkey) as pubsub:
        for seq in range(messages):
            pubsub.publish(("demo", "data"), publisher=name, seq=seq)
        pubsub.publish(("demo", "done"), publisher=name, count=messages)
        pubsub.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()

    authkey = secrets.token_bytes(32)
    address = ("127.0.0.1", 0)
    probe = Broker(address, authkey)  # learn a free port, then hand it to the child
    address = probe.address
    probe.stop()
    probe.start()
    broker = mp.Process(target=run_broker, args=(address, authkey), name="broker")
    broker.start()
    try:
        _wait_connectable(address, authkey)
        results: Any = mp.Queue()
        ready = mp.Semaphore(0)
        subs = [
            mp.Process(
                target=subscriber,
                args=(address, authkey, args.publishers, ready, results),
                name=f"subscriber-{i}",
            )
            for i in range(args.subscribers)
        ]
        for process in subs:
            process.start()
        for _ in subs:
            if not ready.acquire(timeout=30):
                print("a subscriber did not start in 30 s", file=sys.stderr)
                for process in subs:
                    process.terminate()
                return 1
        pubs = [
            mp.Process(
                target=publisher, args=(address, authkey, args.messages), name=f"publisher-{i}"
            )
            for i in range(args.publishers)
        ]
        started = time.monotonic()
        for process in pubs:
            process.start()
        reports = [results.get(timeout=90) for _ in subs]
        elapsed = time.monotonic() - started
        for process in pubs + subs:
            process.join(timeout=30)
    finally:
        broker.terminate()
        broker.join(timeout=10)

    ok = True
    total = args.publishers * args.messages
    for name, received, errors in sorted(reports):
        status = "ok" if not errors and received == total else "FAILED"
        ok &= status == "ok"
        print(f"{name}: {received} of {total} messages, in order: {status}")
        for error in errors[:5]:
            print(f"  {error}")
    print(
        f"{args.publishers} publishers x {args.messages} messages to {args.subscribers} "
        f"subscribers in {elapsed:.2f} s: {'all delivered' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def _wait_connectable(address: Any, authkey: bytes) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with NetPubSub(address, authkey):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
