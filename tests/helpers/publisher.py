"""A publisher process for tests: numbered messages, as fast as it can or paced.

    python publisher.py CREDENTIALS TOPIC COUNT NAME [--size BYTES] [--pause SECONDS]

Publishes COUNT messages ``pub=NAME, seq=0..COUNT-1, blob=b'x' * BYTES`` on
TOPIC (pausing SECONDS between them); with COUNT 0, publishes until SIGTERM.
Then it waits until the broker has them all and prints "sent N" (N: how
many it published). Reconnects by itself if the broker restarts.
"""

from __future__ import annotations

import argparse
import signal
import time

from mpubsub import NetPubSub


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("credentials")
    parser.add_argument("topic")
    parser.add_argument("count", type=int)
    parser.add_argument("name")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    blob = b"x" * args.size
    stopped = [False]
    if not args.count:
        signal.signal(signal.SIGTERM, lambda signum, frame: stopped.__setitem__(0, True))
    seq = 0
    with NetPubSub.from_file(args.credentials) as pubsub:
        print("ready", flush=True)
        while (seq < args.count) if args.count else not stopped[0]:
            pubsub.publish(args.topic, pub=args.name, seq=seq, blob=blob)
            seq += 1
            if args.pause:
                time.sleep(args.pause)
        while not pubsub.flush():
            pubsub.poll(0.1)  # reconnecting: what is queued goes once it is back
    print(f"sent {seq}", flush=True)


if __name__ == "__main__":
    main()
