"""The broker's routing table: who gets a topic's messages (no I/O, no sockets).

Subscriptions are held per encoded topic (see ``_protocol``). A route, the
clients subscribed to a topic or to one of its prefixes, is computed once
and cached, so a publish is one dict lookup. Changes cost what they touch:
a SUB or UNSUB of ``T`` forgets only the cached routes of ``T`` and the
topics below it, found through a tree of the cached topics, and the
broadcast route (everyone with a subscription) is kept as clients gain
their first subscription or lose their last. Forgetting an entry costs no
more than computing it did, so churn costs what the publishes cost.

The cache is bounded in bytes (its topics, routes and tree nodes, roughly
counted) and starts afresh past its budget.
"""

from __future__ import annotations

from typing import (
    Callable,
    Dict,
    Generic,
    Hashable,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
)

from ._protocol import SEP, SUB, UNSUB, frame, prefix_ends

C = TypeVar("C", bound=Hashable)

DEFAULT_CACHE_BYTES = 4 * 1024 * 1024

# Rough costs, in bytes, of what a cached route holds beyond its topic's bytes.
_ENTRY_COST = 200  # a dict entry, the route tuple, the bytes object's header
_NODE_COST = 250  # one node of the tree of cached topics (a small dict)
_TARGET_COST = 8  # one pointer in a route tuple


class _Node:
    """A node of the tree of cached topics: one per element of a cached topic."""

    __slots__ = ("children", "topic")

    def __init__(self) -> None:
        self.children: Dict[bytes, _Node] = {}
        self.topic: Optional[bytes] = None  # the cached topic that ends here, if any


def elements(topic: bytes) -> Iterator[bytes]:
    """The encoded elements of an encoded topic, each with its separator, in order."""
    start = 0
    for end in prefix_ends(topic):
        yield topic[start:end]
        start = end


class InterestFeed:
    """What the client that gets everything (the federation bridge) has yet to hear
    of the topics subscribed to: each topic's first subscriber, and its last gone.

    A topic's first subscriber and its last unsubscriber alternate: news
    about a topic still waiting undoes the news waiting there, so what waits
    is at most one entry per topic subscribed now or known to the bridge,
    whatever the churn, and costs nothing to merge.
    """

    def __init__(self, topics: Iterable[bytes]) -> None:
        self._news: Dict[bytes, bool] = dict.fromkeys(topics, True)  # True: subscribed

    def __bool__(self) -> bool:
        return bool(self._news)

    def tell(self, topic: bytes, subscribed: bool) -> None:
        if self._news.pop(topic, None) is None:
            self._news[topic] = subscribed

    def frames(self, size: int) -> List[bytes]:
        """The next SUB/UNSUB frames, about *size* bytes of them, no longer waiting."""
        news, frames, taken = self._news, [], 0
        while news and taken < size:
            topic, subscribed = news.popitem()
            frames.append(frame(SUB if subscribed else UNSUB, topic))
            taken += len(frames[-1])
        return frames


class RouteCache(Dict[bytes, Tuple[C, ...]]):
    """Encoded topic -> the clients its messages go to; a miss computes the route."""

    def __init__(self, router: Router[C]) -> None:
        super().__init__()
        self.router = router

    def __missing__(self, topic: bytes) -> Tuple[C, ...]:
        return self.router._cache(topic)


class Router(Generic[C]):
    """Subscriptions of clients to encoded topics, and the routes they make.

    ``routes[topic]`` is the tuple of clients subscribed to *topic* or a
    prefix of it, plus the client set by ``set_everything`` (the federation
    bridge), whose ``interest`` feed then tells what it should know of the
    subscriptions; for ``b''`` (broadcast) every client with a subscription. A
    topic not yet cached is first passed to *check*, which raises if it may
    not be routed (malformed, too long): nothing is cached then. When the
    cache passes *cache_bytes*, it starts afresh and *on_full* is called.
    A route holds only the clients *admits* admits for its topic (their
    policy), asked once per route computed, never per message.
    """

    def __init__(
        self,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        check: Callable[[bytes], object] = lambda topic: None,
        on_full: Callable[[], object] = lambda: None,
        admits: Callable[[C, bytes], bool] = lambda client, topic: True,
    ) -> None:
        self._check = check  # raises for a topic that may not be routed
        self._on_full = on_full  # told when the cache starts afresh for lack of room
        self._admits = admits
        self.routes: RouteCache[C] = RouteCache(self)
        self._subs: Dict[bytes, Dict[C, None]] = {}  # topic -> holders, in order
        self._listening: Dict[C, int] = {}  # client -> its number of subscriptions
        self._everything: Optional[C] = None
        self.interest: Optional[InterestFeed] = None  # for the client that gets everything
        self._tree = _Node()
        self.cache_bytes = cache_bytes
        # Work done computing and forgetting routes, in elements and nodes
        # walked: the broker reads and resets it to share its loop fairly.
        self.work = 0
        self._cached_size = 0

    @property
    def topics(self) -> Dict[bytes, Dict[C, None]]:
        """The subscribed topics and their holders (do not modify)."""
        return self._subs

    @property
    def cached_size(self) -> int:
        """What the cache of routes holds, roughly, in bytes."""
        return self._cached_size

    def subscribe(self, client: C, topic: bytes) -> bool:
        """Add a subscription; True if *topic* had no subscriber before."""
        holders = self._subs.setdefault(topic, {})
        if client in holders:
            return False
        holders[client] = None
        self._count(client, +1)
        self._forget(topic)
        if len(holders) > 1:
            return False
        if self.interest is not None:
            self.interest.tell(topic, True)
        return True

    def unsubscribe(self, client: C, topic: bytes) -> bool:
        """Remove a subscription if it exists; True if *topic* lost its last subscriber."""
        holders = self._subs.get(topic)
        if holders is None or client not in holders:
            return False
        del holders[client]
        self._count(client, -1)
        self._forget(topic)
        if holders:
            return False
        del self._subs[topic]
        if self.interest is not None:
            self.interest.tell(topic, False)
        return True

    def set_everything(self, client: Optional[C]) -> None:
        """Send every message to *client* (None: to nobody beyond the subscribers), and
        start its interest feed with every topic subscribed now."""
        self._everything = client
        self.interest = None if client is None else InterestFeed(self._subs)
        self.clear_cache()

    def clear_cache(self) -> None:
        self.routes.clear()
        self._tree = _Node()
        self._cached_size = 0

    def _count(self, client: C, change: int) -> None:
        count = self._listening.get(client, 0) + change
        if count:
            self._listening[client] = count
        else:
            del self._listening[client]
        if count in (0, 1):  # joined or left the broadcast route
            self.routes.pop(b"", None)

    def _forget(self, topic: bytes) -> None:
        """Drop the cached routes of *topic* and of every topic below it."""
        if not topic:
            self.clear_cache()
            return
        node, parent, element = self._tree, self._tree, b""
        for element in elements(topic):
            child = node.children.get(element)
            if child is None:
                return  # nothing cached at or below topic
            parent, node = node, child
        del parent.children[element]
        stack = [node]
        while stack:
            node = stack.pop()
            self.work += 1
            self._cached_size -= _NODE_COST
            stack.extend(node.children.values())
            if node.topic is not None:
                route = self.routes.pop(node.topic, None)
                if route is not None:
                    self._cached_size -= self._cost(node.topic, route)

    def _cache(self, topic: bytes) -> Tuple[C, ...]:
        self._check(topic)
        route = self._compute(topic)
        if not topic:
            self.routes[topic] = route
            return route
        if self._cached_size > self.cache_bytes:
            self.clear_cache()
            self._on_full()
        node = self._tree
        created = 0
        self.work += 4 * topic.count(SEP) + len(route)
        for element in elements(topic):
            child = node.children.get(element)
            if child is None:
                child = node.children[element] = _Node()
                created += 1
            node = child
        node.topic = topic
        self._cached_size += self._cost(topic, route) + created * _NODE_COST
        self.routes[topic] = route
        return route

    @staticmethod
    def _cost(topic: bytes, route: Tuple[C, ...]) -> int:
        return len(topic) + _ENTRY_COST + _TARGET_COST * len(route)

    def _compute(self, topic: bytes) -> Tuple[C, ...]:
        found: Dict[C, None] = {}
        if not topic:
            found.update(dict.fromkeys(self._listening))
        else:
            subs = self._subs
            catch_all = subs.get(b"")
            if catch_all:
                found.update(catch_all)
            for end in prefix_ends(topic):
                holders = subs.get(topic[:end])
                if holders:
                    found.update(holders)
        if self._everything is not None:
            found[self._everything] = None
        admits = self._admits
        route = tuple(client for client in found if admits(client, topic))
        # Each client's check may walk the topic's prefixes (its policy): work too.
        self.work += len(found) * (1 + topic.count(SEP) // 4)
        return route
