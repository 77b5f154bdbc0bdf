"""What a NetPubSub is subscribed to at its broker, kept in step with its subscribers.

No I/O: given what changed among the local subscriptions, ``update``
returns the SUB and UNSUB frames that bring the broker in step, within its
caps (topics over them stay local, with a WARNING).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Set, Tuple

from . import _protocol as proto

logger = logging.getLogger("mpubsub.net")

#: A topic whose last element is this is delivered locally only.
LOCAL_SUFFIX = "*local"

# Subscribed to at the broker for broadcasts only (see RemoteTopics._broadcasts).
BROADCASTS = proto.encode_topic((LOCAL_SUFFIX,))
# Subscription changes remembered one by one; past it, all are sent again.
_MAX_CHANGED = 1000


def is_local(topic: Tuple[str, ...]) -> bool:
    """True for a topic that never leaves its pub-sub."""
    return bool(topic) and topic[-1] == LOCAL_SUFFIX


class RemoteTopics:
    """The encoded topics subscribed to at the broker, and the changes not yet sent."""

    def __init__(self) -> None:
        self.unsent = False  # a change waits for the broker to hear of it
        self._changed: Set[Tuple[str, ...]] = set()  # topics to tell the broker about
        self._resync = True  # tell it every topic instead
        self.topics: Set[bytes] = set()
        self._bytes = 0  # the bytes of the topics

    def note(self, topic: Optional[Tuple[str, ...]]) -> None:
        """*topic*'s subscribers changed (None: any topic's)."""
        if topic is None or len(self._changed) >= _MAX_CHANGED:
            self._resync = True
            self._changed.clear()
        elif not self._resync:
            self._changed.add(topic)
        self.unsent = True

    def new_connection(self) -> None:
        """A new broker knows nothing: every topic is to be sent."""
        self.topics, self._bytes = set(), 0
        self._resync = True

    def changes(
        self, everything: Callable[[], Set[Tuple[str, ...]]]
    ) -> Tuple[bool, Set[Tuple[str, ...]]]:
        """Take what changed: (resync, the topics to look at), all of them if resync."""
        self.unsent = False
        resync, self._resync = self._resync, False
        changed, self._changed = self._changed, set()
        topics = everything() if resync else changed
        return resync, {t for t in topics if not is_local(t)}

    def update(
        self,
        resync: bool,
        wanted: Set[bytes],
        unwanted: Set[bytes],
        anyone: bool,
        limits: proto.Limits,
    ) -> bytes:
        """The frames that tell the broker: subscribe *wanted* and not *unwanted* (or,
        after a resync, nothing but *wanted*); *anyone*: someone subscribes here."""
        gone = self.topics - wanted - {BROADCASTS} if resync else unwanted & self.topics
        self.topics -= gone
        self._bytes -= sum(map(len, gone))
        new = self._fitting(wanted - self.topics, limits)
        self._broadcasts(gone, new, anyone)
        # UNSUB first: the broker counts them against its caps in order.
        frames = [proto.frame(proto.UNSUB, t) for t in gone]
        frames += [proto.frame(proto.SUB, t) for t in new]
        return b"".join(frames)

    def _broadcasts(self, gone: Set[bytes], new: Set[bytes], anyone: bool) -> None:
        """Subscribe to BROADCASTS while only *local topics have subscribers here.

        The broker sends a broadcast only to clients subscribed to something;
        without a topic to travel, this pub-sub's local subscribers would miss
        broadcasts. Nothing is published to BROADCASTS itself (a topic
        ending in '*local' never leaves its pub-sub), so it brings broadcasts
        only. *gone* and *new* get the UNSUB or SUB it takes.
        """
        # With no topic that travels subscribed, any subscriber is a local one.
        others = len(self.topics) - (BROADCASTS in self.topics)
        wanted = not others and anyone
        if wanted and BROADCASTS not in self.topics:
            self.topics.add(BROADCASTS)
            self._bytes += len(BROADCASTS)
            new.add(BROADCASTS)
        elif not wanted and BROADCASTS in self.topics:
            self.topics.discard(BROADCASTS)
            self._bytes -= len(BROADCASTS)
            gone.add(BROADCASTS)

    def check_room(self, encoded: bytes, limits: proto.Limits) -> None:
        """ValueError unless the broker takes one more subscription, to *encoded*."""
        if len(self.topics) >= limits.max_subscriptions:
            raise ValueError(
                f"more than {limits.max_subscriptions} topics subscribed to: "
                "the broker's limit (max_subscriptions)"
            )
        if self._bytes + len(encoded) > limits.max_subscription_bytes:
            raise ValueError(
                f"topics subscribed to over {limits.max_subscription_bytes} bytes: "
                "the broker's limit (max_subscription_bytes)"
            )

    def _fitting(self, topics: Set[bytes], limits: proto.Limits) -> Set[bytes]:
        """As many of *topics* as the broker takes beside ours (a WARNING for the rest)."""
        kept: Set[bytes] = set()
        for encoded in topics:
            try:
                self.check_room(encoded, limits)
            except ValueError as exc:
                logger.warning(
                    "%d topics not subscribed to at the broker: %s", len(topics) - len(kept), exc
                )
                return kept
            kept.add(encoded)
            self.topics.add(encoded)
            self._bytes += len(encoded)
        return kept
