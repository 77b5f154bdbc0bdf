"""Text for people: untrusted text made safe to print, errors said in a few words."""

from __future__ import annotations

import re

# What a terminal or a log reader may take for something else: C0 controls
# (newlines forge lines, ESC starts sequences that retitle or reprogram the
# terminal), DEL, C1 controls, the bidirectional marks, embeddings, overrides
# and isolates (they reorder what is shown), U+2028 and U+2029 (line and
# paragraph separators), lone surrogates (they cannot be encoded) and the
# backslash (so that every escape is unambiguous).
_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x5C:
        return "\\\\"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """*text* with every character that could disguise a line escaped; one line, always.

    C0 and C1 controls and DEL become ``\\xNN``; the bidirectional controls
    (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), the line
    and paragraph separators U+2028 and U+2029 and lone surrogates become
    ``\\uNNNN``; a backslash becomes two, so the result reads back without
    ambiguity. Everything else, other scripts included, is kept as it is:
    text without any of these characters is returned unchanged.
    """
    if text.isprintable() and "\\" not in text:  # the common case, at C speed
        return text
    return _UNSAFE.sub(_escape, text)


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the OS's reason, the message, or the type."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(
        exc
    ).__name__
