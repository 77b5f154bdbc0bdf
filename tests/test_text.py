"""Tests for mpubsub._text: untrusted text made safe for terminals and logs."""

from __future__ import annotations

import pytest

from mpubsub._text import printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text", "plain text"),
        ("back\\slash", "back\\\\slash"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("line\nbreak\r", "line\\x0abreak\\x0d"),
        ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),
        ("\u202eevil", "\\u202eevil"),
        ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\ud800", "\\ud800"),
        ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),
    ],
)
def test_what_could_fool_a_terminal_is_escaped(text: str, shown: str) -> None:
    """Controls, bidi overrides and isolates, separators, surrogates and backslash; nothing else."""
    assert printable(text) == shown
