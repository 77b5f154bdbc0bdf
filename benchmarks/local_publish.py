"""Time one in-process publish, for one system, in whichever interpreter runs this.

``run.py`` runs it in this project's virtualenv (``--system this``) and in
the peers' (``v001``: mpubsub 0.0.1, same import name; ``blinker``;
``pypubsub``), so the same code measures every system: nanoseconds per
publish to S subscribers of a topic D levels deep, plus a plain function
call as the floor. Prints one JSON object: {"S/D": ns, ..., "call": ns}.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from typing import Any, Callable, Dict, List, Tuple

SCENARIOS = [(1, 1), (1, 2), (1, 3), (10, 1), (10, 3)]  # (subscribers, topic depth)


def make_subscribers(count: int) -> List[Callable[..., None]]:
    """Distinct functions with the spec's subscriber shape (topic, message)."""
    subscribers = []
    for _ in range(count):

        def subscriber(topic: Any = None, message: Any = None) -> None:
            pass

        subscribers.append(subscriber)
    return subscribers


def mpubsub_publisher(subscribers: List[Callable[..., None]], depth: int) -> Callable[[], None]:
    import mpubsub  # noqa: PLC0415  (whichever mpubsub this interpreter has)

    pubsub = mpubsub.PubSub()
    topic = tuple(f"level{i}" for i in range(depth))
    for subscriber in subscribers:
        pubsub.add_subscriber(topic, subscriber)
    return lambda: pubsub.publish(topic, message=1)


def blinker_publisher(subscribers: List[Callable[..., None]], depth: int) -> Callable[[], None]:
    import blinker  # noqa: PLC0415

    signal = blinker.Signal()  # blinker has no topic hierarchy: one signal per topic
    for subscriber in subscribers:
        signal.connect(subscriber)
    return lambda: signal.send(None, message=1)


def pypubsub_publisher(subscribers: List[Callable[..., None]], depth: int) -> Callable[[], None]:
    from pubsub import pub  # noqa: PLC0415

    topic = ".".join(f"level{i}" for i in range(depth))
    for subscriber in subscribers:

        def listener(message: Any, subscriber: Callable[..., None] = subscriber) -> None:
            subscriber(None, message)

        subscriber.listener = listener  # type: ignore[attr-defined]  # keep it alive (weak refs)
        pub.subscribe(listener, topic)
    return lambda: pub.sendMessage(topic, message=1)


PUBLISHERS = {
    "this": mpubsub_publisher,
    "v001": mpubsub_publisher,
    "blinker": blinker_publisher,
    "pypubsub": pypubsub_publisher,
}


def ns_per_call(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e9


def measure(system: str, number: int, repeat: int) -> Dict[str, float]:
    results: Dict[str, float] = {}
    keep: List[Tuple[Any, ...]] = []
    for subscribers, depth in SCENARIOS:
        functions = make_subscribers(subscribers)
        keep.append(tuple(functions))
        publish = PUBLISHERS[system](functions, depth)
        results[f"{subscribers}/{depth}"] = ns_per_call(publish, number, repeat)
    floor = make_subscribers(1)[0]
    results["call"] = ns_per_call(lambda: floor(("level0",), message=1), number, repeat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=sorted(PUBLISHERS), default="this")
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    json.dump(measure(args.system, args.number, args.repeat), sys.stdout)


if __name__ == "__main__":
    main()
