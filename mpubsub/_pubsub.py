"""The in-process publish-subscribe object."""

from __future__ import annotations

import itertools
import logging
import threading
import types
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._memo import Memo
from .typing import Subscriber, Topic

__all__ = ["ErrorHandler", "PubSub", "as_topic"]

logger = logging.getLogger("mpubsub")

#: Called as ``handler(topic, subscriber, exception)`` when a subscriber raises.
ErrorHandler = Callable[[Tuple[str, ...], Subscriber, Exception], None]

# A subscription is held as a zero-argument callable returning the subscriber,
# or None once it has died: a weak reference, or (for weak=False) the C-level
# ``repeat(fn).__next__``, which costs no Python frame on the publish path.
_Ref = Callable[[], Optional[Subscriber]]
_Subs = Dict[Tuple[str, ...], Tuple[_Ref, ...]]

# Dead weak references tolerated before the table is pruned (amortised O(1)).
_MIN_DEAD_BEFORE_PRUNE = 16


def as_topic(topic: Topic) -> Tuple[str, ...]:
    """Return *topic* as a tuple: a string is a one-element tuple, None is ``()``."""
    if topic.__class__ is tuple:
        return topic
    if topic is None:
        return ()
    if isinstance(topic, str):
        return (topic,)
    if isinstance(topic, tuple):
        return tuple(topic)
    raise TypeError(
        f"topic must be a tuple of strings, a string or None, not {type(topic).__name__}"
    )


class _Routes(Memo[Tuple[str, ...], Tuple[_Ref, ...]]):
    """Published topic -> subscriptions to call, computed from the live table.

    The table (``subs``, one per PubSub) changes in place, one atomic dict
    operation per change (pruning makes several, but drops only dead
    references), and each change then replaces the ``_Routes`` by an empty
    one on the same table, which the old one names as its ``successor``. So
    a route computed while a change lands is only ever kept by the old memo,
    which no publish that starts after the change reads; and a computation
    during which a change landed runs again, so a route never mixes two
    states of the table.
    """

    __slots__ = ("subs", "successor")

    def __init__(self, subs: _Subs) -> None:
        super().__init__(self._route, weigh=_weigh)
        self.subs = subs
        self.successor: Optional[_Routes] = None

    def _route(self, topic: Tuple[str, ...]) -> Tuple[_Ref, ...]:
        if not topic:  # broadcast: every subscription, the catch-all ones last
            # dict.copy runs in C without calling back into Python: a snapshot
            # of one moment that no other thread can change under it.
            subs = self.subs.copy()
            catch_all = subs.pop((), ())
            return tuple(itertools.chain.from_iterable(subs.values())) + catch_all
        routes = self
        route = routes._hierarchy(topic)
        while routes.successor is not None:  # its reads may straddle a change
            routes = routes.successor
            route = routes._hierarchy(topic)
        return route

    def _hierarchy(self, topic: Tuple[str, ...]) -> Tuple[_Ref, ...]:
        subs = self.subs
        route: Tuple[_Ref, ...] = ()
        prefix = topic
        while prefix:
            route += subs.get(prefix, ())
            prefix = prefix[:-1]
        return route + subs.get((), ())


def _weigh(topic: Tuple[str, ...], route: Tuple[_Ref, ...]) -> int:
    """What a cached route holds, roughly, in bytes: its topic's strings and the tuples."""
    return 120 + 8 * len(route) + sum(len(element) + 60 for element in topic)


class PubSub:
    """A publish-subscribe object for publishers and subscribers in one process.

    Publishing ``('foo', 'bar')`` calls the ``('foo', 'bar')`` subscribers,
    then the ``('foo',)`` ones, then the catch-all ones, each group in
    subscription order, as ``subscriber(('foo', 'bar'), **message)``.
    Publishing ``()`` or ``None`` (broadcast) calls every subscriber.

    A subscriber that raises does not stop the others: once all have been
    called, each exception goes to *on_error* (by default, logged with its
    traceback at ERROR on the ``mpubsub`` logger; a handler that re-raises
    makes ``publish`` raise). A subscriber that does not accept the message's
    keywords gets a ``UserWarning`` instead.

    Thread safety: any method may be called from any thread or from inside a
    subscriber, and ``publish`` takes no lock. Before it calls anyone, a
    publish takes the subscriptions as they stood after some prefix of the
    changes, in the order they took effect: at least every change that
    returned before the publish was called, perhaps changes still under way
    in other threads, never a change without those before it. So it calls
    every subscriber added before it was called and not removed since, none
    removed before it was called, and no subscription twice; changes made
    once it calls subscribers (by them or by other threads) apply from the
    next publish. Pub-subs share no state with each other.
    """

    def __init__(self, *, on_error: Optional[ErrorHandler] = None) -> None:
        """Make an empty pub-sub; *on_error* replaces the default error handler."""
        self.on_error: ErrorHandler = on_error or _log_error
        self._subs: _Subs = {}  # changed in place under the lock, then _after_change
        self._routes = _Routes(self._subs)
        self._lock = threading.RLock()
        self._size = 0
        self._dead = 0
        selfref = weakref.ref(self)

        def on_dead(_: object) -> None:
            pubsub = selfref()
            if pubsub is not None:
                pubsub._note_dead()

        self._on_dead = on_dead

    def add_subscriber(self, topic: Topic, subscriber: Subscriber, *, weak: bool = True) -> None:
        """Call *subscriber* for every message published on *topic* or below it.

        The subscriber is held by weak reference: once nothing else refers to
        it (a lambda, a closure, a bound method of a dead object), it silently
        stops receiving. Pass ``weak=False`` to keep it alive for as long as
        it is subscribed. Adding a subscriber again to the same topic has no
        effect, except that ``weak=False`` then makes the reference strong.
        """
        if not callable(subscriber):
            raise TypeError(f"subscriber must be callable, not {type(subscriber).__name__}")
        topic = as_topic(topic)
        ref = self._weak(subscriber) if weak else itertools.repeat(subscriber).__next__
        with self._lock:
            refs = self._subs.get(topic, ())
            for i, held in enumerate(refs):
                if held() == subscriber:
                    if weak or not isinstance(held, weakref.ref):
                        return  # held already, and at least as strongly
                    refs = (*refs[:i], ref, *refs[i + 1 :])
                    break
            else:
                refs += (ref,)
                self._size += 1
            self._subs[topic] = refs
            self._after_change(topic)

    def remove_subscriber(self, topic: Topic, subscriber: Subscriber) -> None:
        """Stop calling *subscriber* for *topic*; nothing happens if it was not subscribed."""
        topic = as_topic(topic)
        with self._lock:
            refs = self._subs.get(topic, ())
            kept = tuple(r for r in refs if r() != subscriber)
            if len(kept) == len(refs):
                return
            self._size -= len(refs) - len(kept)
            if kept:
                self._subs[topic] = kept
            else:
                self._subs.pop(topic, None)  # not del: see _note_dead
            self._after_change(topic)

    def clear_subscribers(self) -> None:
        """Remove every subscriber of every topic."""
        with self._lock:
            self._subs.clear()
            self._size = self._dead = 0
            self._after_change(None)

    def publish(self, topic: Topic, **message: Any) -> None:
        """Call the subscribers of *topic* with *message* as keyword arguments."""
        if topic.__class__ is not tuple:
            topic = as_topic(topic)
        failures: Optional[List[Tuple[Subscriber, Exception]]] = None
        for ref in self._routes[topic]:
            subscriber = ref()
            if subscriber is None:
                continue
            try:
                subscriber(topic, **message)
            except Exception as exc:  # reported below, once everyone has the message
                if failures is None:
                    failures = []
                failures.append((subscriber, exc))
        if failures:
            self._report(topic, message, failures)

    def _report(
        self,
        topic: Tuple[str, ...],
        message: Dict[str, Any],
        failures: List[Tuple[Subscriber, Exception]],
    ) -> None:
        for subscriber, exc in failures:
            if _is_signature_mismatch(subscriber, exc, topic, message):
                warnings.warn(
                    f"subscriber {subscriber!r} cannot take the message on {topic!r}: {exc}",
                    stacklevel=4,
                )
            else:
                self.on_error(topic, subscriber, exc)

    def _weak(self, subscriber: Subscriber) -> _Ref:
        try:
            if isinstance(subscriber, types.MethodType):
                return weakref.WeakMethod(subscriber, self._on_dead)
            return weakref.ref(subscriber, self._on_dead)
        except TypeError:
            raise TypeError(
                f"cannot hold {subscriber!r} by weak reference; pass weak=False"
            ) from None

    def _note_dead(self) -> None:
        # Runs wherever the garbage collector frees a subscriber: the RLock
        # makes that safe even inside one of this object's own methods (which
        # may then write back some dead references, or find a topic gone).
        # Dropping only dead references, it never changes whom a publish calls.
        with self._lock:
            self._dead += 1
            if self._dead < max(_MIN_DEAD_BEFORE_PRUNE, self._size // 2):
                return
            self._dead = 0
            self._size = 0
            for topic, refs in self._subs.copy().items():
                alive = tuple(r for r in refs if r() is not None)
                self._size += len(alive)
                if not alive:
                    self._subs.pop(topic, None)
                elif len(alive) < len(refs):
                    self._subs[topic] = alive
            self._after_change(None)

    def _after_change(self, topic: Optional[Tuple[str, ...]]) -> None:
        """Retire the routes computed before a change of the table (lock held)."""
        routes = _Routes(self._subs)
        self._routes.successor = routes  # retired before its successor shows: see _route
        self._routes = routes
        self._subscriptions_changed(topic)

    # --- for subclasses ----------------------------------------------------------

    def _subscriptions_changed(self, topic: Optional[Tuple[str, ...]]) -> None:
        """Called, with the lock held, after the subscribers of *topic* changed.

        That is: *topic* gained its first subscriber, lost its last one, or
        merely changed them. *topic* is None after a change that may touch
        any number of topics (``clear_subscribers``, pruning of subscribers
        that died). Does nothing here.
        """

    def _subscribed_topics(self) -> List[Tuple[str, ...]]:
        """The topics that have subscribers now, for a full resync: O(topics), takes no lock.

        A subscriber that died still counts until its topic is next pruned.
        """
        return list(self._subs)  # one C call: no other thread changes the table meanwhile

    def _has_subscribers(self, topic: Tuple[str, ...]) -> bool:
        """Whether *topic* itself (not its parents) has subscribers now: O(1)."""
        return topic in self._subs


def _is_signature_mismatch(
    subscriber: Subscriber, exc: Exception, topic: Tuple[str, ...], message: Dict[str, Any]
) -> bool:
    """Tell a call that could not bind its arguments from a TypeError raised inside."""
    if not isinstance(exc, TypeError):
        return False
    if exc.__traceback__ is None or exc.__traceback__.tb_next is None:
        return True  # raised by the call itself, before any subscriber code ran
    import inspect  # noqa: PLC0415  (only on this rare path)

    try:
        inspect.signature(subscriber).bind(topic, **message)
    except TypeError:
        return True  # a wrapper (a decorator's *args, **kwargs) passed on a bad call
    except ValueError:
        return False  # no signature to check: trust the traceback
    return False


def _log_error(topic: Tuple[str, ...], subscriber: Subscriber, exc: Exception) -> None:
    logger.error("subscriber %r raised on topic %r", subscriber, topic, exc_info=exc)
