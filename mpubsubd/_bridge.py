"""The federation bridge: a child process of mpubsubd joining its broker to NATS.

It connects to the local broker as a client that says BRIDGE, so the
broker sends it every message published on this host and the topics this
host's subscribers want. It publishes the first to NATS, signed (see
``_federation``), subscribes in NATS to the second, and hands what
arrives and verifies to the broker. NATS trouble stays here: the broker's
loop never waits for NATS, and a dead bridge is restarted by mpubsubd.

Run as ``python -m mpubsubd._bridge`` with its settings as JSON on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mpubsub._for_mpubsubd import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    Memo,
    open_stream,
    printable,
    reason,
)
from mpubsub._for_mpubsubd import protocol as proto

from ._config import FederationConfig
from ._federation import Arrivals, Signer, Verifier, interest, subject, weigh
from ._logging import stderr_handler, use_handler

logger = logging.getLogger("mpubsubd.bridge")

_READ_SIZE = 256 * 1024
_REPORT_EVERY = 1.0  # seconds between FEDERATION frames to the broker
_MAX_BACKLOG = 64 * 1024 * 1024  # bytes for the broker not yet written: beyond, drop
# Bytes for NATS not yet written: beyond, drop rather than wait, so the bridge
# always keeps up with its broker (which would cut it as a slow consumer).
# Half of nats-py's own buffer, whose overflow would make publish() wait.
_NATS_BACKLOG = 16 * 1024 * 1024
_WATCH_EVERY = 2.0  # seconds between checks that NATS answers
_ANSWER_WITHIN = 5.0  # seconds NATS has to answer a PING before it is said not to
# What a control line (PUB or SUB) holds besides its subject, at most.
_LINE_OVERHEAD = 32


class _Client(Client):
    """nats-py's client, dropping a message it cannot parse instead of dying of it.

    nats-py parses each message inside its read loop: one it cannot parse
    (a subject that is not UTF-8, headers that are not NATS/1.0 UTF-8),
    which anyone may publish, ends the loop while the connection still
    says connected. Here a subject is decoded with surrogateescape, and
    headers that cannot be parsed are told to *malformed* and left out:
    _deliver then drops the message like any that fails its check (ours
    never have headers). Should nats-py change, the watchdog still notices
    a loop that stopped.
    """

    def __init__(self, malformed: Callable[[Exception], None]) -> None:
        super().__init__()
        self.malformed = malformed

    async def _process_headers(self, headers: bytes) -> Optional[Dict[str, str]]:
        if not headers:  # nats-py asks for every message: ours have none
            return None
        try:
            parsed: Optional[Dict[str, str]] = await super()._process_headers(headers)
        except Exception as exc:  # the read loop must go on; the MAC will not match
            self.malformed(exc)
            return None
        return parsed

    async def _process_pong(self) -> None:
        # A flush() that timed out cancels its future and leaves it first in
        # line: nats-py would answer it with this PONG, late, and its read
        # loop would die of the InvalidStateError. The PONG is that flush's.
        pongs = self._pongs
        if pongs and pongs[0].done():
            pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()

    def _build_message(  # type: ignore[no-untyped-def]
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers
    ):
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


class Bridge:
    """One bridge between the local broker at *address* (with *authkey*) and NATS.

    mpubsubd hands it the broker's address and key rather than the path of
    the credentials file: the bridge runs as mpubsubd's user, which may not
    read that root-owned file.
    """

    def __init__(
        self,
        config: FederationConfig,
        broker: Tuple[Address, bytes],
        secret: bytes,
        bridge_key: bytes,
        *,
        connected: socket.socket,
    ) -> None:
        """*connected* is a socket already connected to the broker at *broker*'s address
        (the end of mpubsubd's pair: the bridge, as mpubsubd's user, may not open the
        socket file); it authenticates with *broker*'s key."""
        self._config = config
        self._broker = broker
        self._connected = connected
        self._bridge_key = bridge_key
        self._prefix = config.subject_prefix
        self._local_only = tuple(proto.encode_topic(t) for t in config.local_only_topics)
        self._signer = Signer(secret, config.host_name)
        self._subjects: Memo[bytes, str] = Memo(
            lambda topic: subject(self._prefix, topic), weigh=weigh
        )
        self._max_subject = config.max_control_line - _LINE_OVERHEAD
        self._too_long: FrozenSet[str] = frozenset()  # wanted subjects NATS cannot carry
        self._topics: Set[bytes] = set()  # what this host's subscribers want
        self._nats_subs: Dict[str, Subscription] = {}
        self._nc: Optional[Client] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._limits = proto.Limits()  # the broker's, once connected
        self._sender = b""  # who published the broker's next messages (its SENDER frame)
        self._inbox: List[Tuple[str, bytes]] = []  # (subject, body) from NATS, this round
        self._resync = asyncio.Event()
        self._stopping = asyncio.Event()
        self._nats_closed = asyncio.Event()
        self._warned: Dict[str, float] = {}
        self.counters = {
            "forwarded_out": 0,  # local messages published to NATS
            "forwarded_in": 0,  # messages from other hosts handed to the broker
            "dropped_out": 0,  # local messages NATS could not take (down, too big)
            "dropped_unverified": 0,  # from NATS, failing the signature or malformed
            "duplicates": 0,  # from NATS, already delivered (two subscriptions matched)
            "too_long": 0,  # messages and NATS subjects to subscribe NATS cannot carry
            "reconnects": 0,
        }
        self.state = "connecting"
        self.server = ""
        self._arrivals = Arrivals(
            self._prefix,
            Verifier(secret, config.host_name, max_skew=config.max_clock_skew),
            self._local_only,
            self.counters,
            self._warn,
        )

    # --- the whole life ----------------------------------------------------------

    async def run(self) -> int:
        """Serve until the broker goes away or NATS closes for good (1), or stop() (0)."""
        reader = await self._open_broker()
        tasks = [
            asyncio.ensure_future(self._connect_nats()),
            asyncio.ensure_future(self._sync_interest()),
            asyncio.ensure_future(self._send_figures_regularly()),
            asyncio.ensure_future(self._watch()),
        ]
        reading = asyncio.ensure_future(self._read_broker(reader))
        stopping = asyncio.ensure_future(self._stopping.wait())
        closed = asyncio.ensure_future(self._nats_closed.wait())
        ends = {reading, stopping, closed}
        everything = (*tasks, *ends)
        try:
            # The broker gone, stop(), NATS closed or a failure ends the
            # bridge; the NATS connection's task ends normally once connected.
            waiting = set(everything)
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if done & ends or any(t.exception() for t in done):
                    break
            if closed in done and not self._stopping.is_set():
                logger.error("the NATS connection closed for good; stopping to be restarted")
        finally:
            for task in everything:
                task.cancel()
            self.state = "closing"
            if self._nc is not None and not self._nc.is_closed:
                with contextlib.suppress(Exception):  # best effort: flush what is pending
                    await asyncio.wait_for(self._nc.close(), 5)
            if self._writer is not None:
                self._writer.close()
        for task in everything:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return 0 if self._stopping.is_set() else 1

    def stop(self) -> None:
        self._stopping.set()

    # --- the local broker ------------------------------------------------------------

    async def _open_broker(self) -> asyncio.StreamReader:
        address, authkey = self._broker
        reader, self._writer, self._limits = await open_stream(
            address, authkey, DEFAULT_HANDSHAKE_TIMEOUT, limit=_READ_SIZE, sock=self._connected
        )
        self._arrivals.use_limits(self._limits)
        self._writer.write(proto.frame(proto.BRIDGE, self._bridge_key))
        logger.info(
            "bridge for %s: asked the broker at %s to take it as its bridge",
            self._config.host_name,
            address,
        )
        return reader

    async def _read_broker(self, reader: asyncio.StreamReader) -> None:
        decoder = proto.FrameDecoder(self._limits.max_message + 64)
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                logger.info("the broker closed the connection; stopping")
                return
            for kind, frame in decoder.feed(data):
                if kind == proto.PUB:
                    await self._publish(frame)
                elif kind == proto.SENDER:  # who published the messages that follow
                    self._sender = proto.body_of(frame)
                elif kind == proto.SUB:
                    self._topics.add(proto.body_of(frame))
                    self._resync.set()
                elif kind == proto.UNSUB:
                    self._topics.discard(proto.body_of(frame))
                    self._resync.set()
                elif kind == proto.ERROR:
                    raise ConnectionError(f"the broker refused: {proto.reason_of(frame)}")

    async def _send_figures_regularly(self) -> None:
        while True:
            self._send_local(self._figures_frame())
            await asyncio.sleep(_REPORT_EVERY)

    def _figures_frame(self) -> bytes:
        return proto.federation_frame(self.statistics())

    def statistics(self) -> Dict[str, Any]:
        return {
            "state": self.state,
            "server": self.server,
            "name": self._config.host_name,
            "nats_subscriptions": len(self._nats_subs),
            **self.counters,
        }

    def _send_local(self, data: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.transport.get_write_buffer_size() > _MAX_BACKLOG:
            return False
        writer.write(data)
        return True

    # --- this host -> NATS -------------------------------------------------------------

    async def _publish(self, frame: bytes) -> None:
        topic, payload = proto.pub_parts(frame)
        if self._local_only and topic.startswith(self._local_only):
            return
        subj = self._subjects[topic]
        if len(subj) > self._max_subject:
            self.counters["too_long"] += 1
            self._warn(
                f"a message's subject of {len(subj)} bytes is over NATS's control line "
                f"(max_control_line {self._config.max_control_line}, less {_LINE_OVERHEAD} "
                "for the rest of the line): not sent to other hosts",
                "too long out",
            )
            return
        nc = self._nc
        if nc is None or nc.is_closed:
            self._drop_out("NATS is not connected: messages for other hosts are dropped")
            return
        if nc.pending_data_size > _NATS_BACKLOG:
            self._drop_out("NATS is not keeping up: messages for other hosts are dropped")
            return
        try:
            await nc.publish(subj, self._signer.seal(topic, payload, self._sender))
        except nats.errors.MaxPayloadError:
            self._drop_out(
                f"a message of {len(payload)} bytes exceeds NATS's max_payload "
                f"({nc.max_payload}): not sent to other hosts",
                "max_payload",
            )
        except nats.errors.Error as exc:
            self._drop_out(
                f"NATS does not take messages now ({type(exc).__name__}): dropping", "not taken"
            )
        else:
            self.counters["forwarded_out"] += 1

    def _drop_out(self, reason: str, kind: str = "") -> None:
        self.counters["dropped_out"] += 1
        self._warn(reason, kind)

    # --- NATS -> this host ---------------------------------------------------------------

    def _deliver(self) -> None:
        inbox, self._inbox = self._inbox, []
        frames, count = self._arrivals.frames(inbox)
        if not count:
            return
        if self._send_local(frames):  # one write for the lot
            self.counters["forwarded_in"] += count
        else:
            self._warn("the broker is not reading: dropping messages from other hosts")

    async def _on_message(self, msg: Msg) -> None:
        # One task per NATS subscription calls this; the messages of one
        # network read are gathered and delivered together, sorted back
        # into each origin's order, once every subscription had its share.
        if not self._inbox:
            asyncio.get_running_loop().call_soon(self._deliver)
        self._inbox.append((msg.subject, msg.data))

    def _malformed(self, exc: Exception) -> None:
        # The message goes on to _deliver, which drops it (and counts it).
        self._warn(
            f"a message from NATS with headers nats-py cannot parse: {type(exc).__name__}",
            "cannot parse",
        )

    def _warn(self, message: str, kind: str = "") -> None:
        # At most one line per kind of trouble every ten seconds: anyone who
        # can publish to NATS must not be able to flood the log.
        kind = kind or message
        now = time.monotonic()
        if now - self._warned.get(kind, -60.0) >= 10.0:
            self._warned[kind] = now
            logger.warning("%s", message)

    # --- the NATS connection ---------------------------------------------------------------

    async def _connect_nats(self) -> None:
        # With max_reconnect_attempts=-1, nats-py retries the first connection
        # too, for ever; it reports each failure to error() below.
        nc = _Client(self._malformed)
        await nc.connect(**self._nats_options())
        self._nc = nc
        self._set_state("connected", self._url())
        logger.info("connected to NATS at %s", self.server)
        self._resync.set()

    def _nats_options(self) -> Dict[str, Any]:
        config = self._config

        async def disconnected() -> None:
            if self.state in ("connected", "not answering"):
                self._set_state("disconnected", "")
                logger.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            self.counters["reconnects"] += 1
            self._set_state("connected", self._url())
            logger.info("reconnected to NATS at %s", self.server)

        async def error(exc: Exception) -> None:
            if self._nc is None and self.state != "disconnected":
                self._set_state("disconnected", "")
                logger.warning(
                    "cannot reach NATS at %s (%s); retrying",
                    config.servers,
                    printable(reason(exc)),
                )
            else:
                logger.debug("NATS: %s", printable(reason(exc)))

        async def closed() -> None:
            self._set_state("closed", "")
            self._nats_closed.set()

        return {
            **nats_options(config),
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            "closed_cb": closed,
        }

    def _url(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else ""

    def _set_state(self, state: str, server: str) -> None:
        self.state, self.server = state, server
        self._send_local(self._figures_frame())

    async def _sync_interest(self) -> None:
        while True:
            await self._resync.wait()
            self._resync.clear()
            nc = self._nc
            if nc is None:
                continue
            wanted = self._carried(interest(self._prefix, self._topics, self._local_only))
            try:
                # Subscribe before unsubscribing: a message both match in
                # between arrives twice, and the second is dropped as seen.
                for subj in sorted(wanted - self._nats_subs.keys()):
                    self._nats_subs[subj] = await nc.subscribe(subj, cb=self._on_message)
                for subj in sorted(self._nats_subs.keys() - wanted):
                    await self._nats_subs.pop(subj).unsubscribe()
                await nc.flush(5)  # the server has them: report it
                self._send_local(self._figures_frame())
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                logger.warning(
                    "cannot update NATS subscriptions (%s); retrying", printable(reason(exc))
                )
                await asyncio.sleep(1.0)
                self._resync.set()

    def _carried(self, wanted: FrozenSet[str]) -> FrozenSet[str]:
        """The subjects of *wanted* that fit in a NATS control line; the others counted."""
        too_long = frozenset(s for s in wanted if len(s) > self._max_subject)
        if too_long - self._too_long:
            self.counters["too_long"] += len(too_long - self._too_long)
            self._warn(
                f"{len(too_long)} NATS subjects to subscribe to are over NATS's control line "
                f"(max_control_line {self._config.max_control_line}, less {_LINE_OVERHEAD} "
                "for the rest of the line): their topics get nothing from other hosts",
                "too long in",
            )
        self._too_long = too_long
        return wanted - too_long

    async def _watch(self) -> None:
        # nats-py says "connected" as long as its socket is open, even when
        # nothing is read any more: only a PING answered in time shows it.
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            reading = getattr(nc, "_reading_task", None)  # flush() cannot tell (nats-py 2.16)
            if reading is not None and reading.done():
                logger.warning("nats-py stopped reading from NATS at %s; reconnecting", self.server)
                self._set_state("not answering", self.server)
                await nc.force_reconnect()
                continue
            try:
                await nc.flush(_ANSWER_WITHIN)  # type: ignore[arg-type]
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                if self.state == "connected":
                    self._set_state("not answering", self.server)
                    logger.warning(
                        "NATS at %s does not answer (%s); waiting for it, or reconnecting",
                        self.server,
                        printable(reason(exc)),
                    )
            else:
                if self.state == "not answering":
                    self._set_state("connected", self._url())
                    logger.info("NATS at %s answers again", self.server)


def nats_options(config: FederationConfig) -> Dict[str, Any]:
    """What nats-py's connect() is given for *config*, but the callbacks."""
    options: Dict[str, Any] = {
        "servers": list(config.server_urls),
        "name": f"mpubsubd bridge {config.host_name}",
        "no_echo": True,  # our own messages were delivered here already
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "connect_timeout": 2,
        # nats-py's own watchdog: a server that leaves this many PINGs
        # unanswered is stale, and nats-py reconnects (see also _watch).
        "ping_interval": 5,
        "max_outstanding_pings": 3,
        "pending_size": 2 * _NATS_BACKLOG,
        # Our subjects are escape()d: never white space, CR or LF (see _federation).
        "skip_subject_validation": True,
    }
    if config.user:
        options["user"] = config.user
    if config.password:
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    if config.tls_ca_file or config.tls_cert_file:
        context = ssl.create_default_context(cafile=config.tls_ca_file or None)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
        options["tls"] = context
    return options


def main(bridge: Bridge, levels_fd: int, *, log_to_file: bool, level: str) -> int:
    """The bridge process, forked by mpubsubd's supervisor, serving *bridge* until it
    stops; its exit status. mpubsubd writes a new log level on *levels_fd* at reload,
    and, *log_to_file*, copies what the bridge writes on stderr into its log file."""
    use_handler(stderr_handler(file_format=log_to_file), level)
    logger.debug("bridge running mpubsubd from %s", os.path.dirname(os.path.dirname(__file__)))
    levels = os.fdopen(levels_fd, "rb", buffering=0)

    def new_level() -> None:  # mpubsubd reloaded: a line with the new log level
        line = levels.readline(16).decode("ascii", "replace").strip()
        if not line:  # mpubsubd is gone: the broker's connection will tell the rest
            asyncio.get_running_loop().remove_reader(levels.fileno())
        elif line in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            logging.getLogger().setLevel(line)
            logger.info("log level now %s", line)

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, bridge.stop)
        loop.add_reader(levels.fileno(), new_level)
        return await bridge.run()

    try:
        code = asyncio.run(serve())
    except Exception as exc:
        logger.error("bridge failed: %s", reason(exc))
        code = 1
    logger.info("bridge stopped")
    return code
