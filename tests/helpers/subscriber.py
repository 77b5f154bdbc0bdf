"""A subscriber process for tests: count messages, check their order, report.

    python subscriber.py CREDENTIALS TOPIC COUNT [--ack-every N] [--gaps] [--seconds S]

Subscribes to TOPIC and prints "ready" once the broker has the subscription.
Messages carry ``seq`` (and ``pub``, the publisher's name): for each
publisher, seq must be consecutive from 0 (with --gaps: only increasing, as
after a broker restart, when in-flight messages are lost). Every N messages
it publishes ('ack',) received=TOTAL. After COUNT messages it prints
"received N in order" (or OUT OF ORDER); after S seconds (default 60)
without getting there, or on SIGTERM, "timeout N ...".
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

    def on_message(topic: Tuple[str, ...], seq: int = -1, pub: str = "", **message: Any) -> None:
        previous = last.get(pub, -1)
        in_order[0] &= seq > previous if args.gaps else seq == previous + 1
        last[pub] = seq
        received[0] += 1
        if args.ack_every and received[0] % args.ack_every == 0:
            pubsub.publish("ack", received=received[0])

    with NetPubSub.from_file(args.credentials) as pubsub:
        pubsub.add_subscriber(args.topic, on_message)
        pubsub.flush()
        print("ready", flush=True)
        deadline = [time.monotonic() + args.seconds]
        signal.signal(signal.SIGTERM, lambda signum, frame: deadline.__setitem__(0, 0.0))
        while received[0] < args.count and time.monotonic() < deadline[0]:
            pubsub.poll(0.1)
        pubsub.flush()
    status = "in order" if in_order[0] else "OUT OF ORDER"
    word = "received" if received[0] >= args.count else "timeout"
    print(f"{word} {received[0]} {status}", flush=True)


if __name__ == "__main__":
    main()
