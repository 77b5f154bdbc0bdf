"""The broker's routing table, without sockets: routes always agree with subscriptions."""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpubsub import _protocol as proto
from mpubsub._routing import Router
from mpubsub.errors import ProtocolError

TOPICS = [
    proto.encode_topic(t) for t in [(), ("a",), ("a", "b"), ("a", "b", "c"), ("a", "c"), ("b",)]
]

operations = st.lists(
    st.tuples(
        st.sampled_from(["sub", "unsub", "route", "everything", "nobody", "drop"]),
        st.integers(0, 3),  # a client
        st.sampled_from(TOPICS),
    ),
    max_size=60,
)


def expected(subs: Dict[int, Set[bytes]], everything: Optional[int], topic: bytes) -> Set[int]:
    """What a route must hold, computed the slow, obvious way."""
    if not topic:
        found = {c for c, topics in subs.items() if topics}
    else:
        found = {c for c, topics in subs.items() if any(topic.startswith(t) for t in topics)}
    if everything is not None:
        found.add(everything)
    return found


@settings(max_examples=300)
@given(operations, st.sampled_from([0, 300, 1 << 20]))
def test_routes_agree_with_subscriptions(
    ops: List[Tuple[str, int, bytes]], cache_bytes: int
) -> None:
    """Any sequence of changes and lookups, with any cache budget: routes are right."""
    router: Router[int] = Router(cache_bytes)
    subs: Dict[int, Set[bytes]] = {c: set() for c in range(4)}
    everything: Optional[int] = None
    for op, client, topic in ops:
        if op == "sub":
            first = not any(topic in t for t in subs.values())
            assert router.subscribe(client, topic) == (first and topic not in subs[client])
            subs[client].add(topic)
        elif op == "unsub":
            had = topic in subs[client]
            subs[client].discard(topic)
            last = had and not any(topic in t for t in subs.values())
            assert router.unsubscribe(client, topic) == last
        elif op == "everything":
            everything = client
            router.set_everything(client)
        elif op == "nobody":
            everything = None
            router.set_everything(None)
        elif op == "drop":
            for t in list(subs[client]):
                router.unsubscribe(client, t)
            subs[client].clear()
        route = router.routes[topic]
        assert len(route) == len(set(route)), "a client twice in a route"
        assert set(route) == expected(subs, everything, topic)
    assert set(router.topics) == set().union(*subs.values())


def test_churn_forgets_only_what_it_touches() -> None:
    """A SUB/UNSUB leaves the cached routes of unrelated topics and the broadcast route alone."""
    router: Router[str] = Router()
    for n in range(1000):
        router.subscribe("big", proto.encode_topic(("t", str(n))))
    unrelated = proto.encode_topic(("t", "5", "x"))
    assert router.routes[unrelated] == ("big",)
    assert router.routes[b""] == ("big",)
    cached = len(router.routes)
    router.subscribe("big", proto.encode_topic(("new",)))
    router.unsubscribe("big", proto.encode_topic(("new",)))
    assert len(router.routes) == cached  # nothing recomputed but what changed
    router.subscribe("other", proto.encode_topic(("t",)))
    assert unrelated not in router.routes  # below t: forgotten
    assert b"" not in router.routes  # other joined the broadcast route
    assert set(router.routes[unrelated]) == {"big", "other"}


def test_cache_stays_within_its_budget() -> None:
    """However many distinct topics are routed, the cache holds about its budget, no more."""
    router: Router[str] = Router(cache_bytes=64 * 1024)
    router.subscribe("c", proto.encode_topic(("x",)))
    for n in range(5000):
        topic = proto.encode_topic(("x", *(["level"] * 20), str(n)))
        assert router.routes[topic] == ("c",)
        assert router.cached_size <= 64 * 1024 + 20_000
    router.clear_cache()
    assert router.cached_size == 0


def test_a_topic_the_check_refuses_is_not_cached() -> None:
    """The check runs on a miss; what it refuses raises and leaves nothing behind."""

    def check(topic: bytes) -> None:
        if len(topic) > 4:
            raise ProtocolError("too long")

    router: Router[str] = Router(check=check)
    with pytest.raises(ProtocolError):
        router.routes[proto.encode_topic(("toolong",))]
    assert not router.routes
    assert router.routes[proto.encode_topic(("ok",))] == ()


def test_forgetting_gives_back_what_caching_counted() -> None:
    """Forgetting every cached route brings the count to nothing; caching again, to the same."""
    router: Router[str] = Router()
    for client in ("a", "b", "c"):
        router.subscribe(client, proto.encode_topic(("x", "y")))
    topics = [proto.encode_topic(("x", "y", str(n), "z")) for n in range(50)]
    for topic in topics:
        assert len(router.routes[topic]) == 3
    first = router.cached_size
    assert first > 0
    router.subscribe("d", proto.encode_topic(("x",)))  # forgets every one of them
    assert router.cached_size == 0
    for topic in topics:
        assert len(router.routes[topic]) == 4
    assert router.cached_size == first + 50 * 8  # one more client in each route


def test_a_routes_cost_grows_with_its_clients() -> None:
    """A route to many clients counts for more than a route to one."""
    one: Router[int] = Router()
    many: Router[int] = Router()
    topic = proto.encode_topic(("t",))
    one.subscribe(0, topic)
    for client in range(100):
        many.subscribe(client, topic)
    assert one.routes[topic] and many.routes[topic]
    assert many.cached_size - one.cached_size == 99 * 8


def test_a_new_catch_all_subscriber_joins_cached_routes() -> None:
    """Subscribing to () forgets every cached route: each then includes the new subscriber."""
    router: Router[str] = Router()
    topic = proto.encode_topic(("a",))
    router.subscribe("x", topic)
    assert router.routes[topic] == ("x",)
    router.subscribe("all", b"")
    assert set(router.routes[topic]) == {"x", "all"}
    router.unsubscribe("all", b"")
    assert router.routes[topic] == ("x",)


def test_the_interest_feed_tells_the_bridge_each_change_once_merged() -> None:
    """The client that gets everything hears of every topic subscribed when it is set,
    then of each topic's first subscriber and last one gone; news undone waits no more."""
    router: Router[int] = Router()
    a, b, c = (proto.encode_topic((t,)) for t in "abc")
    router.subscribe(1, a)
    assert router.interest is None  # nobody gets everything: nobody is told
    router.set_everything(99)
    assert router.interest is not None
    router.subscribe(2, a)  # not a's first subscriber: no news
    router.subscribe(1, b)
    router.unsubscribe(1, b)  # b came and went before the bridge heard: nothing to say
    router.subscribe(1, c)
    assert sorted(router.interest.frames(1 << 20)) == sorted(
        [proto.frame(proto.SUB, a), proto.frame(proto.SUB, c)]
    )
    assert not router.interest
    router.unsubscribe(1, a)
    assert not router.interest  # 2 still subscribes to a
    router.unsubscribe(2, a)
    assert router.interest.frames(1 << 20) == [proto.frame(proto.UNSUB, a)]
    router.set_everything(None)
    assert router.interest is None


def test_the_interest_feed_gives_about_one_send_at_a_time() -> None:
    """However many topics wait, frames() gives about the size asked for."""
    router: Router[int] = Router()
    for n in range(10_000):
        router.subscribe(1, proto.encode_topic((f"topic{n}",)))
    router.set_everything(99)
    assert router.interest is not None
    first = router.interest.frames(4096)
    assert 4096 <= sum(map(len, first)) < 4096 + 64
    rest = router.interest.frames(1 << 30)
    assert len(first) + len(rest) == 10_000


def test_checking_each_client_of_a_route_counts_as_work() -> None:
    """Routes filtered by a policy cost a check per client, deeper topics more: counted."""
    router: Router[str] = Router(admits=lambda client, topic: client != "denied")
    for client in ("denied", *(f"c{n}" for n in range(399))):
        router.subscribe(client, b"")
    deep = proto.encode_topic(tuple("x" * 128))
    router.work = 0
    assert "denied" not in router.routes[deep] and len(router.routes[deep]) == 399
    assert router.work >= 400 * 32
