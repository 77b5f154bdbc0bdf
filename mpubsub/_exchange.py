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
import itertools
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import _protocol as proto
from ._accounts import Accounts
from ._identity import Identity, relayed, sender_of
from ._policy import Policy
from ._routing import Router
from ._session import SEND_CHUNK, Session
from ._stats import BrokerStatistics, Counters, Throttle
from ._text import printable
from ._topics import format_topic
from .errors import ProtocolError

logger = logging.getLogger("mpubsub.broker")

_PONG = proto.frame(proto.PONG, b"")
_TOLD = 1024  # refusals told a client between two of its flushes, at most


class Exchange:
    """Routing, subscriptions, requests and the federation bridge's feed, for all clients.

    *statistics* gives the broker's figures for a STATS request;
    *throttles* rate-limit its log lines, by subject. *policy* says who may
    publish and subscribe to what, *accounts* what each user holds.
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
        policy: Policy,
        accounts: Accounts,
        clients: Callable[[], List[Session]],
    ) -> None:
        self._limits = limits
        self._router: Router[Session] = Router(
            route_cache_bytes, self._checked_topic, self._route_cache_full, Session.may_receive
        )
        self.policy = policy
        self.accounts = accounts
        self._clients = clients
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

    def set_policy(self, policy: Policy) -> None:
        """From now on *policy* holds, for every client: the routes are computed again.

        A subscription the new policy forbids stays, and brings nothing."""
        self.policy = policy
        logger.info("access policy: %s", policy.describe())
        for client in self._clients():
            client.grant(policy.access(client.identity))
            client.told.clear()
        self._router.clear_cache()

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
                self._pong(client)
            elif kind == proto.STATS:
                self._reply(client, self._stats_reply())
            elif kind == proto.CLIENTS:
                reply = self._clients_reply(client)
                work += len(reply) >> 10  # a unit of work per KiB listed
                self._reply(client, reply)
            elif kind == proto.BRIDGE:
                self._attach_bridge(client, frame)
            elif kind == proto.SENDER and client is self.bridge:
                self._relay_for(client, frame)
            elif kind == proto.FEDERATION and client is self.bridge:
                self._report = proto.federation_figures(frame)
            else:
                raise ProtocolError(f"unexpected frame type {kind}")
            if work + router.work >= budget and done < len(frames):
                return done
        return len(frames)

    def _pong(self, client: Session) -> None:
        client.told.clear()  # a flush: its next refusals are news again
        self._reply(client, _PONG)

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

    def _clients_reply(self, client: Session) -> bytes:
        body: Dict[str, Any]
        if not client.access.may("admin", b""):
            # Said in the reply: no DENIED, which the client's next flush() would raise.
            self._deny(client, "admin", b"", "listing clients needs the admin right on /", False)
            body = {"denied": f"{client.name} may not list clients: it needs the admin right on /"}
            return proto.frame(proto.CLIENTS_REPLY, json.dumps(body).encode())
        # Each client's topics cut short: a request costs what the connections do, not
        # what their subscriptions do, and its reply stays small enough to read.
        body = {"clients": [self.describe(c) for c in self._clients()]}
        return proto.frame(proto.CLIENTS_REPLY, json.dumps(body, ensure_ascii=False).encode())

    def describe(self, client: Session) -> Dict[str, Any]:
        """What ``mpubsub clients`` shows of *client*."""
        who = client.identity
        return {
            "id": client.number,
            "user": who.user,
            "uid": who.uid,
            "gid": who.gid,
            "pid": who.pid,
            "command": who.command,
            "address": who.describe() if who.address is not None else None,
            "since": client.since,
            "bridge": client is self.bridge,
            "subscriptions": len(client.subs),
            "topics": _some_topics(client.subs),
            "messages_in": client.messages_in,
            "bytes_in": client.bytes_in,
            "messages_out": client.messages_out,
            "bytes_out": client.bytes_out,
            "waiting": client.held,
            "denied": client.denied,
            "dropped": client.dropped,
        }

    def _deny(
        self, client: Session, right: str, topic: bytes, reason: str, tell: bool = True
    ) -> None:
        """Refuse *client* its *right* on *topic*: counted, logged, and told once
        between two of its flushes (unless not to *tell*)."""
        client.denied += 1
        self._stats.denied += 1
        client.throttle.warning(
            "%s denied: %s on %s (%s)",
            client.name + client.relaying,
            right,
            printable(format_topic(proto.decode_topic(topic))),
            reason,
        )
        told = client.told
        if tell and client.stamped and (right, topic) not in told and len(told) < _TOLD:
            told.add((right, topic))
            self._reply(client, proto.denied_frame(right, topic, reason))

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
        if not client.access.may("subscribe", topic):
            self._deny(client, "subscribe", topic, "the policy forbids it")
            return
        account = self.accounts[client.peer]
        if account.subscriptions >= self.accounts.quotas.subscriptions:
            self._deny(
                client,
                "subscribe",
                topic,
                f"{client.peer} has {account.subscriptions} subscriptions, at its limit of "
                f"{self.accounts.quotas.subscriptions} (max_subscriptions_per_user)",
            )
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
        account.subscriptions += 1
        if logger.isEnabledFor(logging.DEBUG):
            shown = printable(format_topic(proto.decode_topic(topic)))
            logger.debug("%s subscribed to %s", client.name, shown)
        if self._router.subscribe(client, topic) and self.bridge is not None:
            self.dirty.add(self.bridge)  # the bridge is told of a new topic

    def _unsubscribe(self, client: Session, topic: bytes) -> None:
        if topic not in client.subs:
            return
        client.subs.discard(topic)
        client.sub_bytes -= len(topic)
        self.accounts[client.peer].subscriptions -= 1
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
        # What it relays is other hosts' doing: the federation subject's rights hold, and
        # what waits for it is charged to the federation, not to the user it runs as.
        self.accounts.move(client, "federation")
        client.identity = Identity("federation")
        client.grant(self.policy.access(client.identity))
        client.stamp = client.identity.stamp()
        self._router.set_everything(client)  # and tells it every topic subscribed to
        self.dirty.add(client)
        logger.info("%s is the federation bridge", client.name)

    def _relay_for(self, bridge: Session, frame: bytes) -> None:
        """The bridge's next messages are those of the sender its SENDER frame names."""
        sender = sender_of(proto.body_of(frame))
        if not sender.host:
            raise ProtocolError("the bridge's SENDER frame names no host")
        identity = relayed(sender, sender.host)
        bridge.stamp = identity.stamp()
        bridge.relaying = f" for {printable(sender.host)} ({identity.describe()})"

    def queue_interest(self, bridge: Session) -> bool:
        """Queue the bridge's next SUB/UNSUB frames, about one send's worth; False if none."""
        feed = self._router.interest
        frames = feed.frames(SEND_CHUNK) if feed else []
        for frame in frames:
            bridge.queue(frame)
        return bool(frames)

    def _route(self, sender: Session, frame: bytes) -> int:
        """Queue *frame* for its subscribers, each told who sent it; how many it went to."""
        topic = proto.pub_topic(frame)
        size = len(frame)
        sender.messages_in += 1
        sender.bytes_in += size
        if sender.publishable is not None:
            allowed = sender.publishable.get(topic)
            if allowed is None:  # not asked yet: a topic fit to keep, first
                allowed = sender.publishable[self._checked_topic(topic)]
            if not allowed:
                self._deny(sender, "publish", topic, "the policy forbids it")
                return 1
        targets = self._routes[topic]
        dirty = self.dirty
        stamp = sender.stamp
        for target in targets:  # Session.queue, inlined: the hot path
            if target is sender:
                continue
            if target.last_stamp is not stamp:  # another sender: say who, once
                target.last_stamp = stamp
                if target.stamped:
                    target.out.append(stamp)
                    target.out_size += len(stamp)
            target.out.append(frame)
            target.out_size += size
            dirty.add(target)
            target.messages_out += 1
            target.bytes_out += size
        return len(targets)


_LISTED = 64  # topics of one client a list of clients shows, at most
_LISTED_CHARACTERS = 4096  # and characters of them


def _some_topics(subs: Set[bytes]) -> List[str]:
    """Some of *subs*, sorted and escaped, with ``... N more`` for the rest."""
    shown, size = [], 0
    for topic in itertools.islice(subs, _LISTED):
        text = printable(format_topic(proto.decode_topic(topic)))
        if size + len(text) > _LISTED_CHARACTERS:
            break
        shown.append(text)
        size += len(text)
    shown.sort()
    if len(shown) < len(subs):
        shown.append(f"... {len(subs) - len(shown)} more")
    return shown
