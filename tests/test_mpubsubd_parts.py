"""mpubsubd's parts on their own: the journal's priorities, what the bridge's user may
read, a SIGHUP storm's one reload, with real files and a real (unstarted) Broker."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, List

import pytest

from mpubsub import Broker
from mpubsubd._config import Config, unreadable
from mpubsubd._daemon import _Service
from mpubsubd._logging import _JournalFormatter
from mpubsubd._privileges import Root

from . import needs


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ],
)
def test_journal_priority_of_each_level(level: int, prefix: str) -> None:
    record = logging.LogRecord("mpubsubd", level, __file__, 1, "said", None, None)
    assert _JournalFormatter().format(record) == f"{prefix}{logging.getLevelName(level)} " + (
        "mpubsubd: said"
    )


def test_every_line_of_a_traceback_carries_the_priority() -> None:
    """The journal takes each line as an entry of its own: each needs its <N>."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "mpubsubd", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    lines = _JournalFormatter().format(record).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines


def test_what_the_bridges_user_may_read(tmp_path: Path) -> None:
    """unreadable(): owner, group and other bits, as the kernel would judge them for nobody."""
    needs.OTHER_USERS.check(needs.as_root())
    path = tmp_path / "ca.pem"
    path.write_text("x")
    path.chmod(0o640)
    os.chown(path, 0, 65534)  # root:nogroup: nobody reads it through its group
    assert unreadable(str(path), "nobody") == ""
    os.chown(path, 0, 0)
    assert "cannot be read by user nobody" in unreadable(str(path), "nobody")
    os.chown(path, 65534, 0)
    path.chmod(0o600)  # its own
    assert unreadable(str(path), "nobody") == ""
    path.chmod(0o604)  # others may
    os.chown(path, 0, 0)
    assert unreadable(str(path), "nobody") == ""
    assert unreadable(str(tmp_path), "") == f"{tmp_path} is not a regular file"


def test_sighups_before_a_reload_runs_make_one_reload(tmp_path: Path) -> None:
    """Three SIGHUPs, one reload scheduled; once it ran, the next SIGHUP schedules another."""
    config_file = tmp_path / "mpubsubd.conf"
    config_file.write_text("[mpubsubd]\n")
    config = Config()
    broker = Broker(str(tmp_path / "s"), b"k" * 16)
    scheduled: List[Callable[[], None]] = []
    broker.schedule = scheduled.append  # type: ignore[method-assign,assignment]  # run by hand
    try:
        service = _Service(
            config,
            (str(config_file), "", []),
            broker,
            Root(config, str(config_file), "", os.getpid()),
            None,
        )
        for _ in range(3):
            service.hangup()
        assert len(scheduled) == 1
        scheduled.pop()()  # the reload runs
        service.hangup()
        assert len(scheduled) == 1
    finally:
        broker.close()
