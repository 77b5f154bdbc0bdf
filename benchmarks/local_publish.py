"""Time one ``publish`` of whichever ``mpubsub`` this interpreter imports.

Run by ``run.py`` in this project's virtualenv and in the baseline's, so the
same code measures both. Prints one JSON object: nanoseconds per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from typing import Any, Callable, Dict, Tuple


def subscriber(topic: Tuple[str, ...], message: Any) -> None:
    """The spec's subscriber shape: the topic and one keyword."""


def ns_per_call(call: Callable[[], None], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e9


def measure(number: int, repeat: int) -> Dict[str, Any]:
    import mpubsub  # noqa: PLC0415  (whichever mpubsub this interpreter has)

    pubsub = mpubsub.PubSub()
    topic = ("foo", "bar")
    pubsub.add_subscriber(topic, subscriber)
    return {
        "version": getattr(mpubsub, "__version__", "?"),
        "publish_ns": ns_per_call(lambda: pubsub.publish(topic, message=1), number, repeat),
        "call_ns": ns_per_call(lambda: subscriber(topic, message=1), number, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    json.dump(measure(args.number, args.repeat), sys.stdout)


if __name__ == "__main__":
    main()
