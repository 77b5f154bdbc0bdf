"""An asyncio client's link to its broker: the threaded Link's job, on an event loop.

The same states (``_link.State``), the same Inbox, Outbox and Redial, the
same handshake (``_connect.dial_async``): only the waiting differs. The
socket is watched by the loop (``add_reader``, and ``add_writer`` while it
does not take all there is to send); publishes made in one turn of the loop
go out together at its next (``call_soon``); a task reconnects, backing
off as the threaded client does; requests (PING, STATS) await their
answers. Everything runs in the loop's thread: the lock is there for the
code both clients share.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

from ._connect import Dialed, dial_async
from ._inbox import MAX_INBOX
from ._link import BURST_WINDOW, DIAL_ERRORS, LinkBase, State
from ._outbox import Chunk
from ._text import reason

logger = logging.getLogger("mpubsub.net")

#: Bytes waiting for a broker that does not read, past which publish raises BufferError.
MAX_UNSENT = 64 * 1024 * 1024

# Batched bytes past which publish hands them to the socket itself, not at the
# loop's next turn: a burst published in one turn keeps the broker busy while
# it goes on (the threaded client's writer thread does that in parallel).
_WRITE_AT = 64 * 1024
_LOST = b""  # a request's answer when the connection broke first (no answer is empty)


class AioLink(LinkBase):
    """One asyncio client's connection to its broker, made again whenever it is lost.

    *on_connected(limits_changed)* is called each time a connection is
    made; what ``deliver_to`` names, with the messages of each read (both
    held weakly, as methods of the pub-sub).
    """

    def _set_up(self) -> None:
        self._on_frames: Optional[weakref.WeakMethod[Callable[[List[bytes]], None]]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._opening = False  # connect() is under way
        self._scheduled = False  # a turn of the loop will send the batch
        self._writing = False  # the loop watches the socket for room
        self._reading = False  # the loop watches the socket for bytes
        self._paused = False  # reading stopped: the pub-sub is too far behind
        self._answers: Dict[Tuple[int, int], asyncio.Future[bytes]] = {}
        self._up: Optional[asyncio.Event] = None  # set while connected, or once offline
        self._emptied: Optional[asyncio.Event] = None  # set while nothing waits to be sent
        self._hurried: Optional[asyncio.Event] = None  # wakes the reconnecting task
        self._redialer: Optional[asyncio.Task[None]] = None
        self._gone: Optional[asyncio.Event] = None  # set by disconnect()

    def deliver_to(self, on_frames: Callable[[List[bytes]], None]) -> None:
        """Hand the messages of each read to *on_frames*, a method held weakly."""
        self._on_frames = weakref.WeakMethod(on_frames)

    # --- open and close ------------------------------------------------------------

    async def connect(self) -> None:
        if self.state is not State.OFFLINE or self._opening:
            raise RuntimeError("Already connected")
        loop = asyncio.get_running_loop()
        self._opening = True
        try:
            dialed = await dial_async(self.address, self.authkey, self.credentials, self.timeout)
        finally:
            self._opening = False
        self._loop = loop
        self._up, self._emptied, self._hurried = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._gone = asyncio.Event()
        self._emptied.set()
        self.state = State.CONNECTED
        self._install(dialed)

    async def disconnect(self) -> None:
        if self.state is State.OFFLINE:
            raise RuntimeError("Not connected")
        self._check_loop()
        await self.drain(self.timeout)
        if self.offline:  # another task disconnected meanwhile
            return
        self.drop_unsent("disconnected")
        self.state = State.OFFLINE
        self.redial.drop_all()
        self._close()
        if self._redialer is not None and self._redialer is not asyncio.current_task():
            self._redialer.cancel()
        self._redialer = None
        assert self._up is not None and self._hurried is not None
        self._up.set()  # a request waiting for a reconnection ends
        self._hurried.set()
        assert self._gone is not None
        self._gone.set()

    async def wait_offline(self) -> None:
        """Wait until disconnect() is called; RuntimeError if it is not connected."""
        if self.state is State.OFFLINE:
            raise RuntimeError("Not connected")
        self._check_loop()
        assert self._gone is not None
        await self._gone.wait()

    def abandon(self) -> None:
        """Its pub-sub was collected while connected: close, and stop reconnecting."""
        self.state = State.OFFLINE
        if self._redialer is not None and not self._loop_closed():
            self._redialer.cancel()
        self._redialer = None
        if self.sock is not None and self._loop_closed():
            self._reading = self._writing = False  # a closed loop watches nothing
        self._close()

    def _loop_closed(self) -> bool:
        return self._loop is None or self._loop.is_closed()

    def _check_loop(self) -> None:
        """RuntimeError unless the running loop is the one it connected in."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "this pub-sub is connected in another event loop: disconnect() it there, "
                "or before that loop ends"
            )

    def _install(self, dialed: Dialed) -> None:
        assert self._loop is not None and self._up is not None
        changed = self._adopt(dialed)
        self._paused = False
        self._watch_reading(True)
        self._up.set()
        self._announce(changed)

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self._watch_reading(False, sock)
        self._watch_writing(False, sock)
        sock.close()
        for key, answer in list(self._answers.items()):
            if not answer.done():
                answer.set_result(_LOST)
            del self._answers[key]

    def _watch_reading(self, on: bool, sock: Optional[socket.socket] = None) -> None:
        sock = sock or self.sock
        if on == self._reading or sock is None or self._loop is None:
            return
        self._reading = on
        if on:
            # In a context of its own, not the caller's: a delivery's sender
            # (a coroutine subscriber's context variable) must not follow it.
            contextvars.Context().run(self._loop.add_reader, sock, self._readable)
        else:
            self._loop.remove_reader(sock)

    def _watch_writing(self, on: bool, sock: Optional[socket.socket] = None) -> None:
        sock = sock or self.sock
        if on == self._writing or sock is None or self._loop is None:
            return
        self._writing = on
        if on:
            self._loop.add_writer(sock, self._writable)
        else:
            self._loop.remove_writer(sock)

    def pause_reading(self, paused: bool) -> None:
        """Stop reading while the pub-sub is too far behind (MAX_INBOX), or read again."""
        self._paused = paused
        self._watch_reading(not paused)

    # --- lost and found -------------------------------------------------------------

    def _lost(self, why: str) -> None:
        """The connection broke under us: carry on locally and reconnect."""
        self._close()
        assert self._up is not None and self._emptied is not None
        self._up.clear()
        if self.state is State.CONNECTED:
            logger.warning("lost the broker at %s (%s); reconnecting", self.address, why)
            self.state = State.RECONNECTING
            self.redial.lost()
            if self._redialer is None:
                assert self._loop is not None
                self._redialer = contextvars.Context().run(
                    self._loop.create_task, self._reconnect()
                )
        self._keep_unsent()
        self._emptied.set()

    def hurry(self) -> bool:
        """If reconnecting, try at once; True if it does."""
        if self.state is not State.RECONNECTING or self.sock is not None:
            return False
        assert self._hurried is not None
        self.redial.hurry()
        self._hurried.set()
        return True

    async def _reconnect(self) -> None:
        """Dial again, backing off, until connected or offline."""
        assert self._hurried is not None
        try:
            while self.state is State.RECONNECTING and self.sock is None:
                if not self.redial.due():
                    self._hurried.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._hurried.wait(), self.redial.wait() + 0.001)
                    continue
                self.redial.dialing = True
                try:
                    dialed = await dial_async(
                        self.address, self.authkey, self.credentials, self.timeout
                    )
                except Exception as exc:
                    # A wrong key too: a restarted broker listens before it writes
                    # its new key to the credentials file, read again next time.
                    # Whatever it is, the next attempt may do better.
                    if not isinstance(exc, DIAL_ERRORS):
                        logger.warning("reconnection failed: %s", reason(exc))
                    self.redial.failed(exc)
                    continue
                finally:
                    self.redial.dialing = False
                if self.state is not State.RECONNECTING:  # disconnected meanwhile
                    dialed.sock.close()
                    return
                self.state = State.CONNECTED
                self._install(dialed)
                if self.sock is not None:
                    logger.warning("reconnected to the broker at %s", self.address)
                    self._hand_over(self.redial.take(self.limits))
        finally:
            if self._redialer is asyncio.current_task():
                self._redialer = None

    async def wait_up(self, timeout: float) -> None:
        """Wait up to *timeout* s for a connection (or for disconnect())."""
        assert self._up is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), max(0.0, timeout))

    # --- out ----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Send one PUB frame with the others of this turn of the loop (never waits).

        Kept for the next connection while reconnecting; BufferError while
        more than MAX_UNSENT bytes wait for a broker that does not read.
        """
        sock = self.sock
        if sock is None:
            self._keep(frame)
            return
        outbox = self.outbox
        now = time.monotonic()
        burst = now - self._last_send < BURST_WINDOW
        self._last_send = now
        if not (burst or outbox.batched or outbox):  # a lone publish: at once
            self._send_now(sock, frame)
            return
        if outbox.size + outbox.batched_size > MAX_UNSENT:
            raise BufferError(
                f"{outbox.size + outbox.batched_size} bytes wait for a broker that does not "
                "read them: await flush() to let it catch up"
            )
        if outbox.batch(frame) >= _WRITE_AT:
            self.write_batch()
        elif not self._scheduled:
            assert self._loop is not None
            self._scheduled = True
            self._loop.call_soon(self.write_batch)

    def write_batch(self) -> None:
        """Send the batched publishes."""
        self._scheduled = False
        self._hand_over(self.outbox.take_batch())

    def write(self, *parts: bytes) -> None:
        """Send *parts*, frames other than PUB, after everything published before."""
        self.write_batch()
        self._queue_out((parts, (), sum(map(len, parts))))

    def _queue_out(self, chunk: Chunk, sent: int = 0) -> None:
        if self.sock is None:
            return  # lost: the pub-sub sends its subscriptions again on reconnection
        self.outbox.add(chunk, sent)
        self._push()

    def _push(self) -> None:
        """Send what the socket takes; have the loop watch for room if it did not take all."""
        sock = self.sock
        if sock is None:
            return
        assert self._emptied is not None
        try:
            done = self.outbox.push(sock)
        except OSError as exc:
            self._lost(reason(exc))
            return
        self._watch_writing(not done)
        if done:
            self._emptied.set()
        else:
            self._emptied.clear()

    def _writable(self) -> None:
        self._push()

    async def drain(self, timeout: Optional[float]) -> bool:
        """Send what is batched, and wait up to *timeout* s while anything waits to be
        sent (or until the connection is lost); False if the time ran out first."""
        self.write_batch()
        if self.sock is None or not self.outbox:
            return True
        assert self._emptied is not None
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # --- requests and what comes in -----------------------------------------------------

    async def ask(self, kind: int, request: bytes, first: Callable[[], None]) -> Optional[bytes]:
        """Send *request* after everything pending; await the broker's answer of *kind*.

        As the threaded Requests.ask: *first* runs before anything is sent; a
        reconnection under way is hurried once and awaited; a connection lost
        meanwhile is made again and asked again; None if the broker stays out
        of reach (or the pub-sub is not connected); TimeoutError past the
        link's timeout.
        """
        if self.state is State.OFFLINE:  # out of reach, as the threaded client says
            first()
            return None
        self._check_loop()
        assert self._loop is not None
        deadline = time.monotonic() + self.timeout
        hurry = True  # once: a broker that cuts each connection gets the backoff after
        while True:
            if (hurry and self.hurry()) or self.state is State.RECONNECTING:
                await self.wait_up(deadline - time.monotonic())
            hurry = False
            first()
            if self.sock is None:
                return None
            ticket = self.inbox.ask(kind)
            answer: asyncio.Future[bytes] = self._loop.create_future()
            self._answers[kind, ticket] = answer
            self.write(request)
            try:
                reply = await asyncio.wait_for(answer, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if self._paused:  # the pub-sub is too far behind to read it
                    raise TimeoutError(
                        "the broker's answer is behind more messages than the subscribers "
                        f"have taken ({MAX_INBOX} bytes)"
                    ) from None
                raise TimeoutError("the broker did not answer in time") from None
            finally:
                self._answers.pop((kind, ticket), None)
            if reply is not _LOST:
                return reply
            if self.state is not State.RECONNECTING or time.monotonic() >= deadline:
                return None

    def _readable(self) -> None:
        """The socket has bytes: read them, answer the requests, hand the messages over."""
        sock = self.sock
        if sock is None:
            return
        lost = self.inbox.read(sock)
        for (kind, ticket), answer in self._answers.items():
            reply = self.inbox.answer(kind, ticket)
            if reply is not None and not answer.done():
                answer.set_result(reply)
        frames = self.inbox.messages()
        if frames and self._on_frames is not None:
            on_frames = self._on_frames()
            if on_frames is not None:
                on_frames(frames)
        if lost and self.sock is sock:
            self._lost(lost)
