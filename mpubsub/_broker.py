"""The broker: one thread, one selectors loop, routing frames it never unpickles."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import _protocol as proto
from ._accounts import (
    DEFAULT_MAX_BUFFER_PER_USER,
    DEFAULT_MAX_CONNECTIONS_PER_USER,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_USER,
    Accounts,
    Quotas,
)
from ._clients import Clients, Settings
from ._credentials import family_of
from ._exchange import Exchange
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT
from ._identity import identify
from ._policy import Policy
from ._routing import DEFAULT_CACHE_BYTES
from ._session import Session
from ._sockets import raise_file_limit, remove_stale_socket, warn_if_exposed
from ._stats import BrokerStatistics, Counters, Throttle

logger = logging.getLogger("mpubsub.broker")

_ACCEPT_PAUSE = 0.5
DEFAULT_MAX_BUFFER = 32 * 1024 * 1024
DEFAULT_MAX_SUBSCRIPTIONS = proto.DEFAULT_MAX_SUBSCRIPTIONS  # per client
DEFAULT_MAX_SUBSCRIPTION_BYTES = proto.DEFAULT_MAX_SUBSCRIPTION_BYTES  # its topics, encoded
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_HANDSHAKES = 64  # connections still authenticating, in all
DEFAULT_MAX_HANDSHAKES_PER_PEER = 8  # the same, from one IP address (TCP) or user (Unix)
DEFAULT_MAX_INPUT_BUFFER = 64 * 1024 * 1024  # unfinished frames, all clients together
DEFAULT_ROUTE_CACHE_BYTES = DEFAULT_CACHE_BYTES

#: The caps on what peers can make the broker hold, beyond max_message_size
#: and max_buffer: name -> (default, what it bounds). The names are Broker's
#: keyword arguments, ``python -m mpubsub.broker``'s options (with dashes)
#: and ``mpubsubd.conf``'s keys alike.
CAPS: Dict[str, Tuple[int, str]] = {
    "max_topic_depth": (proto.DEFAULT_MAX_TOPIC_DEPTH, "elements of a topic"),
    "max_topic_size": (proto.DEFAULT_MAX_TOPIC_SIZE, "bytes of a topic, encoded"),
    "max_subscriptions": (DEFAULT_MAX_SUBSCRIPTIONS, "subscriptions of one client"),
    "max_subscription_bytes": (
        DEFAULT_MAX_SUBSCRIPTION_BYTES,
        "bytes of the topics one client subscribes to",
    ),
    "max_connections": (DEFAULT_MAX_CONNECTIONS, "connections (at most the open file limit)"),
    "max_handshakes": (DEFAULT_MAX_HANDSHAKES, "connections still authenticating"),
    "max_handshakes_per_peer": (
        DEFAULT_MAX_HANDSHAKES_PER_PEER,
        "connections still authenticating from one IP address (TCP) or user (Unix socket)",
    ),
    "max_input_buffer": (DEFAULT_MAX_INPUT_BUFFER, "bytes of unfinished frames, all clients"),
    "route_cache_bytes": (DEFAULT_ROUTE_CACHE_BYTES, "bytes of cached routes"),
    "max_connections_per_user": (
        DEFAULT_MAX_CONNECTIONS_PER_USER,
        "connections of one user (Unix socket) or IP address (TCP)",
    ),
    "max_subscriptions_per_user": (
        DEFAULT_MAX_SUBSCRIPTIONS_PER_USER,
        "subscriptions of one user's connections together",
    ),
    "max_buffer_per_user": (
        DEFAULT_MAX_BUFFER_PER_USER,
        "bytes waiting for one user's connections together (past it, its slowest is cut)",
    ),
}
_MAX_CAP = 2**32 - 1  # what WELCOME can announce
#: What ``Broker.reconfigure`` may change while it serves: the settings
#: no client is told of. The others are announced in WELCOME and hold for
#: the life of the broker.
LIVE_SETTINGS = (
    "timeout",
    "max_buffer",
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_peer",
    "max_input_buffer",
    "route_cache_bytes",
    "max_connections_per_user",
    "max_subscriptions_per_user",
    "max_buffer_per_user",
    "policy",
)
# Descriptors kept free of clients: the listener, the wake-up pair, the log...
_SPARE_FILES = 16
# Errors accept() passes on from a connection that failed before we took it.
_ACCEPT_TRANSIENT = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class Broker:
    """Forwards each message to the connected pub-subs subscribed to its topic.

    *address* and *authkey* follow ``multiprocessing.connection``: a path is
    a Unix socket, ``(host, port)`` a TCP address (port 0 picks a free one),
    ``None`` a fresh Unix socket in a private temporary directory; a ``None``
    authkey is ``multiprocessing.current_process().authkey``. The socket is
    bound here, so ``address`` is known before ``start()``.

    Guarantees: a peer must complete the multiprocessing handshake within
    *timeout* seconds (the handshake's timeout: 0.0.1's name for it),
    without delaying anyone; a message is sent only to clients subscribed
    to its topic (or a prefix of it), never back to its sender, in the
    order the sender published; a client whose unsent messages exceed
    *max_buffer* bytes is disconnected with a WARNING;
    anything malformed closes that one connection with a WARNING. Whatever
    goes wrong while serving one connection (its OS errors, or a bug of
    ours: logged at ERROR with the traceback) closes that connection only.

    Every resource a peer can make the broker hold is capped, and hitting a
    cap is logged: *max_connections* connections (lowered to fit the
    descriptor limit), of which *max_handshakes* still authenticating (the
    oldest is closed to make room for a new one), *max_handshakes_per_peer*
    from one peer (an IP address on TCP, a user, as the kernel says, on a
    Unix socket; its own oldest makes room); topics of
    at most *max_topic_depth* elements and *max_topic_size* encoded bytes;
    per client, *max_subscriptions* subscriptions whose topics add up to
    *max_subscription_bytes*; *max_input_buffer* bytes of unfinished frames
    over all clients; *route_cache_bytes* of cached routes. A client that
    goes past a cap of its own is disconnected with a WARNING.

    With a *bridge_key*, the one client whose BRIDGE frame holds that key
    (mpubsubd's federation bridge) gets every message the others publish and
    the topics they subscribe to; any other BRIDGE closes its connection
    with a WARNING. What waits for the bridge is bounded like any client's
    buffer: changes of interest are merged per topic (a topic subscribed and
    unsubscribed again before the bridge read it costs nothing), and when
    messages fill *max_buffer* the newest are dropped for other hosts,
    counted and logged, not the bridge.
    """

    def __init__(
        self,
        address: Any = None,
        authkey: Optional[bytes] = None,
        backlog: int = 1024,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        *,
        max_message_size: int = proto.DEFAULT_MAX_MESSAGE,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_topic_depth: int = proto.DEFAULT_MAX_TOPIC_DEPTH,
        max_topic_size: int = proto.DEFAULT_MAX_TOPIC_SIZE,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_subscription_bytes: int = DEFAULT_MAX_SUBSCRIPTION_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        max_handshakes_per_peer: int = DEFAULT_MAX_HANDSHAKES_PER_PEER,
        max_input_buffer: int = DEFAULT_MAX_INPUT_BUFFER,
        route_cache_bytes: int = DEFAULT_ROUTE_CACHE_BYTES,
        max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER,
        max_subscriptions_per_user: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_USER,
        max_buffer_per_user: int = DEFAULT_MAX_BUFFER_PER_USER,
        policy: Optional[Policy] = None,
        bridge_key: Optional[bytes] = None,
    ) -> None:
        if max_topic_size > max_message_size:
            raise ValueError("max_topic_size must be at most max_message_size")
        for name, value in (
            ("max_topic_depth", max_topic_depth),
            ("max_topic_size", max_topic_size),
            ("max_subscriptions", max_subscriptions),
            ("max_subscription_bytes", max_subscription_bytes),
        ):
            if not 1 <= value <= _MAX_CAP:
                raise ValueError(f"{name} must be at least 1 and at most {_MAX_CAP}")
        if bridge_key is not None and len(bridge_key) < 16:
            raise ValueError("bridge_key must be at least 16 bytes")
        live: Dict[str, Any] = dict(
            timeout=timeout,
            max_buffer=max_buffer,
            max_connections=max_connections,
            max_handshakes=max_handshakes,
            max_handshakes_per_peer=max_handshakes_per_peer,
            max_input_buffer=max_input_buffer,
            route_cache_bytes=route_cache_bytes,
            max_connections_per_user=max_connections_per_user,
            max_subscriptions_per_user=max_subscriptions_per_user,
            max_buffer_per_user=max_buffer_per_user,
            policy=policy if policy is not None else Policy(),
        )
        _check_live(live, max_message_size)
        authkey = authkey if authkey is not None else multiprocessing.current_process().authkey
        self._limits = proto.Limits(
            max_message_size,
            max_topic_depth,
            max_topic_size,
            max_subscriptions,
            max_subscription_bytes,
        )
        self._tmpdir: Optional[str] = None
        self._listener = self._listen(address, backlog)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = False
        self._throttles: Dict[str, Throttle] = collections.defaultdict(lambda: Throttle(logger))
        self._stats = Counters()
        self._exchange = Exchange(
            self._limits,
            route_cache_bytes=route_cache_bytes,
            bridge_key=bridge_key,
            stats=self._stats,
            throttles=self._throttles,
            statistics=self.statistics,
            policy=live["policy"],
            accounts=Accounts(Quotas()),
            clients=self._active,
        )
        self._live = live
        self._files = 0  # the open file limit, once start() raised it
        self._clients = Clients(
            self._settings(authkey), self._exchange, self._stats, self._throttles
        )
        self._scheduled: Deque[Callable[[], None]] = collections.deque()
        self._accept_again = 0.0  # when accepting resumes after running out of descriptors
        self._selector: Optional[selectors.BaseSelector] = None

    def _active(self) -> List[Session]:
        return self._clients.active()

    def _settings(self, authkey: bytes) -> Settings:
        live = self._live
        max_connections = live["max_connections"]
        if self._files and max_connections > self._files - _SPARE_FILES:
            max_connections = max(1, self._files - _SPARE_FILES)
            logger.warning(
                "max_connections lowered to %d to fit the open file limit of %d",
                max_connections,
                self._files,
            )
        return Settings(
            authkey=authkey,
            limits=self._limits,
            handshake_timeout=live["timeout"],
            max_buffer=live["max_buffer"],
            max_connections=max_connections,
            # Room for one whole largest frame, header included, however it arrives.
            max_input=live["max_input_buffer"] + proto.HEADER.size,
            max_handshakes=live["max_handshakes"],
            max_handshakes_per_peer=live["max_handshakes_per_peer"],
            quotas=Quotas(
                live["max_connections_per_user"],
                live["max_subscriptions_per_user"],
                live["max_buffer_per_user"],
            ),
        )

    def reconfigure(self, **changes: Any) -> None:
        """Change settings while serving: those of ``LIVE_SETTINGS``, by keyword.

        Call it from the broker's loop (through ``schedule()``) or before
        ``start()``. New values hold for what comes next: a connection
        already past a lowered cap is not cut for it. ValueError (and
        nothing changed) for a value the constructor would refuse.
        """
        unknown = sorted(set(changes) - set(LIVE_SETTINGS))
        if unknown:
            raise TypeError(f"not a setting that can change while serving: {', '.join(unknown)}")
        live = {**self._live, **changes}
        _check_live(live, self._limits.max_message)
        self._live = live
        self._clients.apply(self._settings(self._clients.settings.authkey))
        self._exchange.set_cache_bytes(live["route_cache_bytes"])
        if live["policy"] != self._exchange.policy:
            self._exchange.set_policy(live["policy"])

    @property
    def address(self) -> Any:
        """The address clients connect to (with the actual port for port 0)."""
        address = self._listener.getsockname()
        if self._listener.family == socket.AF_UNIX:
            return address if isinstance(address, str) else address.decode()
        return tuple(address[:2])

    def _listen(self, address: Any, backlog: int) -> socket.socket:
        if address is None:
            self._tmpdir = tempfile.mkdtemp(prefix="mpubsub-")
            address = os.path.join(self._tmpdir, "broker.sock")
        family = family_of(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_UNIX:
                remove_stale_socket(address)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                warn_if_exposed(address[0])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._remove_tmpdir()
            raise
        return sock

    def close(self) -> None:
        """Stop listening and remove the socket file, without serving (idempotent)."""
        if self._listener.fileno() >= 0:
            self._close_all()

    def open_pair(self) -> socket.socket:
        """A new connection to this broker that needs no address: one end of a socket
        pair, whose other end the broker takes as a client (it must authenticate like any
        other). For a process that may not open the broker's socket file: mpubsubd's
        federation bridge, once mpubsubd serves as its own user. Safe from any thread."""
        ours, theirs = socket.socketpair()
        self.schedule(lambda: self._clients.admit(ours, lambda: identify(ours, "pair")))
        return theirs

    def schedule(self, callback: Callable[[], None]) -> None:
        """Run *callback* in the broker's loop soon; safe from a signal handler or a thread."""
        self._scheduled.append(callback)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Make ``start()`` return soon; safe from a signal handler or another thread."""
        self._stopping = self._clients.stopping = True
        with contextlib.suppress(OSError):  # already woken, or closed
            self._wake_w.send(b"x")

    def start(self, *, handle_signals: bool = False) -> None:
        """Serve until ``stop()``, then close everything.

        With *handle_signals* (in the main thread only), SIGINT and SIGTERM
        stop it too, and their handlers are restored after. Without, the
        program's own handlers stay: a KeyboardInterrupt ends ``start()``
        with everything closed.
        """
        handlers = self._catch_signals() if handle_signals else {}
        self._files = raise_file_limit()
        self._clients.apply(self._settings(self._clients.settings.authkey))
        self._selector = self._clients.selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        logger.info("broker listening on %s", self.address)
        if self._exchange.policy.rules or not self._exchange.policy.default:
            logger.info("access policy: %s", self._exchange.policy.describe())
        try:
            self._serve()
        finally:
            self._close_all()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            logger.info("broker stopped")

    def _catch_signals(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("handle_signals=True needs the main thread")

        def handler(signum: int, frame: object) -> None:
            self.stop()

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _serve(self) -> None:
        assert self._selector is not None
        select = self._selector.select
        next_expiry = time.monotonic() + 1.0
        while not self._stopping:
            clients = self._clients
            ready = select(0 if clients.backlogged else 0.5)
            clients.share_round(
                len(clients.backlogged)
                + sum(1 for key, events in ready if events & selectors.EVENT_READ and key.data)
            )
            for key, events in ready:
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake_r:
                    self._wake_r.recv(64)
                    self._run_scheduled()
                else:
                    clients.serve(key.data, events)
            if clients.backlogged:
                clients.work_backlogs()
            if self._exchange.dirty:
                clients.flush_dirty()
            now = time.monotonic()
            if self._accept_again and now >= self._accept_again:
                self._accept_again = 0.0
                self._selector.register(self._listener, selectors.EVENT_READ)
            if now >= next_expiry:
                self._stats.tick(now, self._stats.totals(clients.active())[0])
                clients.expire_handshakes(now)
                next_expiry = now + 0.5

    def _run_scheduled(self) -> None:
        while self._scheduled:
            callback = self._scheduled.popleft()
            try:
                callback()
            except Exception:
                logger.exception("a scheduled callback (%r) failed", callback)

    # --- connections --------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    return
                if exc.errno not in _ACCEPT_TRANSIENT:
                    self._throttles["accept"].warning("accept failed: %s", exc)
                continue  # that connection failed before we took it; the next may not
            self._clients.admit(sock, functools.partial(identify, sock, "unix"))

    def _pause_accepting(self, exc: OSError) -> None:
        # Out of descriptors: stop accepting for a moment (the backlog
        # waits, then overflows) and keep serving the connected ones.
        logger.error("refusing new connections for %.1f s: %s", _ACCEPT_PAUSE, exc.strerror)
        self._stats.refused += 1
        assert self._selector is not None
        self._selector.unregister(self._listener)
        self._accept_again = time.monotonic() + _ACCEPT_PAUSE

    # --- input ---------------------------------------------------------------

    def statistics(self) -> BrokerStatistics:
        """A snapshot of the broker's figures (call it from the broker's own thread)."""
        active = self._clients.active()
        stats = self._stats
        messages_in, bytes_in, messages_out, bytes_out = stats.totals(active)
        return BrokerStatistics(
            uptime=time.monotonic() - stats.started,
            clients=len(active)
            - (self._exchange.bridge is not None),  # the bridge is in federation
            subscriptions=sum(len(c.subs) for c in active),
            messages_in=messages_in,
            bytes_in=bytes_in,
            messages_out=messages_out,
            bytes_out=bytes_out,
            messages_per_second=stats.rate,
            slow_consumers=stats.slow_consumers,
            refused=stats.refused,
            largest_buffer=max((c.held for c in active), default=0),
            federation=self._exchange.federation_figures(),
            denied=stats.denied,
        )

    # --- routing and output ------------------------------------------------

    def _close_all(self) -> None:
        self._clients.close_all()
        if self._selector is not None:
            self._selector.close()
        path = self.address if self._listener.family == socket.AF_UNIX else None
        self._listener.close()
        if path and not path.startswith("\0"):
            # PermissionError: a process that bound as root, then became another user
            # (mpubsubd), leaves the file to whoever still may remove it.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(path)
        self._remove_tmpdir()
        self._wake_r.close()
        self._wake_w.close()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def _check_live(live: Dict[str, Any], max_message_size: int) -> None:
    """ValueError if a setting of ``LIVE_SETTINGS`` in *live* is out of bounds."""
    if live["max_buffer"] < max_message_size:
        raise ValueError("max_buffer must be at least max_message_size")
    if live["max_input_buffer"] < max_message_size:
        raise ValueError("max_input_buffer must be at least max_message_size")
    for name in (
        "max_connections",
        "max_handshakes",
        "max_handshakes_per_peer",
        "max_connections_per_user",
        "max_subscriptions_per_user",
    ):
        if not 1 <= live[name] <= _MAX_CAP:
            raise ValueError(f"{name} must be at least 1 and at most {_MAX_CAP}")
    if live["max_buffer_per_user"] < live["max_buffer"]:
        raise ValueError("max_buffer_per_user must be at least max_buffer")
    if not isinstance(live["policy"], Policy):
        raise TypeError("policy must be a Policy")
    if live["route_cache_bytes"] < 0:
        raise ValueError("route_cache_bytes must not be negative")
    if live["timeout"] <= 0:
        raise ValueError("timeout must be positive")
