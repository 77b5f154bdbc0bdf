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
    """Published topic -> subscriptions to call, computed from one table.

    The table (``subs``) and the routes derived from it live and die together:
    every change makes a new ``_Routes``, so a publish never locks and never
    sees a route that disagrees with its table.
    """

    __slots__ = ("subs",)

    def __init__(self, subs: _Subs) -> None:
        super().__init__(self._route)
        self.subs = subs

    def _route(self, topic: Tuple[str, ...]) -> Tuple[_Ref, ...]:
        subs = self.subs
        if not topic:  # broadcast: every subscription, the catch-all ones last
            return tuple(r for t, refs in subs.items() if t for r in refs) + subs.get((), ())
        route: Tuple[_Ref, ...] = ()
        prefix = topic
        while prefix:
            route += subs.get(prefix, ())
            prefix = prefix[:-1]
        return route + subs.get((), ())


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
    subscriber. A publish calls the subscribers registered when it started;
    it takes no lock. Pub-subs share no state with each other.
    """

    def __init__(self, *, on_error: Optional[ErrorHandler] = None) -> None:
        """Make an empty pub-sub; *on_error* replaces the default error handler."""
        self.on_error: ErrorHandler = on_error or _log_error
        self._routes = _Routes({})
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
            subs = self._routes.subs
            refs = list(subs.get(topic, ()))
            found = [i for i, r in enumerate(refs) if r() == subscriber]
            if found and weak:
                return
            if found:
                refs[found[0]] = ref
            else:
                refs.append(ref)
                self._size += 1
            self._commit({**subs, topic: tuple(refs)})

    def remove_subscriber(self, topic: Topic, subscriber: Subscriber) -> None:
        """Stop calling *subscriber* for *topic*; nothing happens if it was not subscribed."""
        topic = as_topic(topic)
        with self._lock:
            subs = self._routes.subs
            refs = subs.get(topic, ())
            kept = tuple(r for r in refs if r() != subscriber)
            if len(kept) == len(refs):
                return
            self._size -= len(refs) - len(kept)
            subs = dict(subs)
            if kept:
                subs[topic] = kept
            else:
                del subs[topic]
            self._commit(subs)

    def clear_subscribers(self) -> None:
        """Remove every subscriber of every topic."""
        with self._lock:
            self._size = self._dead = 0
            self._commit({})

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
        # makes that safe even inside one of this object's own methods.
        with self._lock:
            self._dead += 1
            if self._dead >= max(_MIN_DEAD_BEFORE_PRUNE, self._size // 2):
                alive = {
                    t: tuple(r for r in refs if r() is not None)
                    for t, refs in self._routes.subs.items()
                }
                alive = {t: refs for t, refs in alive.items() if refs}
                self._size = sum(map(len, alive.values()))
                self._dead = 0
                self._commit(alive)

    def _commit(self, subs: _Subs) -> None:
        """Install a new subscription table (called with the lock held)."""
        self._routes = _Routes(subs)


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
