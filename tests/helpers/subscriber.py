"""A subscriber process for tests: count messages, acknowledge progress, report.

Usage: python subscriber.py CREDENTIALS TOPIC COUNT [ACK_EVERY]

Subscribes to TOPIC, prints "ready" once the broker has the subscription,
publishes ('ack',) with received=N every ACK_EVERY messages, checks that
the ``seq`` fields arrive in order, and prints "received N in order" after
COUNT messages (or "timeout N" after 60 s without completing).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Tuple

from mpubsub import NetPubSub


def main() -> None:
    path, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ack_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    received = [0]
    in_order = [True]

    def on_message(topic: Tuple[str, ...], seq: int = -1, **message: Any) -> None:
        in_order[0] &= seq == received[0]
        received[0] += 1
        if ack_every and received[0] % ack_every == 0:
            pubsub.publish("ack", received=received[0])

    with NetPubSub.from_file(path) as pubsub:
        pubsub.add_subscriber(topic, on_message)
        pubsub.flush()
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while received[0] < count and time.monotonic() < deadline:
            pubsub.poll(0.1)
        pubsub.flush()
    status = "in order" if in_order[0] else "OUT OF ORDER"
    word = "received" if received[0] >= count else "timeout"
    print(f"{word} {received[0]} {status}", flush=True)


if __name__ == "__main__":
    main()
