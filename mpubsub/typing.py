"""Type aliases shared by the public API (the same names as mpubsub 0.0.1)."""

from ._types import Message, Subscriber, Topic

__all__ = ["Message", "Subscriber", "Topic"]
