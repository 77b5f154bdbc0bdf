"""Where mpubsubd's lines go: the journal (stderr) or a log file that logrotate rotates.

Shared by the daemon and its bridge child, which logs the same way.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import stat
import sys
from io import TextIOWrapper

from mpubsub._for_mpubsubd import reason

_FILE_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
_JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and pid


class LogFileError(Exception):
    """The log file cannot be opened; the message is the one line the user sees."""


def log_file_handler(path: str) -> logging.Handler:
    """Lines with time and pid in *path*, reopened when logrotate renamed it.

    A new log file is made 0640; an existing one keeps its mode. A symbolic link at
    *path* is refused (LogFileError), never followed.
    """
    try:
        handler = _LogFile(path)
    except OSError as exc:
        why = "a symbolic link, not followed" if exc.errno == errno.ELOOP else reason(exc)
        raise LogFileError(f"cannot open log_file {path}: {why}") from None
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    return handler


class _LogFile(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that makes its file 0640 and never opens it through a link.

    A log file that cannot be opened again (after logrotate, say) loses
    lines, not the daemon: each line tries again.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:  # FileHandler.emit opens the file unguarded
            self.handleError(record)

    def _open(self) -> TextIOWrapper:
        # Also called when a SIGHUP after logrotate makes the file anew: 0640 again,
        # and a link planted in its place meanwhile is not followed either.
        # O_NONBLOCK: a fifo put there must not stall the broker (refused below).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags | os.O_NONBLOCK, 0o640)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


def stderr_handler() -> logging.Handler:
    """Lines for the journal, which adds the time and the pid itself."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_JOURNAL_FORMAT))
    return handler


def use_handler(handler: logging.Handler, level: str) -> None:
    """Send every log record of *level* and above to *handler* only."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
