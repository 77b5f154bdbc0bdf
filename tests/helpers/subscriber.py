"""A subscriber process for tests: count messages, check their order, report.

    python subscriber.py CREDENTIALS TOPIC COUNT [--ack-every N] [--gaps] [--seconds S]

Subscribes to TOPIC and prints "ready" once the broker has the subscription.
Messages carry ``seq`` (and ``pub``, the publisher's name): for each
publisher, seq must be consecutive from 0 (with --gaps: only increasing, as
after a broker restart, when in-flight messages are lost). Every N messages
it publishes ('ack',) received=TOTAL. After COUNT messages (COUNT 0: never)
it prints "received N in order" (or OUT OF ORDER). On SIGTERM it takes what
the broker sent it until then and prints "stopped N ..."; after S seconds
(default 60) without either, "timeout N ...".
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any, Dict, Tuple

from mpubsub import NetPubSub


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("credentials")
    parser.add_argument("topic")
    parser.add_argument("count", type=int)
    parser.add_argument("--ack-every", type=int, default=0)
    parser.add_argument("--gaps", action="store_true")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    received = [0]
    in_order = [True]
    last: Dict[str, int] = {}
    stopped = [False]

    def on_message(topic: Tuple[str, ...], seq: int = -1, pub: str = "", **message: Any) -> None:
        previous = last.get(pub, -1)
        in_order[0] &= seq > previous if args.gaps else seq == previous + 1
        last[pub] = seq
        received[0] += 1
        if args.ack_every and received[0] % args.ack_every == 0:
            pubsub.publish("ack", received=received[0])

    def wanted() -> bool:
        return not args.count or received[0] < args.count

    with NetPubSub.from_file(args.credentials) as pubsub:
        pubsub.add_subscriber(args.topic, on_message)
        assert pubsub.flush(), "the broker went away before it had the subscription"
        signal.signal(signal.SIGTERM, lambda signum, frame: stopped.__setitem__(0, True))
        print("ready", flush=True)
        deadline = time.monotonic() + args.seconds
        while wanted() and not stopped[0] and time.monotonic() < deadline:
            pubsub.poll(0.1)
        if stopped[0] and pubsub.flush():
            pubsub.poll(0)  # everything the broker sent before the stop
    status = "in order" if in_order[0] else "OUT OF ORDER"
    word = "received" if not wanted() else "stopped" if stopped[0] else "timeout"
    print(f"{word} {received[0]} {status}", flush=True)


if __name__ == "__main__":
    main()
