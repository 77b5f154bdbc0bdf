"""What the broker does with its clients' frames, sockets aside: route, subscribe, answer.

The broker's loop reads whole frames and hands each client's here
(``handle``); what they make the broker send is queued on the sessions it
goes to (``Session.out``), which are marked ``dirty`` for the loop to
write. The hot path, a PUB frame, is one dict lookup (the router's cache
of routes) and a queue per subscriber.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import _protocol as proto
from ._routing import Router
from ._session import SEND_CHUNK, Session
from ._stats import BrokerStatistics, Counters, Throttle
from .errors import ProtocolError

logger = logging.getLogger("mpubsub.broker")

_PONG = proto.frame(proto.PONG, b"")


class Exchange:
    """Routing, subscriptions, requests and the federation bridge's feed, for all clients.

    *statistics* gives the broker's figures for a STATS request;
    *throttles* rate-limit its log lines, by subject.
    """

    def __init__(
        self,
        limits: proto.Limits,
        *,
        route_cache_bytes: int,
        bridge_key: Optional[bytes],
        stats: Counters,
        throttles: Dict[str, Throttle],
        statistics: Callable[[], BrokerStatistics],
    ) -> None:
        self._limits = limits
        self._router: Router[Session] = Router(
            route_cache_bytes, self._checked_topic, self._route_cache_full
        )
        self._routes = self._router.routes  # the one lookup of the hot path
        self.dirty: Set[Session] = set()  # sessions with something new to send
        self._bridge_key = bridge_key
        self.bridge: Optional[Session] = None  # the federation bridge, once it said BRIDGE
        self._report: Optional[Dict[str, Any]] = None  # the bridge's last FEDERATION frame
        self._stats = stats
        self._throttles = throttles
        self._statistics = statistics
        self._snapshot: Optional[Tuple[float, bytes]] = None

    def set_cache_bytes(self, cache_bytes: int) -> None:
        """A new cap on the cache of routes (it starts afresh when next past it)."""
        self._router.cache_bytes = cache_bytes

    def forget(self, client: Session) -> None:
        """*client* is gone: its subscriptions go, and if it was the bridge, the bridge."""
        for topic in list(client.subs):
            self._unsubscribe(client, topic)
        if client is self.bridge:
            self.bridge = None  # its last report stays: statistics() says why it stopped
            self._router.set_everything(None)

    def handle(self, client: Session, frames: List[proto.Frame], budget: int) -> int:
        """Handle *client*'s frames, until their work passes *budget*: how many it handled.

        ProtocolError for anything a client may not send.
        """
        work = 0
        router = self._router
        router.work = 0  # routes computed or forgotten for this client's frames
        for done, (kind, frame) in enumerate(frames, 1):
            work += 1
            if kind == proto.PUB:
                work += self._route(client, frame)
            elif kind == proto.SUB:
                self._subscribe(client, self._checked_topic(proto.body_of(frame)))
            elif kind == proto.UNSUB:
                self._unsubscribe(client, self._checked_topic(proto.body_of(frame)))
            elif kind == proto.PING:
                self._reply(client, _PONG)
            elif kind == proto.STATS:
                self._reply(client, self._stats_reply())
            elif kind == proto.BRIDGE:
                self._attach_bridge(client, frame)
            elif kind == proto.FEDERATION and client is self.bridge:
                self._report = proto.federation_figures(frame)
            else:
                raise ProtocolError(f"unexpected frame type {kind}")
            if work + router.work >= budget and done < len(frames):
                return done
        return len(frames)

    def _reply(self, client: Session, frame: bytes) -> None:
        client.queue(frame)
        self.dirty.add(client)

    def _stats_reply(self) -> bytes:
        # Computed at most ten times a second, however often clients ask.
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] > 0.1:
            body = json.dumps(dataclasses.asdict(self._statistics())).encode()
            self._snapshot = (now, proto.frame(proto.STATS_REPLY, body))
        return self._snapshot[1]

    def federation_figures(self) -> Optional[Dict[str, Any]]:
        """The bridge's last report, with what the broker dropped for it; None if never one."""
        if self._report is None:
            return None
        figures = {**self._report, "dropped_behind": self._stats.bridge_dropped}
        if self.bridge is None:
            figures["state"] = "bridge not running"
        return figures

    def _checked_topic(self, topic: bytes) -> bytes:
        """*topic* if it is well formed and within the limits; ProtocolError if not."""
        excess = self._limits.topic_excess(topic, whose="the")
        if excess:
            raise ProtocolError(excess)
        proto.decode_topic(topic)
        return topic

    def _route_cache_full(self) -> None:
        self._throttles["route_cache_bytes"].log(
            logging.INFO,
            "the cache of routes reached %d bytes (route_cache_bytes): starting afresh",
            self._router.cache_bytes,
        )

    def _subscribe(self, client: Session, topic: bytes) -> None:
        if client is self.bridge:
            raise ProtocolError("the bridge receives every message without subscribing")
        if topic in client.subs:
            return
        if len(client.subs) >= self._limits.max_subscriptions:
            raise ProtocolError(
                f"more than {self._limits.max_subscriptions} subscriptions (max_subscriptions)"
            )
        if client.sub_bytes + len(topic) > self._limits.max_subscription_bytes:
            raise ProtocolError(
                f"subscribed topics over {self._limits.max_subscription_bytes} bytes "
                "(max_subscription_bytes)"
            )
        client.subs.add(topic)
        client.sub_bytes += len(topic)
        if self._router.subscribe(client, topic) and self.bridge is not None:
            self.dirty.add(self.bridge)  # the bridge is told of a new topic

    def _unsubscribe(self, client: Session, topic: bytes) -> None:
        if topic not in client.subs:
            return
        client.subs.discard(topic)
        client.sub_bytes -= len(topic)
        if self._router.unsubscribe(client, topic) and self.bridge is not None:
            self.dirty.add(self.bridge)  # and of a topic nobody wants any more

    def _attach_bridge(self, client: Session, frame: bytes) -> None:
        if self._bridge_key is None:
            raise ProtocolError("BRIDGE refused: this broker takes no federation bridge")
        if not hmac.compare_digest(proto.body_of(frame), self._bridge_key):
            raise ProtocolError("BRIDGE refused: only mpubsubd's own bridge, with its key")
        if self.bridge is not None:
            raise ProtocolError(f"{self.bridge.name} is already the federation bridge")
        if client.subs:
            raise ProtocolError("a client with subscriptions cannot become the bridge")
        self.bridge = client
        self._router.set_everything(client)  # and tells it every topic subscribed to
        self.dirty.add(client)
        logger.info("%s is the federation bridge", client.name)

    def queue_interest(self, bridge: Session) -> bool:
        """Queue the bridge's next SUB/UNSUB frames, about one send's worth; False if none."""
        feed = self._router.interest
        frames = feed.frames(SEND_CHUNK) if feed else []
        for frame in frames:
            bridge.queue(frame)
        return bool(frames)

    def _route(self, sender: Session, frame: bytes) -> int:
        """Queue *frame* for its subscribers; how many it went to."""
        targets = self._routes[proto.pub_topic(frame)]
        size = len(frame)
        dirty = self.dirty
        stats = self._stats
        stats.messages_in += 1
        stats.bytes_in += size
        for target in targets:  # Session.queue, inlined: the hot path
            if target is sender:
                continue
            target.out.append(frame)
            target.out_size += size
            dirty.add(target)
            stats.messages_out += 1
            stats.bytes_out += size
        return len(targets)
