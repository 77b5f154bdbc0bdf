"""A bounded memo: the one cache shape used on every hot path of mpubsub."""

from __future__ import annotations

from typing import Callable, Dict, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Dict[K, V]):
    """A dict that computes a missing value with *compute* and keeps it.

    Past *limit* entries it starts afresh, so memory stays bounded however
    many distinct keys go by. A hit is a plain dict lookup (no Python call);
    if *compute* raises, nothing is kept.
    """

    __slots__ = ("compute", "limit")

    def __init__(self, compute: Callable[[K], V], limit: int = 4096) -> None:
        super().__init__()
        self.compute = compute
        self.limit = limit

    def __missing__(self, key: K) -> V:
        value = self.compute(key)
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
