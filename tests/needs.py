"""What some tests need beyond Python and this checkout, and what installs it.

A test whose need is missing skips with ``Need.reason``; ``make test`` ends
with one line naming each such group and what would run it (the README has
the list). In CI (``CI=true``) such a skip fails instead: a green run must
not hide, say, the whole federation suite.
"""

from __future__ import annotations

import os
import shutil
from typing import NamedTuple

import pytest


class Need(NamedTuple):
    """Something a group of tests needs: the group, and how to install it."""

    group: str
    install: str

    def reason(self) -> str:
        return f"{self.group} ({self.install})"

    def check(self, *present: object) -> None:
        """Skip the calling test unless every one of *present* is true."""
        if not all(present):
            pytest.skip(self.reason())


NATS = Need("federation through NATS", "apt-get install nats-server")
OPENSSL = Need("federation over TLS", "apt-get install openssl")
DEBIAN_PYTHON = Need("make install", "apt-get install python3 python3-pip")
LIMITS = Need("descriptor limits", "apt-get install util-linux")
OTHER_USERS = Need("other users", "run as root; apt-get install util-linux python3")
SYSTEMD = Need("the systemd unit", "apt-get install systemd util-linux")
LOGROTATE = Need("logrotate's configuration", "run as root; apt-get install logrotate")
OTHER_PYTHONS = Need("other Pythons' handshakes", "pyenv install 3.9 3.12 3.13: not in Debian 12")
SANDBOX = Need("the unit under systemd", "SYSTEMD_SANDBOX=the shared systemd-sandbox tool")


def check_other_users() -> None:
    """Skip the calling test unless it can run Debian's Python as nobody."""
    OTHER_USERS.check(as_root(), which("setpriv"), os.path.exists("/usr/bin/python3"))


def which(*commands: str) -> bool:
    """True if every one of *commands* is on PATH."""
    return all(shutil.which(command) for command in commands)


def as_root() -> bool:
    return os.geteuid() == 0


def in_ci() -> bool:
    return os.environ.get("CI") == "true"
