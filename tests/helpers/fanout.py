"""A flood for tests: publishers bursting tiny messages to subscribers that drain them.

    python fanout.py CREDENTIALS SUBSCRIBERS PUBLISHERS SECONDS

Connects SUBSCRIBERS raw clients subscribed to ('x',) and PUBLISHERS raw
clients, prints "ready" once the subscriptions are in place, then for
SECONDS every publisher sends 64 KiB bursts of tiny PUB frames as fast as
the broker takes them while the subscribers read everything; then exits.
"""

from __future__ import annotations

import argparse
import selectors
import time

from mpubsub import _protocol as proto
from mpubsub._connect import connect_socket, handshake
from mpubsub._credentials import read_credentials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("credentials")
    parser.add_argument("subscribers", type=int)
    parser.add_argument("publishers", type=int)
    parser.add_argument("seconds", type=float)
    args = parser.parse_args()
    address, authkey = read_credentials(args.credentials)
    topic = proto.encode_topic(("x",))
    socks = []
    for _ in range(args.subscribers + args.publishers):  # one handshake at a time
        socks.append(connect_socket(address, 10))
        handshake(socks[-1], authkey)
    readers, writers = socks[: args.subscribers], socks[args.subscribers :]
    for sock in readers:
        sock.sendall(proto.frame(proto.SUB, topic) + proto.frame(proto.PING, b""))
        assert sock.recv(64) == proto.frame(proto.PONG, b""), "no PONG"  # subscribed
    frame = proto.pub_frame(topic, b"\x80\x05}\x94.")
    burst = frame * (64 * 1024 // len(frame))
    selector = selectors.DefaultSelector()
    pending = {}
    for sock in readers:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
    for sock in writers:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_WRITE, sock)
        pending[sock] = memoryview(burst)
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for key, events in selector.select(0.1):
            sock = key.data
            if events & selectors.EVENT_READ:
                sock.recv(1 << 16)
            else:
                view = pending[sock][sock.send(pending[sock]) :]
                pending[sock] = view if len(view) else memoryview(burst)


if __name__ == "__main__":
    main()
