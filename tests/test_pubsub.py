"""Tests for mpubsub._pubsub: the local PubSub."""

from __future__ import annotations

import gc
import logging
import threading
import tracemalloc
from typing import Any, Callable, Dict, List, Tuple

import pytest

from mpubsub import PubSub

Calls = List[Tuple[str, Tuple[str, ...], Dict[str, Any]]]


def recorder(calls: Calls, name: str) -> Callable[..., None]:
    def subscriber(topic: Tuple[str, ...], **message: Any) -> None:
        calls.append((name, topic, message))

    return subscriber


@pytest.fixture
def pubsub() -> PubSub:
    return PubSub()


def test_hierarchy_order(pubsub: PubSub) -> None:
    """Specific subscribers come first, then their parents, then catch-all, each in order."""
    calls: Calls = []
    subs = {n: recorder(calls, n) for n in ("all1", "foo1", "foobar1", "foo2", "foobar2", "all2")}
    pubsub.add_subscriber(None, subs["all1"])
    pubsub.add_subscriber("foo", subs["foo1"])
    pubsub.add_subscriber(("foo", "bar"), subs["foobar1"])
    pubsub.add_subscriber(("foo",), subs["foo2"])
    pubsub.add_subscriber(("foo", "bar"), subs["foobar2"])
    pubsub.add_subscriber((), subs["all2"])
    pubsub.publish(("foo", "bar"), x=1)
    assert [c[0] for c in calls] == ["foobar1", "foobar2", "foo1", "foo2", "all1", "all2"]
    assert all(c[1] == ("foo", "bar") and c[2] == {"x": 1} for c in calls)


def test_string_topic_is_one_element_tuple(pubsub: PubSub) -> None:
    """A string topic is the same as a one-element tuple, and subscribers get the tuple."""
    calls: Calls = []
    sub = recorder(calls, "s")
    pubsub.add_subscriber("foo", sub)
    pubsub.publish(("foo",), a=1)
    pubsub.publish("foo", a=2)
    assert calls == [("s", ("foo",), {"a": 1}), ("s", ("foo",), {"a": 2})]


def test_other_topics_not_delivered(pubsub: PubSub) -> None:
    """Siblings, children and unrelated topics do not receive a message."""
    calls: Calls = []
    sub = recorder(calls, "s")
    pubsub.add_subscriber(("foo", "bar", "baz"), sub)
    pubsub.add_subscriber("other", sub)
    pubsub.publish(("foo", "bar"))
    pubsub.publish(("foo", "qux", "baz"))
    pubsub.publish("foobar")
    assert calls == []


@pytest.mark.parametrize("broadcast", [(), None])
def test_broadcast_reaches_everyone(pubsub: PubSub, broadcast: Any) -> None:
    """Publishing () or None reaches every subscriber, catch-all last, with topic ()."""
    calls: Calls = []
    subs = [recorder(calls, n) for n in ("all", "a", "ab", "z")]
    pubsub.add_subscriber(None, subs[0])
    pubsub.add_subscriber("a", subs[1])
    pubsub.add_subscriber(("a", "b"), subs[2])
    pubsub.add_subscriber("z", subs[3])
    pubsub.publish(broadcast, n=5)
    assert sorted(c[0] for c in calls) == ["a", "ab", "all", "z"]
    assert calls[-1][0] == "all"
    assert {c[1] for c in calls} == {()}


def test_remove_and_clear(pubsub: PubSub) -> None:
    """remove_subscriber stops one subscription; clear_subscribers stops all."""
    calls: Calls = []
    a, b = recorder(calls, "a"), recorder(calls, "b")
    pubsub.add_subscriber("t", a)
    pubsub.add_subscriber("t", b)
    pubsub.add_subscriber("u", a)
    pubsub.remove_subscriber("t", a)
    pubsub.remove_subscriber("t", a)  # again: no error
    pubsub.remove_subscriber("never", a)
    pubsub.publish("t")
    pubsub.publish("u")
    assert [c[0] for c in calls] == ["b", "a"]
    pubsub.clear_subscribers()
    pubsub.publish("t")
    pubsub.publish(None)
    assert len(calls) == 2


def test_adding_twice_delivers_once(pubsub: PubSub) -> None:
    """The same subscriber added twice to a topic is called once per publish."""
    calls: Calls = []
    a = recorder(calls, "a")
    pubsub.add_subscriber("t", a)
    pubsub.add_subscriber("t", a)
    pubsub.publish("t")
    assert len(calls) == 1


def test_pubsubs_are_independent() -> None:
    """Two PubSub objects share no subscribers."""
    calls: Calls = []
    one, two = PubSub(), PubSub()
    a = recorder(calls, "a")
    one.add_subscriber(None, a)
    two.publish("x")
    assert calls == []
    one.publish("x")
    assert len(calls) == 1


def test_bad_topic_and_subscriber(pubsub: PubSub) -> None:
    """A topic of the wrong type and a non-callable subscriber are TypeErrors."""
    with pytest.raises(
        TypeError, match=r"^topic must be a tuple of strings, a string or None, not int$"
    ):
        pubsub.publish(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^subscriber must be callable, not str$"):
        pubsub.add_subscriber("t", "nope")  # type: ignore[arg-type]


# --- warnings and exceptions -------------------------------------------------


def test_signature_mismatch_warns_and_others_receive(pubsub: PubSub) -> None:
    """A subscriber without the message's keyword gets a warning; the others still get it."""
    calls: Calls = []

    def narrow(topic: Tuple[str, ...]) -> None:
        calls.append(("narrow", topic, {}))

    after = recorder(calls, "after")
    pubsub.add_subscriber("t", narrow)
    pubsub.add_subscriber("t", after)
    with pytest.warns(
        UserWarning, match=r"cannot take the message on \('t',\).*unexpected keyword"
    ):
        pubsub.publish("t", extra=1)
    assert calls == [("after", ("t",), {"extra": 1})]


def test_typeerror_inside_subscriber_is_an_error_not_a_warning(
    pubsub: PubSub, caplog: pytest.LogCaptureFixture
) -> None:
    """A TypeError raised by the subscriber's own code is logged as an error, not a warning."""

    def buggy(topic: Tuple[str, ...], n: int) -> None:
        raise TypeError("bug in the body")

    pubsub.add_subscriber("t", buggy)
    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        pubsub.publish("t", n=1)  # filterwarnings=error would fail on any warning
    (record,) = caplog.records
    assert record.name == "mpubsub" and record.levelno == logging.ERROR
    assert record.exc_info is not None and str(record.exc_info[1]) == "bug in the body"


def test_raising_subscriber_does_not_stop_others(
    pubsub: PubSub, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception is logged with its traceback and every other subscriber is called."""
    calls: Calls = []

    def boom(topic: Tuple[str, ...], **message: Any) -> None:
        raise RuntimeError("boom")

    pubsub.add_subscriber(("a", "b"), boom)
    pubsub.add_subscriber(("a", "b"), recorder(calls, "same"), weak=False)
    pubsub.add_subscriber("a", recorder(calls, "parent"), weak=False)
    with caplog.at_level(logging.ERROR, logger="mpubsub"):
        pubsub.publish(("a", "b"))
    assert [c[0] for c in calls] == ["same", "parent"]
    assert "boom" in caplog.text and "Traceback" in caplog.text


def test_error_hook_can_reraise() -> None:
    """A custom on_error handler sees the topic, subscriber and exception and may re-raise."""
    seen: List[Any] = []
    calls: Calls = []

    def reraise(topic: Tuple[str, ...], subscriber: Any, exc: Exception) -> None:
        seen.append((topic, subscriber))
        raise exc

    pubsub = PubSub(on_error=reraise)

    def boom(topic: Tuple[str, ...]) -> None:
        raise ValueError("bad")

    other = recorder(calls, "other")
    pubsub.add_subscriber("t", boom)
    pubsub.add_subscriber("t", other)
    with pytest.raises(ValueError, match=r"^bad$"):
        pubsub.publish("t")
    assert seen == [(("t",), boom)]
    assert len(calls) == 1  # delivery finished before the hook raised


# --- references ----------------------------------------------------------------


class Receiver:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def on_message(self, topic: Tuple[str, ...], **message: Any) -> None:
        self.calls.append(("method", topic, message))


def test_dead_subscribers_receive_nothing(pubsub: PubSub) -> None:
    """A dead bound method's object and a dropped closure are never called."""
    calls: Calls = []
    receiver = Receiver(calls)
    pubsub.add_subscriber("t", receiver.on_message)
    pubsub.add_subscriber("t", recorder(calls, "closure"))  # nothing else holds it
    pubsub.publish("t")
    assert [c[0] for c in calls] == ["method"]
    del receiver
    gc.collect()
    pubsub.publish("t")
    assert len(calls) == 1


def test_weak_false_keeps_lambdas(pubsub: PubSub) -> None:
    """weak=False keeps a lambda alive while subscribed; it can still be removed."""
    calls: List[Any] = []
    fn = lambda topic, **m: calls.append(topic)  # noqa: E731
    pubsub.add_subscriber("t", fn, weak=False)
    pubsub.add_subscriber("t", lambda topic, **m: calls.append("weak"))
    del fn
    gc.collect()
    pubsub.publish("t")
    assert calls == [("t",)]
    pubsub.remove_subscriber("t", pubsub._routes.subs[("t",)][0]())  # type: ignore[arg-type]
    pubsub.publish("t")
    assert calls == [("t",)]


def test_bound_method_can_be_removed(pubsub: PubSub) -> None:
    """A bound method is removed by passing an equal bound method."""
    calls: Calls = []
    receiver = Receiver(calls)
    pubsub.add_subscriber("t", receiver.on_message)
    pubsub.remove_subscriber("t", receiver.on_message)
    pubsub.publish("t")
    assert calls == []


def test_dead_entries_are_pruned(pubsub: PubSub) -> None:
    """Memory does not grow with subscribers that have died."""
    calls: Calls = []
    keep = Receiver(calls)
    pubsub.add_subscriber("keep", keep.on_message)

    def churn() -> None:
        for i in range(2000):
            receiver = Receiver(calls)
            pubsub.add_subscriber(("topic", str(i % 50)), receiver.on_message)
            del receiver

    churn()  # warm up allocator pools
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            churn()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 100_000, f"grew by {after - before} bytes"
    entries = sum(len(refs) for refs in pubsub._routes.subs.values())
    assert entries < 100
    pubsub.publish("keep")
    assert len(calls) == 1


def test_unweakrefable_subscriber_needs_weak_false(pubsub: PubSub) -> None:
    """A callable that cannot be weakly referenced is refused unless weak=False."""

    class Slotted:
        __slots__ = ()

        def __call__(self, topic: Tuple[str, ...]) -> None:
            pass

    with pytest.raises(TypeError, match=r"pass weak=False$"):
        pubsub.add_subscriber("t", Slotted())
    pubsub.add_subscriber("t", Slotted(), weak=False)
    pubsub.publish("t")


# --- re-entrancy and threads -----------------------------------------------------


def test_subscriber_may_publish_and_subscribe(pubsub: PubSub) -> None:
    """Inside a publish, a subscriber may publish, subscribe and unsubscribe; the set is fixed."""
    calls: Calls = []
    late = recorder(calls, "late")

    def first(topic: Tuple[str, ...], **message: Any) -> None:
        calls.append(("first", topic, message))
        if topic == ("t",):
            pubsub.add_subscriber("t", late)
            pubsub.remove_subscriber("t", second)
            pubsub.publish("inner", depth=1)

    second = recorder(calls, "second")
    pubsub.add_subscriber("t", first)
    pubsub.add_subscriber("t", second)
    pubsub.add_subscriber("inner", first)
    pubsub.publish("t")
    assert [c[0] for c in calls] == ["first", "first", "second"]
    assert calls[1][1] == ("inner",)
    calls.clear()
    pubsub.publish("t")
    assert [c[0] for c in calls][:1] == ["first"] and "late" in [c[0] for c in calls]
    assert "second" not in [c[0] for c in calls]


def test_threads_publish_and_churn_subscriptions(pubsub: PubSub) -> None:
    """Concurrent publishers and subscription churn lose no message of a stable subscriber."""
    counts = {"stable": 0}
    lock = threading.Lock()

    def stable(topic: Tuple[str, ...], **message: Any) -> None:
        with lock:
            counts["stable"] += 1

    pubsub.add_subscriber("t", stable)
    errors: List[BaseException] = []
    per_thread = 2000

    def publisher() -> None:
        try:
            for i in range(per_thread):
                pubsub.publish(("t", "x"), i=i)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def churner() -> None:
        try:
            for i in range(per_thread):
                fn = recorder([], "c")
                pubsub.add_subscriber(("t", str(i % 7)), fn, weak=False)
                pubsub.remove_subscriber(("t", str(i % 7)), fn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher) for _ in range(3)]
    threads += [threading.Thread(target=churner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert counts["stable"] == 3 * per_thread
    assert set(pubsub._routes.subs) == {("t",)}
