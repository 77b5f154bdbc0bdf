"""Topics in their spellings: as callers give them, as tuples, as a shell writes them."""

from __future__ import annotations

from typing import Tuple

from ._types import Topic


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


def parse_topic(text: str) -> Tuple[str, ...]:
    """``a/b/c`` is ``('a', 'b', 'c')``; ``/`` (or nothing) is the catch-all ``()``.

    How the mpubsub command and mpubsubd.conf write topics.
    """
    text = text.strip("/")
    return tuple(text.split("/")) if text else ()


def format_topic(topic: Tuple[str, ...]) -> str:
    """A topic as parse_topic reads it: ``a/b/c``, and ``/`` for the catch-all."""
    return "/".join(topic) or "/"
