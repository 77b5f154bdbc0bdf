"""Reading a pidfile without trusting it: no link followed, no fifo waited on."""

from __future__ import annotations

import os
import stat
from typing import Optional

_PID_LIMIT = 1 << 22  # Linux's PID_MAX_LIMIT: every pid is below it


def read_pid(path: str) -> Optional[int]:
    """The pid in the regular file *path*; None for anything else, never blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return pid_in(os.read(fd, 64)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def pid_in(text: bytes) -> Optional[int]:
    """The pid *text* holds (ASCII digits, blanks around), or None if it holds no pid."""
    digits = text.strip()
    pid = int(digits) if digits.isdigit() else 0  # bytes.isdigit(): ASCII digits only
    return pid if 0 < pid < _PID_LIMIT else None
