"""A NATS tap for tests: record what is published on a subject, as anyone on NATS could.

    python nats_tap.py URL SUBJECT OUT

Subscribes to SUBJECT and prints "ready" once the server has the
subscription; on SIGTERM, writes the (subject, body) pairs it received
to OUT (a pickled list) and exits.
"""

from __future__ import annotations

import asyncio
import pickle
import signal
import sys
from typing import List, Tuple

import nats
from nats.aio.msg import Msg


async def tap(url: str, subject: str, out: str) -> None:
    received: List[Tuple[str, bytes]] = []
    done = asyncio.Event()

    async def record(msg: Msg) -> None:
        received.append((msg.subject, msg.data))

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    nc = await nats.connect(url)
    await nc.subscribe(subject, cb=record)
    await nc.flush()
    print("ready", flush=True)
    await done.wait()
    await nc.close()
    with open(out, "wb") as f:
        pickle.dump(received, f)


if __name__ == "__main__":
    asyncio.run(tap(*sys.argv[1:4]))
