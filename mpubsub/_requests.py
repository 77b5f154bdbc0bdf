"""A request to the broker (PING, STATS) and the wait for its answer, over a Link.

The broker answers requests in order; the Inbox matches each answer to its
request by ticket. A request waits for a reconnection under way, and makes
the connection again if it finds it broken: all within the link's timeout.
"""

from __future__ import annotations

import enum
import time
from typing import Callable, Optional, Union

from ._inbox import MAX_INBOX
from ._link import Link, State


class _Lost(enum.Enum):
    """The connection broke while a request waited for its answer."""

    LOST = "lost"


_LOST = _Lost.LOST


class Requests:
    """Requests over one link, from any thread."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def ask(self, kind: int, request: bytes, first: Callable[[], None]) -> Optional[bytes]:
        """Send *request* after everything pending; wait for the broker's answer of *kind*.

        *first* runs under the lock before anything is sent. While
        reconnecting, the writer tries at once, and this waits for it: all
        of it within the timeout. A connection found broken by the request
        itself is made again the same way, and asked again. None if the
        broker is still out of reach.
        """
        link = self._link
        deadline = time.monotonic() + link.timeout  # for the reconnections and the reply
        hurry = True  # once: a broker that cuts each connection gets the backoff after
        while True:
            answer = self._ask_once(kind, request, first, deadline, hurry)
            hurry = False
            if answer is not _LOST:
                return answer
            with link.lock:
                if link.state is not State.RECONNECTING or time.monotonic() >= deadline:
                    return None

    def _ask_once(
        self, kind: int, request: bytes, first: Callable[[], None], deadline: float, hurry: bool
    ) -> Union[bytes, _Lost, None]:
        link = self._link
        if (hurry and link.hurry()) or link.state is State.RECONNECTING:
            link.wait_up(max(0.0, deadline - time.monotonic()))
        with link.lock:
            first()
            sock = link.sock
            if sock is None:
                return None
            link.write_batch()
            ticket = link.inbox.ask(kind)
            link.write(request)
        while True:
            with link.lock:
                if link.sock is not sock:
                    return _LOST  # and what it answered with it
                answer = link.inbox.answer(kind, ticket)
                if answer is not None:
                    return answer
                if link.inbox.full:
                    raise TimeoutError(
                        "the broker's answer is behind more messages than poll() has taken "
                        f"({MAX_INBOX} bytes): poll() first"
                    )
                writing = bool(link.outbox)  # the request itself, maybe
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the broker did not answer in time")
            link.await_socket(sock, remaining, writing)
