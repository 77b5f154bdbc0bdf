"""What both NetPubSubs share, the threaded one and asyncio's: the pub-sub's side.

A client pub-sub keeps the broker in step with its subscriptions, turns
what it publishes into PUB frames, and turns the broker's frames back into
messages with their senders. How bytes move (threads or an event loop) is
its link's: ``_link.Link`` or ``_aiolink.AioLink``, which both hold
``lock``, ``sock``, ``limits``, ``inbox``, ``write()`` and the broker's
address.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, TypeVar, Union

from . import _protocol as proto
from ._credentials import read_credentials
from ._identity import Sender, awaited_sender, sender_of, set_sender
from ._inbox import describe_refusal
from ._memo import Memo
from ._pubsub import ErrorHandler, PubSub
from ._remote import RemoteTopics, is_local
from ._text import printable
from ._topics import as_topic
from ._types import Subscriber, Topic
from .errors import ProtocolError

logger = logging.getLogger("mpubsub.net")

#: Messages kept for the broker while reconnecting; past it the oldest go.
DEFAULT_MAX_QUEUED = 10_000

_C = TypeVar("_C", bound="Client")


class Client(PubSub):
    """A PubSub whose subscriptions and publishes travel through its link to a broker."""

    def __init__(
        self,
        address: Any,
        authkey: Optional[bytes] = None,
        *,
        timeout: float = 5.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        on_error: Optional[ErrorHandler] = None,
    ) -> None:
        super().__init__(on_error=on_error)
        self._link = self._new_link(address, authkey, timeout, max_queued)
        self._remote = RemoteTopics()
        self._encoded: Memo[Tuple[str, ...], bytes] = Memo(self._encode, weigh=_weigh)
        self._decoded: Memo[bytes, Tuple[str, ...]] = Memo(proto.decode_topic, weigh=_weigh)
        # How payloads from the broker become messages (the CLI restricts it).
        self._loads: Callable[[bytes], Any] = pickle.loads
        # Who sent the broker's next messages (its last SENDER frame), and the
        # senders it named lately: the broker names one again only on a change.
        self._sender: Optional[Sender] = None
        self._senders: Memo[bytes, Sender] = Memo(sender_of, weigh=lambda k, v: 2 * len(k) + 300)
        self._set_up()

    def _set_up(self) -> None:
        """What the subclass holds beside the link (called at the end of __init__)."""

    @classmethod
    def from_file(cls: Type[_C], path: Union[str, os.PathLike[str]], **kwargs: Any) -> _C:
        """A pub-sub for the broker whose ``(address, authkey)`` pickle is at *path*.

        The file is read again at each reconnection. It must be a regular
        file (not a symbolic link) owned by root or by the calling user, and
        not writable by group or others: otherwise CredentialsError (while
        reconnecting: one WARNING per outage, and no connection).
        """
        address, authkey = read_credentials(path)
        pubsub = cls(address, authkey, **kwargs)
        pubsub._link.credentials = path
        return pubsub

    # --- connection ----------------------------------------------------------

    def _new_link(
        self, address: Any, authkey: Optional[bytes], timeout: float, max_queued: int
    ) -> Any:
        """The link to the broker: a ``_link.Link`` or an ``_aiolink.AioLink``."""
        raise NotImplementedError

    def set_broker(self, address: Any, authkey: Optional[bytes] = None) -> None:
        """Use another broker from the next ``connect()``; RuntimeError while connected."""
        self._link.set_broker(address, authkey)

    @property
    def address(self) -> Any:
        """The broker's address (re-read from the credentials file at each reconnection)."""
        return self._link.address

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is up."""
        return self._link.sock is not None

    def _connected(self, limits_changed: bool) -> None:
        """A connection was made (the link's lock held): tell the broker our topics."""
        if limits_changed:
            self._encoded.clear()  # checked against other limits, or none
        self._remote.new_connection()
        self._sync_subscriptions()

    def _encode(self, topic: Tuple[str, ...]) -> bytes:
        """A topic's encoding; TypeError, or ValueError if over the broker's limits.

        Before the first connection, the broker's limits are not known: a
        topic over them stays local when it connects, with a WARNING.
        """
        encoded = proto.encode_topic(topic)
        if self._link.limits_known:
            self._link.limits.check_topic(encoded)
        return encoded

    # --- subscriptions -------------------------------------------------------

    def add_subscriber(self, topic: Topic, subscriber: Subscriber, *, weak: bool = True) -> None:
        """As PubSub.add_subscriber; the broker learns of new topics at once.

        TypeError if the topic cannot travel, ValueError if it is deeper or
        longer than the broker accepts, or if the broker would take no more
        subscriptions from this pub-sub (unless the topic is local).
        """
        topic = as_topic(topic)
        if is_local(topic):
            proto.encode_topic(topic)  # TypeError for the same topics as elsewhere
        else:
            encoded = self._encoded[topic]  # now, not when it travels
            if self._link.limits_known and encoded not in self._remote.topics:
                self._remote.check_room(encoded, self._link.limits)
        super().add_subscriber(topic, subscriber, weak=weak)
        self._sync_subscriptions()

    def remove_subscriber(self, topic: Topic, subscriber: Subscriber) -> None:
        """As PubSub.remove_subscriber; the broker learns of unused topics at once."""
        super().remove_subscriber(topic, subscriber)
        self._sync_subscriptions()

    def clear_subscribers(self) -> None:
        """As PubSub.clear_subscribers; the broker stops sending anything."""
        super().clear_subscribers()
        self._sync_subscriptions()

    def _subscriptions_changed(self, topic: Optional[Tuple[str, ...]]) -> None:
        # With PubSub's lock held. Garbage-collected subscribers change them too.
        self._remote.note(topic)

    def _sync_subscriptions(self) -> None:
        """Send the broker SUB/UNSUB for what changed (all topics after a reconnection)."""
        link = self._link
        with link.lock:
            if link.sock is None:
                self._remote.unsent = False
                return
            with self._lock:
                resync, topics = self._remote.changes(lambda: set(self._subscribed_topics()))
                present = {t for t in topics if self._has_subscribers(t)}
            wanted = self._encodings(present)
            unwanted = set() if resync else self._encodings(topics - present)
            frames = self._remote.update(
                resync, wanted, unwanted, self._has_any_subscribers(), link.limits
            )
            if frames:
                link.write(frames)

    def _encodings(self, topics: Set[Tuple[str, ...]]) -> Set[bytes]:
        """The encodings of *topics*, without those over the broker's limits."""
        encodings = set()
        for topic in topics:
            try:
                encodings.add(self._encoded[topic])
            except ValueError as exc:  # a new broker's lower limits: it stays local
                logger.warning("not subscribing to %r at the broker: %s", topic, exc)
        return encodings

    # --- publishing ------------------------------------------------------------

    def _pub_parts(self, topic: Tuple[str, ...], message: Dict[str, Any]) -> Tuple[bytes, bytes]:
        """A message's encoded topic and payload, or an error before anyone gets it:
        pickling's, or ValueError if it or its topic is larger than the broker accepts."""
        encoded = self._encoded[topic]
        payload = pickle.dumps(message, protocol=5)
        size = 4 + len(encoded) + len(payload)  # checked before framing copies it
        limit = self._link.limits.max_message
        if size > limit:
            raise ValueError(f"message of {size} bytes exceeds the broker's limit of {limit} bytes")
        return encoded, payload

    def _publish_here(self, topic: Tuple[str, ...], message: Dict[str, Any]) -> None:
        """Deliver to the local subscribers, with no sender: the message is not the
        broker's, even inside a delivery of one that is (a thread's, or a coroutine
        subscriber's context)."""
        previous = set_sender(None)
        token = awaited_sender.set(None)
        try:
            self._deliver_here(topic, message)
        finally:
            awaited_sender.reset(token)
            if previous is not None:
                set_sender(previous)

    def _deliver_here(self, topic: Tuple[str, ...], message: Dict[str, Any]) -> None:
        """Call the local subscribers of a publish made here."""
        PubSub.publish(self, topic, **message)

    def _raise_refusals(self) -> None:
        """PermissionError for what the broker refused since the last call, if anything."""
        with self._link.lock:
            refusals = self._link.inbox.refusals
            if not refusals:
                return
            first, more = describe_refusal(refusals[0]), len(refusals) - 1
            refusals.clear()
        extra = f" (and {more} more refused since the last flush)" if more else ""
        raise PermissionError(f"the broker refused to {first}{extra}")

    # --- receiving -----------------------------------------------------------

    def _runs(self, frames: List[bytes]) -> List[Tuple[Optional[Sender], List[bytes]]]:
        """*frames* cut into runs of messages of one sender each. What follows them
        (a nested poll's) is the last sender's until the broker names another."""
        runs: List[Tuple[Optional[Sender], List[bytes]]] = [(self._sender, [])]
        named = proto.SENDER
        for frame in frames:
            if frame[4] != named:
                runs[-1][1].append(frame)
                continue
            try:
                self._sender = self._senders[frame[5:]]
            except ProtocolError as exc:
                logger.error("the broker named a sender badly: %s", exc)
                self._sender = None
            runs.append((self._sender, []))
        return runs

    def _message_of(self, frame: bytes) -> Optional[Tuple[Tuple[str, ...], Any]]:
        """A PUB frame's topic and message (not yet known to be a mapping of strings);
        None, with an ERROR, if it cannot be decoded."""
        try:
            encoded, payload = proto.pub_parts(frame)
            topic = self._decoded[encoded]
            message = self._loads(payload)
        except Exception as exc:  # one bad message must not stop the others
            logger.error("dropping a message that cannot be decoded: %s", printable(str(exc)))
            return None
        return topic, message


def _weigh(key: Union[bytes, Tuple[str, ...]], value: Union[bytes, Tuple[str, ...]]) -> int:
    """What a memo entry of a topic and its encoding holds, roughly, in bytes."""
    encoded = value if isinstance(value, bytes) else key
    return 2 * len(encoded) + 200
