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
from ._topics import as_topic
from ._types import Subscriber, Topic

__all__ = ["ErrorHandler", "PubSub", "as_topic"]

logger = logging.getLogger("mpubsub")

#: Called as ``handler(topic, subscriber, exception)`` when a subscriber raises.
ErrorHandler = Callable[[Tuple[str, ...], Subscriber, Exception], None]

# A subscription is held as a zero-argument callable returning the subscriber,
# or None once it has died: a weak reference, or (for weak=False) the C-level
# ``repeat(fn).__next__``, which costs no Python frame on the publish path.
_Ref = Callable[[], Optional[Subscriber]]
# A topic's subscriptions, in subscription order, each under a hash of its
# subscriber (see _key): an int, so that it keeps no subscriber alive, and so
# that finding an equal subscriber (a bound method is a new object on each
# access) takes one lookup. A subscriber whose key another live one holds
# goes under a token of its own instead (see PubSub._collided).
_Held = Dict[object, _Ref]
_Subs = Dict[Tuple[str, ...], _Held]

_UNHASHABLE = object()  # the key of every subscriber that has no hash
_BOUND = (types.MethodType, types.BuiltinMethodType, types.MethodWrapperType)

# Dead weak references tolerated before the table is pruned (amortised O(1)).
_MIN_DEAD_BEFORE_PRUNE = 16


class _Routes(Memo[Tuple[str, ...], Tuple[_Ref, ...]]):
    """Published topic -> subscriptions to call, computed from the live table.

    The table (``subs``, one per PubSub) and each topic's subscriptions in
    it change in place, one atomic dict operation per change (removing a
    topic's last subscriber empties it, then drops it; pruning makes many,
    but drops only dead references), and a route reads each topic it needs
    once. Once a route has been computed from this memo (``used``), a change
    replaces it by an empty one on the same table, which the old one names
    as its ``successor``. So a route computed while a change lands is only
    ever kept by the old memo, which no publish that starts after the change
    reads; and a computation during which a change landed runs again, so a
    route never mixes two states of the table. A memo that nothing has been
    computed from yet stays: all that will be starts after the change.
    """

    __slots__ = ("subs", "successor", "used")

    def __init__(self, subs: _Subs) -> None:
        super().__init__(self._route, weigh=_weigh)
        self.subs = subs
        self.successor: Optional[_Routes] = None
        self.used = False

    def _route(self, topic: Tuple[str, ...]) -> Tuple[_Ref, ...]:
        routes = self
        route = routes._read(topic)
        while routes.successor is not None:  # its reads may straddle a change
            routes = routes.successor
            route = routes._read(topic)
        return route

    def _read(self, topic: Tuple[str, ...]) -> Tuple[_Ref, ...]:
        self.used = True  # before any read: from now on, a change retires this memo
        subs = self.subs
        if not topic:  # broadcast: every subscription, the catch-all ones last
            subs = subs.copy()
            catch_all = _snapshot(subs.pop((), None))
            return tuple(itertools.chain.from_iterable(map(_snapshot, subs.values()))) + catch_all
        route: Tuple[_Ref, ...] = ()
        prefix = topic
        while True:  # the topic, its parents, then ()
            held = subs.get(prefix)
            if held:
                route += _snapshot(held)
            if not prefix:
                return route
            prefix = prefix[:-1]


def _snapshot(held: Optional[_Held]) -> Tuple[_Ref, ...]:
    """*held*'s references, in order, as they stood at one moment.

    dict.copy reads them in C allocating nothing that could start the garbage
    collector, whose weakref callbacks run Python code (and let other
    threads in): nothing can change *held* meanwhile. ``tuple(held.values())``
    allocates once it has started, and would raise if *held* changed then.
    """
    return tuple(held.copy().values()) if held else ()


def _key(subscriber: Subscriber) -> object:
    """What *subscriber* is held under, unless another live one holds that already.

    Equal subscribers have equal keys. A bound method hashes as its
    object's address XOR its function's hash, a value that the methods of
    objects laid out side by side often share; mixed with the object's
    address once more, its key differs from theirs as any two hashes do.
    """
    try:
        if isinstance(subscriber, _BOUND):
            return hash((id(subscriber.__self__), subscriber))
        return hash(subscriber)
    except TypeError:
        return _UNHASHABLE


def _weigh(topic: Tuple[str, ...], route: Tuple[_Ref, ...]) -> int:
    """What a cached route holds, roughly, in bytes: its topic's strings and the tuples."""
    return 120 + 8 * len(route) + sum(len(element) + 60 for element in topic)


class PubSub:
    """A publish-subscribe object for publishers and subscribers in one process.

    Publishing ``('foo', 'bar')`` calls the ``('foo', 'bar')`` subscribers,
    then the ``('foo',)`` ones, then the catch-all ones, each group in
    subscription order, as ``subscriber(('foo', 'bar'), **message)``.
    Publishing ``()`` or ``None`` (broadcast) calls every subscriber.
    Adding or removing a subscriber takes constant time on average, however
    many topics and subscribers there are.

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
        # topic -> the tokens its subscriptions hold, for the subscribers whose
        # hash another one held when they came: rare, so searched in turn.
        self._collided: Dict[Tuple[str, ...], List[object]] = {}
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
        key = _key(subscriber)
        with self._lock:
            held = self._subs.get(topic)
            if held is None:
                self._subs[topic] = {key: ref}
                self._size += 1
            else:
                found = self._find(topic, held, key, subscriber)
                if found is None:
                    self._append(topic, held, key, ref)
                elif weak or not isinstance(held[found], weakref.ref):
                    return  # held already, and at least as strongly
                else:
                    held[found] = ref  # in its place
                self._subs[topic] = held  # again if pruning dropped it meanwhile: see _note_dead
            self._after_change(topic)

    def remove_subscriber(self, topic: Topic, subscriber: Subscriber) -> None:
        """Stop calling *subscriber* for *topic*; nothing happens if it was not subscribed."""
        topic = as_topic(topic)
        key = _key(subscriber)
        with self._lock:
            held = self._subs.get(topic)
            found = None if held is None else self._find(topic, held, key, subscriber)
            if held is None or found is None:
                return
            self._forget(topic, held, found)
            self._after_change(topic)

    def clear_subscribers(self) -> None:
        """Remove every subscriber of every topic."""
        with self._lock:
            self._subs.clear()
            self._collided.clear()
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
            self._handle_failures(topic, message, failures)

    def _handle_failures(
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

    # --- one topic's subscriptions, with the lock held ----------------------------

    def _find(
        self, topic: Tuple[str, ...], held: _Held, key: object, subscriber: Subscriber
    ) -> Optional[object]:
        """The key of the subscription of *topic* equal to *subscriber*, if there is one."""
        ref = held.get(key)
        if ref is not None and ref() == subscriber:
            return key
        for token in tuple(self._collided.get(topic, ())):  # a copy: == may run a pruning
            ref = held.get(token)
            if ref is not None and ref() == subscriber:
                return token
        return None

    def _append(self, topic: Tuple[str, ...], held: _Held, key: object, ref: _Ref) -> None:
        """Hold *ref* under *key*, or a token if another live subscriber holds that, last."""
        taken = held.get(key)
        if taken is None:
            self._size += 1
        elif taken() is None:  # a dead subscriber's: free, but the new one goes last
            del held[key]
        else:  # another subscriber's, of the same hash
            key = object()
            self._collided.setdefault(topic, []).append(key)
            self._size += 1
        held[key] = ref

    def _forget(self, topic: Tuple[str, ...], held: _Held, key: object) -> None:
        """Drop the subscription under *key*, and *topic* with its last one."""
        del held[key]
        self._size -= 1
        tokens = self._collided.get(topic)
        if tokens is not None and key in tokens:
            tokens.remove(key)
            if not tokens:
                del self._collided[topic]
        if not held:
            self._subs.pop(topic, None)  # not del: see _note_dead

    def _note_dead(self) -> None:
        # Runs wherever the garbage collector frees a subscriber: the RLock
        # makes that safe even inside one of this object's own methods (which
        # may then find a topic gone: add_subscriber puts it back).
        # Dropping only dead references, it never changes whom a publish calls.
        with self._lock:
            self._dead += 1
            if self._dead < max(_MIN_DEAD_BEFORE_PRUNE, self._size // 2):
                return
            self._dead = 0
            for topic, held in self._subs.copy().items():
                for key, ref in held.copy().items():
                    if ref() is None and key in held:  # not if an inner pruning took it
                        self._forget(topic, held, key)
            self._after_change(None)

    def _after_change(self, topic: Optional[Tuple[str, ...]]) -> None:
        """Retire the routes computed before a change of the table (lock held)."""
        if self._routes.used:  # else it stays: see _Routes
            routes = _Routes(self._subs)
            retired = self._routes
            retired.successor = routes  # before its successor shows: see _route
            self._routes = routes
            retired.clear()  # frees now what only its routes held (the memo is in a cycle)
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

    def _has_any_subscribers(self) -> bool:
        """Whether any topic has subscribers now: O(1)."""
        return bool(self._subs)

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
