"""Where mpubsubd's lines go: the journal (stderr) or a log file that logrotate rotates.

Shared by the daemon and its bridge child, which logs the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from io import TextIOWrapper

from mpubsub._for_mpubsubd import reason

_FILE_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
_JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and pid


class LogFileError(Exception):
    """The log file cannot be opened; the message is the one line the user sees."""


def open_log_file(path: str) -> int:
    """A descriptor appending to the log file *path*, made 0640 if missing.

    A symbolic link at *path* is refused (LogFileError), never followed, and so
    is anything but a regular file (a fifo put there must not stall the broker).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o640)
    except OSError as exc:
        why = "a symbolic link, not followed" if exc.errno == errno.ELOOP else reason(exc)
        raise LogFileError(f"cannot open log_file {path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogFileError(f"cannot open log_file {path}: not a regular file")
    return fd


def log_file_handler(path: str) -> LogFile:
    """Lines with time and pid appended to *path* (see open_log_file)."""
    return LogFile(open_log_file(path))


class LogFile(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines with time and pid appended to a log file, which ``use()`` replaces.

    mpubsubd gives it a new descriptor at SIGHUP (logrotate renamed the
    file): opened by root, so the broker needs no right to the log's
    directory once it serves as its own user.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(_text(fd))
        self.setFormatter(logging.Formatter(_FILE_FORMAT))

    def use(self, fd: int) -> None:
        """Append to *fd* from now on (the handler owns it), closing the file before."""
        old = self.setStream(_text(fd))
        if old is not None:
            old.close()

    def write_line(self, line: str) -> None:
        """*line* as it is: a line another process (the bridge) formatted already."""
        self.acquire()
        try:
            try:
                self.stream.write(line if line.endswith("\n") else line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # the disk is full, say: lose the line, not the broker
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream is not None and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


def _text(fd: int) -> TextIOWrapper:
    return open(fd, "a", encoding="utf-8", errors="backslashreplace")


def stderr_handler(*, file_format: bool = False) -> logging.Handler:
    """Lines for the journal, which adds the time and the pid itself (with *file_format*,
    lines as the log file has them, for a process whose stderr mpubsubd copies there).

    When stderr is the journal's stream, each line starts with its syslog
    priority (``<4>`` for a WARNING), which journald takes as the line's
    priority, so ``journalctl -p warning`` shows warnings and worse.
    """
    handler = logging.StreamHandler(sys.stderr)
    if file_format:
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    elif to_journal():
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(_JOURNAL_FORMAT))
    return handler


# syslog's priorities (sd-daemon(3)) of logging's levels, highest level first.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class _JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        # Every line of a traceback is a journal entry of its own: each gets it.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def to_journal() -> bool:
    """True when stderr is the journal's stream (systemd sets JOURNAL_STREAM to its device
    and inode, as systemd.exec(5) says), so lines may carry a priority prefix."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, AttributeError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def use_handler(handler: logging.Handler, level: str) -> None:
    """Send every log record of *level* and above to *handler* only."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
