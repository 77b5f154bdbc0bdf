"""A bounded memo: the one cache shape used on every hot path of mpubsub."""

from __future__ import annotations

from typing import Callable, Dict, Optional, TypeVar

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_MAX_BYTES = 1024 * 1024


class Memo(Dict[K, V]):
    """A dict that computes a missing value with *compute* and keeps it.

    Past *limit* entries, or past *max_bytes* as *weigh* counts each entry
    (when given), it starts afresh, so memory stays bounded however many
    distinct keys go by, whatever their size. A hit is a plain dict lookup
    (no Python call); if *compute* raises, nothing is kept.
    """

    __slots__ = ("compute", "limit", "max_bytes", "size", "weigh")

    def __init__(
        self,
        compute: Callable[[K], V],
        limit: int = 4096,
        *,
        weigh: Optional[Callable[[K, V], int]] = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__()
        self.compute = compute
        self.limit = limit
        self.weigh = weigh
        self.max_bytes = max_bytes
        self.size = 0  # what weigh counted for the entries kept

    def __missing__(self, key: K) -> V:
        value = self.compute(key)
        if len(self) >= self.limit or self.size > self.max_bytes:
            self.clear()
        self[key] = value
        if self.weigh is not None:
            self.size += self.weigh(key, value)
        return value

    def clear(self) -> None:
        super().clear()
        self.size = 0
