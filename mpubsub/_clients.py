"""The broker's connections: taken, read, written and closed, one's trouble its own.

The broker's loop hands this what its selector says of each connection;
the frames they send go to the Exchange, what it queues is written here.
Every connection's OS errors, and any bug of ours while serving it, end
that connection only (``_boundary``), with one log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import selectors
import socket
import time
from typing import Callable, Dict, Iterator, List, Optional, Set

from . import _protocol as proto
from ._accounts import Account, Quotas
from ._admission import Eviction, Handshakes
from ._exchange import Exchange
from ._handshake import ServerHandshake
from ._identity import Identity
from ._session import Session
from ._stats import Counters, Throttle
from ._text import reason
from .errors import AuthenticationError, ProtocolError

logger = logging.getLogger("mpubsub.broker")

_RECV_SIZE = 64 * 1024
# Bytes read per round, shared among the clients with input as the work is
# (each reads at least _MIN_RECV): decoding what 200 clients sent at once,
# 64 KiB each of tiny frames, held the loop for a second before any budget.
_RECV_PER_ROUND = 1024 * 1024
_MIN_RECV = 4096
# Deliveries, frames and routing work (see Router.work) that the clients'
# input may cost per round of the loop, shared among the clients with input
# (each gets at least _MIN_WORK); what is over waits for the next rounds,
# and its client is not read meanwhile: clients fanning tiny messages out
# to many subscribers, or publishing to ever new deep topics, cannot keep
# the loop from everyone else for long.
_WORK_PER_ROUND = 50_000
_MIN_WORK = 200


@dataclasses.dataclass
class Settings:
    """What the broker was told to accept, as Clients needs it."""

    authkey: bytes
    limits: proto.Limits
    handshake_timeout: float
    max_buffer: int
    max_connections: int
    max_input: int  # unfinished frames, all clients together, header room included
    max_handshakes: int
    max_handshakes_per_peer: int
    quotas: Quotas


class Clients:
    """Every connection of one broker, from its first byte to its close."""

    def __init__(
        self,
        settings: Settings,
        exchange: Exchange,
        stats: Counters,
        throttles: Dict[str, Throttle],
    ) -> None:
        self.settings = settings
        self._exchange = exchange
        self._stats = stats
        self._throttles = throttles
        self._by_fd: Dict[int, Session] = {}
        self._handshakes: Handshakes[Session] = Handshakes(
            settings.max_handshakes, settings.max_handshakes_per_peer
        )
        self._input = 0  # unfinished input, all clients together
        self.backlogged: Set[Session] = set()  # frames read and not yet handled
        # What one client's input may cost this round, and what may be read of it.
        self._budget, self._recv_size = _WORK_PER_ROUND, _RECV_SIZE
        self._count = 0
        self.selector: Optional[selectors.BaseSelector] = None  # the loop's, once it runs
        self.stopping = False

    def apply(self, settings: Settings) -> None:
        """Take new *settings*, for what comes next (connections already over a cap stay)."""
        self.settings = settings
        self._handshakes.set_caps(settings.max_handshakes, settings.max_handshakes_per_peer)
        self._exchange.accounts.quotas = settings.quotas

    def active(self) -> List[Session]:
        """The clients that completed their handshake."""
        return [c for c in self._by_fd.values() if c.active]

    def share_round(self, inputs: int) -> None:
        """*inputs* clients have input this round: each one's share of work and reading."""
        self._budget = max(_MIN_WORK, _WORK_PER_ROUND // max(1, inputs))
        self._recv_size = max(_MIN_RECV, min(_RECV_SIZE, _RECV_PER_ROUND // max(1, inputs)))

    def close_all(self) -> None:
        for client in list(self._by_fd.values()):
            self._drop(client, logging.DEBUG, "broker stopping")

    def work_backlogs(self) -> None:
        """Handle what clients sent beyond their share of earlier rounds."""
        backlogged, self.backlogged = self.backlogged, set()
        for client in backlogged:
            frames, client.backlog = client.backlog, []
            if client.sock.fileno() < 0:
                continue  # dropped meanwhile
            with self._boundary(client):
                self._handle_guarded(client, frames)

    def serve(self, client: Session, events: int) -> None:
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

    @contextlib.contextmanager
    def _boundary_of_new(self, sock: socket.socket) -> Iterator[None]:
        """A connection that fails while being admitted is closed, and that is all."""
        try:
            yield
        except OSError as exc:
            logger.debug("new connection failed: %s", exc)
            if sock.fileno() >= 0 and sock.fileno() not in self._by_fd:
                sock.close()

    def admit(self, sock: socket.socket, identify: Callable[[], Identity]) -> None:
        """Take a new connection from whom *identify* says, or refuse it (at
        max_connections, or its user's max_connections_per_user)."""
        with self._boundary_of_new(sock):
            self._admit(sock, identify())

    def _admit(self, sock: socket.socket, identity: Identity) -> None:
        peer = identity.account
        accounts = self._exchange.accounts
        if not accounts.may_connect(peer):
            sock.close()
            self._stats.refused += 1
            accounts[peer].throttle.warning(
                "refusing a connection from %s: %s has %d connections, at its limit of %d "
                "(max_connections_per_user)",
                identity.describe(),
                peer,
                accounts[peer].connections,
                accounts.quotas.connections,
            )
            return
        if len(self._by_fd) >= self.settings.max_connections and self._handshakes:
            # Connections that never authenticate must not fill the broker.
            self._make_room(self._handshakes.busiest("max_connections", len(self._by_fd)))
        if len(self._by_fd) >= self.settings.max_connections:
            sock.close()
            self._stats.refused += 1
            self._throttles["max_connections"].warning(
                "refusing a connection: %d connections, the limit (max_connections)",
                self.settings.max_connections,
            )
            return
        eviction = self._handshakes.room_for(peer)  # see _admission
        if eviction is not None:
            self._make_room(eviction)
        sock.setblocking(False)
        self._count += 1
        opening = ServerHandshake(self.settings.authkey, self.settings.limits)
        client = Session(
            sock,
            self._count,
            time.monotonic() + self.settings.handshake_timeout,
            opening,
            identity=identity,
            access=self._exchange.policy.access(identity),
        )
        client.send_now(opening.data_to_send())
        self._by_fd[sock.fileno()] = client
        accounts.connected(peer)
        self._handshakes.add(client)
        assert self.selector is not None
        self.selector.register(sock, selectors.EVENT_READ, client)

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
        if client.active and level < logging.INFO and not self.stopping:
            level = logging.INFO  # a client that was connected: its leaving is news
        logger.log(level, "%s %s: %s", client.name, _verb(level, client), reason)
        fd = client.sock.fileno()
        assert self.selector is not None
        self.selector.unregister(client.sock)
        client.sock.close()
        del self._by_fd[fd]
        self._handshakes.discard(client)  # no longer authenticating, at least
        self._input -= client.unfinished
        client.unfinished = 0
        self._exchange.dirty.discard(client)
        self.backlogged.discard(client)
        client.backlog = []
        if client is self._exchange.bridge and not self.stopping:
            logger.warning("the federation bridge is gone")
        self._exchange.forget(client)
        client.out.clear()
        client.out_size = 0
        self._charge(client)
        self._exchange.accounts.disconnected(client.peer)
        self._stats.add(client)

    def expire_handshakes(self, now: float) -> None:
        for client in self._handshakes.late(now):
            self._stats.refused += 1
            self._drop(client, logging.WARNING, "no complete handshake in time")

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
        frames: List[proto.Frame] = []
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
        client.decoder = proto.FrameDecoder(self.settings.limits.max_message)
        # The policy of now: a reload during its handshake missed it (not yet active).
        client.grant(self._exchange.policy.access(client.identity))
        self._handshakes.discard(client)
        client.stamped = opening.version >= 2
        logger.info("%s connected", client.name)
        return opening.trailing

    def _handle_guarded(self, client: Session, frames: List[proto.Frame]) -> None:
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
        while self._input > self.settings.max_input:
            # The client whose unfinished frame began the longest ago goes:
            # whoever merely crossed the line may be an honest one sending a
            # large message beside some that hold frames open.
            hog = min(
                (c for c in self._by_fd.values() if c.unfinished),
                key=lambda c: c.unfinished_since,
            )
            reason = (
                f"{hog.unfinished} bytes of a frame unfinished for "
                f"{time.monotonic() - hog.unfinished_since:.1f} s while the broker holds "
                f"{self._input}, over its limit of {self.settings.max_input} (max_input_buffer)"
            )
            if hog is client:
                raise ProtocolError(reason)
            self._reject(hog, reason)

    def _handle(self, client: Session, frames: List[proto.Frame]) -> None:
        done = self._exchange.handle(client, frames, self._budget)
        if done < len(frames):  # over its share of this round: the rest waits
            client.backlog = frames[done:]
            self.backlogged.add(client)

    def _reject(self, client: Session, reason: str) -> None:
        self._stats.refused += 1
        if client.opening.authenticated:
            with contextlib.suppress(OSError):  # best effort: the peer may be gone
                client.sock.send(proto.frame(proto.ERROR, reason.encode()))
        self._drop(client, logging.WARNING, f"protocol error: {reason}")

    def flush_dirty(self) -> None:
        """Write to the clients that have something new to send."""
        dirty, self._exchange.dirty = self._exchange.dirty, set()
        for client in dirty:
            if client.sock.fileno() >= 0:
                with self._boundary(client):
                    self._flush(client)

    def _charge(self, client: Session) -> Account:
        """Charge what waits for *client* to its account (once a round, not per message);
        the account."""
        account = self._exchange.accounts[client.peer]
        held = client.held
        account.held += held - client.accounted
        client.accounted = held
        return account

    def _flush(self, client: Session) -> None:
        account = self._charge(client)
        if account.held > self.settings.quotas.buffer:
            self._cut_slowest(client.peer, account.held)
            if client.sock.fileno() < 0:
                return
        if client.held > self.settings.max_buffer:
            if client is self._exchange.bridge:
                self._shed_for_bridge(client)
            if client.held > (
                self.settings.max_buffer // 2
                if client is self._exchange.bridge
                else self.settings.max_buffer
            ):
                self._stats.slow_consumers += 1
                self._drop(
                    client,
                    logging.WARNING,
                    f"slow consumer, {client.held} bytes waiting, "
                    f"over the limit of {self.settings.max_buffer} (max_buffer)",
                )
                return
        if not client.writing:
            self._write(client)

    def _cut_slowest(self, peer: str, held: int) -> None:
        """*peer*'s connections hold more than its quota: its slowest one goes."""
        slowest = max(
            (c for c in self._by_fd.values() if c.peer == peer and c is not self._exchange.bridge),
            key=lambda c: c.held,
            default=None,
        )
        if slowest is None:
            return
        self._stats.slow_consumers += 1
        self._drop(
            slowest,
            logging.WARNING,
            f"slow consumer, {slowest.held} bytes waiting, while {peer}'s connections hold "
            f"{held}, over its limit of {self.settings.quotas.buffer} (max_buffer_per_user)",
        )

    def _shed_for_bridge(self, bridge: Session) -> None:
        # The bridge is not cut off like a slow consumer (it would come back
        # and fall behind again): what it cannot take is dropped for other
        # hosts, at most once as everything else, and local delivery goes on.
        # Shedding takes the newest messages, each at the price of one pop;
        # only if what is left (replies to the bridge's own requests) still
        # fills half its buffer is it cut: its memory stays bounded.
        dropped = bridge.shed(self.settings.max_buffer // 2)
        self._stats.bridge_dropped += dropped
        self._throttles["bridge"].warning(
            "the federation bridge is behind: dropped %d messages for other hosts so far",
            self._stats.bridge_dropped,
        )

    def _write(self, client: Session) -> None:
        # The bridge's news of interest is queued only once the rest is sent:
        # it never piles up in the queue (see _routing.InterestFeed).
        more = self._exchange.queue_interest if client is self._exchange.bridge else None
        try:
            waiting = client.send_queued(more)
        except OSError as exc:
            self._drop(client, logging.DEBUG, f"send failed: {reason(exc)}")
            return
        self._charge(client)
        self._want_write(client, waiting)

    def _want_write(self, client: Session, want: bool) -> None:
        if want != client.writing:
            client.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            assert self.selector is not None
            self.selector.modify(client.sock, events, client)


def _verb(level: int, client: Session) -> str:
    """How a log line says a connection ends: cut off for trouble, else disconnected."""
    if not client.active:
        return "closed"
    return "cut off" if level >= logging.WARNING else "disconnected"
