"""Tests for mpubsub._memo: the bounded memo of every hot path."""

from __future__ import annotations

from mpubsub._memo import Memo


def test_entries_are_bounded_exactly() -> None:
    """At its limit the memo starts afresh with the new entry; below, it keeps everything."""
    memo: Memo[int, int] = Memo(lambda n: n * 2, limit=3)
    for n in range(3):
        assert memo[n] == 2 * n
    assert len(memo) == 3
    assert memo[3] == 6
    assert dict(memo) == {3: 6}


def test_bytes_are_bounded_and_clear_forgets_them() -> None:
    """Past max_bytes (as weigh counts) it starts afresh; clear() resets the count."""
    memo: Memo[str, str] = Memo(str.upper, weigh=lambda k, v: len(k) + len(v), max_bytes=10)
    memo["abc"]
    memo["defg"]
    assert memo.size == 14 and len(memo) == 2
    memo["h"]  # over 10 bytes: afresh
    assert dict(memo) == {"h": "H"} and memo.size == 2
    memo.clear()
    assert memo.size == 0 and not memo
