"""The broker: one thread, one selectors loop, routing frames it never unpickles."""

from __future__ import annotations

import collections
import contextlib
import errno
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
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from . import _protocol as proto
from ._admission import Eviction, Handshakes
from ._credentials import family_of
from ._exchange import Exchange
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, ServerHandshake
from ._routing import DEFAULT_CACHE_BYTES
from ._session import Session
from ._sockets import peer_of, raise_file_limit, remove_stale_socket, warn_if_exposed
from ._stats import BrokerStatistics, Counters, Throttle
from .errors import AuthenticationError, ProtocolError

logger = logging.getLogger("mpubsub.broker")

_RECV_SIZE = 64 * 1024
# Bytes read per round, shared among the clients with input as the work is
# (each reads at least _MIN_RECV): decoding what 200 clients sent at once,
# 64 KiB each of tiny frames, held the loop for a second before any budget.
_RECV_PER_ROUND = 1024 * 1024
_MIN_RECV = 4096
_SEND_CHUNK = 256 * 1024
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
}
_MAX_CAP = 2**32 - 1  # what WELCOME can announce
# Deliveries, frames and routing work (see Router.work) that the clients'
# input may cost per round of the loop, shared among the clients with input
# (each gets at least _MIN_WORK); what is over waits for the next rounds,
# and its client is not read meanwhile: clients fanning tiny messages out
# to many subscribers, or publishing to ever new deep topics, cannot keep
# the loop from everyone else for long.
_WORK_PER_ROUND = 50_000
_MIN_WORK = 200
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
_PONG = proto.frame(proto.PONG, b"")


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
        bridge_key: Optional[bytes] = None,
    ) -> None:
        if max_buffer < max_message_size:
            raise ValueError("max_buffer must be at least max_message_size")
        if max_input_buffer < max_message_size:
            raise ValueError("max_input_buffer must be at least max_message_size")
        if max_topic_size > max_message_size:
            raise ValueError("max_topic_size must be at most max_message_size")
        for name, value in (
            ("max_topic_depth", max_topic_depth),
            ("max_topic_size", max_topic_size),
            ("max_subscriptions", max_subscriptions),
            ("max_subscription_bytes", max_subscription_bytes),
            ("max_connections", max_connections),
            ("max_handshakes", max_handshakes),
            ("max_handshakes_per_peer", max_handshakes_per_peer),
        ):
            if not 1 <= value <= _MAX_CAP:
                raise ValueError(f"{name} must be at least 1 and at most {_MAX_CAP}")
        if route_cache_bytes < 0:
            raise ValueError("route_cache_bytes must not be negative")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if bridge_key is not None and len(bridge_key) < 16:
            raise ValueError("bridge_key must be at least 16 bytes")
        self._authkey = (
            authkey if authkey is not None else multiprocessing.current_process().authkey
        )
        self._handshake_timeout = timeout
        self._max_message = max_message_size
        self._max_buffer = max_buffer
        self._limits = proto.Limits(
            max_message_size,
            max_topic_depth,
            max_topic_size,
            max_subscriptions,
            max_subscription_bytes,
        )
        self._max_connections = max_connections
        # Room for one whole largest frame, header included, however it arrives.
        self._max_input = max_input_buffer + proto.HEADER.size
        self._tmpdir: Optional[str] = None
        self._listener = self._listen(address, backlog)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = False
        self._clients: Dict[int, Session] = {}
        self._handshakes: Handshakes[Session] = Handshakes(max_handshakes, max_handshakes_per_peer)
        self._input = 0  # unfinished input, all clients together
        self._backlogged: Set[Session] = set()  # frames read and not yet handled
        # What one client's input may cost this round, and what may be read of it.
        self._budget, self._recv_size = _WORK_PER_ROUND, _RECV_SIZE
        self._throttles: Dict[str, Throttle] = collections.defaultdict(lambda: Throttle(logger))
        self._count = 0
        self._stats = Counters()
        self._exchange = Exchange(
            self._limits,
            route_cache_bytes=route_cache_bytes,
            bridge_key=bridge_key,
            stats=self._stats,
            throttles=self._throttles,
            statistics=self.statistics,
        )
        self._scheduled: Deque[Callable[[], None]] = collections.deque()
        self._accept_again = 0.0  # when accepting resumes after running out of descriptors
        self._selector: Optional[selectors.BaseSelector] = None

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

    def schedule(self, callback: Callable[[], None]) -> None:
        """Run *callback* in the broker's loop soon; safe from a signal handler or a thread."""
        self._scheduled.append(callback)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Make ``start()`` return soon; safe from a signal handler or another thread."""
        self._stopping = True
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
        files = raise_file_limit()
        if self._max_connections > files - _SPARE_FILES:
            self._max_connections = max(1, files - _SPARE_FILES)
            logger.warning(
                "max_connections lowered to %d to fit the open file limit of %d",
                self._max_connections,
                files,
            )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        logger.info("broker listening on %s", self.address)
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
            ready = select(0 if self._backlogged else 0.5)
            inputs = len(self._backlogged) + sum(
                1 for key, events in ready if events & selectors.EVENT_READ and key.data
            )
            self._budget = max(_MIN_WORK, _WORK_PER_ROUND // max(1, inputs))
            self._recv_size = max(_MIN_RECV, min(_RECV_SIZE, _RECV_PER_ROUND // max(1, inputs)))
            for key, events in ready:
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake_r:
                    self._wake_r.recv(64)
                    self._run_scheduled()
                else:
                    self._serve_client(key.data, events)
            if self._backlogged:
                self._work_backlogs()
            if self._exchange.dirty:
                self._flush_dirty()
            now = time.monotonic()
            if self._accept_again and now >= self._accept_again:
                self._accept_again = 0.0
                self._selector.register(self._listener, selectors.EVENT_READ)
            if now >= next_expiry:
                self._stats.tick(now)
                self._expire_handshakes(now)
                next_expiry = now + 0.5

    def _work_backlogs(self) -> None:
        backlogged, self._backlogged = self._backlogged, set()
        for client in backlogged:
            frames, client.backlog = client.backlog, []
            if client.sock.fileno() < 0:
                continue  # dropped meanwhile
            with self._boundary(client):
                self._handle_guarded(client, frames)

    def _run_scheduled(self) -> None:
        while self._scheduled:
            callback = self._scheduled.popleft()
            try:
                callback()
            except Exception:
                logger.exception("a scheduled callback (%r) failed", callback)

    def _serve_client(self, client: Session, events: int) -> None:
        """Read from and write to one client: its trouble ends its connection only."""
        with self._boundary(client):
            if events & selectors.EVENT_READ and client.sock.fileno() >= 0:
                self._read(client)
            if events & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                self._write(client)

    @contextlib.contextmanager
    def _boundary(self, client: Session) -> Iterator[None]:
        """Where one connection's failures are turned into closing it, with one log line."""
        try:
            yield
        except OSError as exc:  # the peer went away under us
            self._drop(client, logging.INFO, f"connection failed: {exc.strerror or exc}")
        except Exception:
            logger.exception("internal error while serving %s; closing it", client.name)
            self._drop(client, logging.ERROR, "internal error (see above)")

    # --- connections --------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    return
                if exc.errno not in _ACCEPT_TRANSIENT:
                    self._throttles["accept"].warning("accept failed: %s", exc)
                continue  # that connection failed before we took it; the next may not
            with self._boundary_of_new(sock):
                self._admit(sock, peer_of(sock, addr))

    def _pause_accepting(self, exc: OSError) -> None:
        # Out of descriptors: stop accepting for a moment (the backlog
        # waits, then overflows) and keep serving the connected ones.
        logger.error("refusing new connections for %.1f s: %s", _ACCEPT_PAUSE, exc.strerror)
        self._stats.refused += 1
        assert self._selector is not None
        self._selector.unregister(self._listener)
        self._accept_again = time.monotonic() + _ACCEPT_PAUSE

    @contextlib.contextmanager
    def _boundary_of_new(self, sock: socket.socket) -> Iterator[None]:
        """A connection that fails while being admitted is closed, and that is all."""
        try:
            yield
        except OSError as exc:
            logger.debug("new connection failed: %s", exc)
            if sock.fileno() >= 0 and sock.fileno() not in self._clients:
                sock.close()

    def _admit(self, sock: socket.socket, peer: str) -> None:
        if len(self._clients) >= self._max_connections and self._handshakes:
            # Connections that never authenticate must not fill the broker.
            self._make_room(self._handshakes.busiest("max_connections", len(self._clients)))
        if len(self._clients) >= self._max_connections:
            sock.close()
            self._stats.refused += 1
            self._throttles["max_connections"].warning(
                "refusing a connection: %d connections, the limit (max_connections)",
                self._max_connections,
            )
            return
        eviction = self._handshakes.room_for(peer)  # see _admission
        if eviction is not None:
            self._make_room(eviction)
        sock.setblocking(False)
        self._count += 1
        opening = ServerHandshake(self._authkey, self._limits)
        client = Session(
            sock, self._count, time.monotonic() + self._handshake_timeout, opening, peer
        )
        client.send_now(opening.data_to_send())
        self._clients[sock.fileno()] = client
        self._handshakes.add(client)
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _make_room(self, eviction: Eviction[Session]) -> None:
        self._stats.refused += 1
        self._throttles[eviction.setting].warning(
            "closing the oldest connection still authenticating to make room: "
            "%d from %s, the limit (%s)",
            eviction.count,
            eviction.whose,
            eviction.setting,
        )
        self._drop(eviction.oldest, logging.DEBUG, "making room for a new connection")

    def _drop(self, client: Session, level: int, reason: str) -> None:
        if client.sock.fileno() < 0:
            return
        logger.log(level, "closing %s: %s", client.name, reason)
        fd = client.sock.fileno()
        assert self._selector is not None
        self._selector.unregister(client.sock)
        client.sock.close()
        del self._clients[fd]
        self._handshakes.discard(client)  # no longer authenticating, at least
        self._input -= client.unfinished
        client.unfinished = 0
        self._exchange.dirty.discard(client)
        self._backlogged.discard(client)
        client.backlog = []
        if client is self._exchange.bridge and not self._stopping:
            logger.warning("the federation bridge is gone")
        self._exchange.forget(client)
        client.out.clear()
        client.out_size = 0

    def _expire_handshakes(self, now: float) -> None:
        for client in self._handshakes.late(now):
            self._stats.refused += 1
            self._drop(client, logging.WARNING, "no complete handshake in time")

    # --- input ---------------------------------------------------------------

    def _read(self, client: Session) -> None:
        if client.backlog:
            return  # what it sent before waits: read more once that is handled
        try:
            data = client.sock.recv(self._recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, logging.DEBUG, f"receive failed: {exc.strerror}")
            return
        if not data:
            level = logging.DEBUG if client.active else logging.INFO
            self._drop(client, level, "connection closed by peer")
            return
        frames: List[Tuple[int, bytes]] = []
        try:
            if client.decoder is None:
                data = self._open(client, data)
            if data and client.decoder is not None:
                frames = client.decoder.feed(data)
                self._account_input(client, client.decoder.buffered, bool(frames))
        except AuthenticationError as exc:
            self._stats.refused += 1
            self._drop(client, logging.WARNING, f"authentication failed: {exc}")
        except ProtocolError as exc:
            self._reject(client, str(exc))
        if frames:
            self._handle_guarded(client, frames)

    def _open(self, client: Session, data: bytes) -> bytes:
        """Advance *client*'s handshake; what follows it, once done (its first frames)."""
        opening = client.opening
        try:
            opening.receive(data)
        except (AuthenticationError, ProtocolError):
            with contextlib.suppress(OSError):  # FAILURE, if any: the peer may not wait
                client.send_now(opening.data_to_send())
            raise
        client.send_now(opening.data_to_send())
        if not opening.done:
            return b""
        client.decoder = proto.FrameDecoder(self._max_message)
        self._handshakes.discard(client)
        logger.debug("%s connected", client.name)
        return opening.trailing

    def _handle_guarded(self, client: Session, frames: List[Tuple[int, bytes]]) -> None:
        try:
            self._handle(client, frames)
        except AuthenticationError as exc:
            self._stats.refused += 1
            self._drop(client, logging.WARNING, f"authentication failed: {exc}")
        except ProtocolError as exc:
            self._reject(client, str(exc))

    def _account_input(self, client: Session, unfinished: int, completed: bool) -> None:
        if completed or not client.unfinished:
            client.unfinished_since = time.monotonic()  # a new frame begins
        self._input += unfinished - client.unfinished
        client.unfinished = unfinished
        while self._input > self._max_input:
            # The client whose unfinished frame began the longest ago goes:
            # whoever merely crossed the line may be an honest one sending a
            # large message beside some that hold frames open.
            hog = min(
                (c for c in self._clients.values() if c.unfinished),
                key=lambda c: c.unfinished_since,
            )
            reason = (
                f"{hog.unfinished} bytes of a frame unfinished for "
                f"{time.monotonic() - hog.unfinished_since:.1f} s while the broker holds "
                f"{self._input}, over its limit of {self._max_input} (max_input_buffer)"
            )
            if hog is client:
                raise ProtocolError(reason)
            self._reject(hog, reason)

    def _handle(self, client: Session, frames: List[proto.Frame]) -> None:
        done = self._exchange.handle(client, frames, self._budget)
        if done < len(frames):  # over its share of this round: the rest waits
            client.backlog = frames[done:]
            self._backlogged.add(client)

    def _reject(self, client: Session, reason: str) -> None:
        self._stats.refused += 1
        if client.opening.authenticated:
            with contextlib.suppress(OSError):  # best effort: the peer may be gone
                client.sock.send(proto.frame(proto.ERROR, reason.encode()))
        self._drop(client, logging.WARNING, f"protocol error: {reason}")

    def statistics(self) -> BrokerStatistics:
        """A snapshot of the broker's figures (call it from the broker's own thread)."""
        active = [c for c in self._clients.values() if c.active]
        stats = self._stats
        return BrokerStatistics(
            uptime=time.monotonic() - stats.started,
            clients=len(active)
            - (self._exchange.bridge is not None),  # the bridge is in federation
            subscriptions=sum(len(c.subs) for c in active),
            messages_in=stats.messages_in,
            bytes_in=stats.bytes_in,
            messages_out=stats.messages_out,
            bytes_out=stats.bytes_out,
            messages_per_second=stats.rate,
            slow_consumers=stats.slow_consumers,
            refused=stats.refused,
            largest_buffer=max((c.held for c in active), default=0),
            federation=self._exchange.federation_figures(),
        )

    # --- routing and output ------------------------------------------------

    def _flush_dirty(self) -> None:
        dirty, self._exchange.dirty = self._exchange.dirty, set()
        for client in dirty:
            if client.sock.fileno() >= 0:
                with self._boundary(client):
                    self._flush(client)

    def _flush(self, client: Session) -> None:
        if client.held > self._max_buffer:
            if client is self._exchange.bridge:
                self._shed_for_bridge(client)
            if client.held > (
                self._max_buffer // 2 if client is self._exchange.bridge else self._max_buffer
            ):
                self._stats.slow_consumers += 1
                self._drop(
                    client,
                    logging.WARNING,
                    f"slow consumer: {client.held} bytes waiting, "
                    f"over the limit of {self._max_buffer} (max_buffer)",
                )
                return
        if not client.writing:
            self._write(client)

    def _shed_for_bridge(self, bridge: Session) -> None:
        # The bridge is not cut off like a slow consumer (it would come back
        # and fall behind again): what it cannot take is dropped for other
        # hosts, at most once as everything else, and local delivery goes on.
        # Shedding takes the newest messages, each at the price of one pop;
        # only if what is left (replies to the bridge's own requests) still
        # fills half its buffer is it cut: its memory stays bounded.
        dropped = bridge.shed(self._max_buffer // 2)
        self._stats.bridge_dropped += dropped
        self._throttles["bridge"].warning(
            "the federation bridge is behind: dropped %d messages for other hosts so far",
            self._stats.bridge_dropped,
        )

    def _write(self, client: Session) -> None:
        out = client.out
        # The bridge's news of interest is queued only once the rest is sent:
        # it never piles up in the queue (see _routing.InterestFeed).
        while out or (client is self._exchange.bridge and self._exchange.queue_interest(client)):
            if len(out) == 1 or len(out[0]) >= _SEND_CHUNK:
                data = out.popleft()
            else:
                parts, size = [], 0
                while out and size < _SEND_CHUNK:
                    parts.append(out.popleft())
                    size += len(parts[-1])
                data = b"".join(parts)
            try:
                sent = client.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._drop(client, logging.DEBUG, f"send failed: {exc.strerror}")
                return
            client.out_size -= sent
            if sent < len(data):
                out.appendleft(memoryview(data)[sent:])  # the rest, not a copy of it
                break
        self._want_write(client, bool(out))

    def _want_write(self, client: Session, want: bool) -> None:
        if want != client.writing:
            client.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            assert self._selector is not None
            self._selector.modify(client.sock, events, client)

    def _close_all(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, logging.DEBUG, "broker stopping")
        if self._selector is not None:
            self._selector.close()
        path = self.address if self._listener.family == socket.AF_UNIX else None
        self._listener.close()
        if path and not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._remove_tmpdir()
        self._wake_r.close()
        self._wake_w.close()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
