"""Tests for mpubsubd._handover: the bridge gets its keys only once it proved itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mpubsubd._handover import hand_over

from .conftest import ROOT


def test_keys_go_to_the_process_that_made_the_channel() -> None:
    """The channel sent back must have been made by the child named: else no keys."""
    control, theirs = socket.socketpair()
    with control, theirs:
        mine, sent = socket.socketpair()  # made by this process, as an impostor's would be
        with mine:
            with sent:
                socket.send_fds(theirs, [b"k"], [sent.fileno()])
            with pytest.raises(ValueError, match=r"the channel came from pid \d+, not from"):
                hand_over(control, os.getpid() + 1, {"secret": "00"}, [])
            mine.settimeout(5)
            assert mine.recv(16) == b""  # nothing was sent, and it is closed


def test_a_child_takes_over_its_settings_and_descriptors() -> None:
    """A real child: take_over() sends back a pair of its own; settings and a descriptor
    arrive (that it is no longer dumpable, test_systemd's federation test shows)."""
    code = (
        "import json, os, sys\n"
        "from mpubsubd._handover import take_over\n"
        "settings, fds = take_over(int(sys.argv[1]))\n"
        "os.write(fds[0], json.dumps(settings).encode())\n"
    )
    control, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    with control:
        with theirs:
            child = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        control.settimeout(30)
        hand_over(control, child.pid, {"secret": "00ff"}, [write_end])
    os.close(write_end)
    assert child.wait(30) == 0
    with os.fdopen(read_end, "rb") as pipe:
        assert json.loads(pipe.read()) == {"secret": "00ff"}
