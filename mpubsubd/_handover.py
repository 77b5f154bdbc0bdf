"""How mpubsubd hands its bridge child the keys and the broker's connection.

The bridge runs as mpubsubd's user. A process just started is dumpable
until it says otherwise, so another process of that user could read what
sits in its pipes and descriptors meanwhile. So the bridge is started
with nothing but a control socket; it makes itself non-dumpable, makes a
socket pair of its own and sends one end back; mpubsubd checks that the
kernel says the bridge made that pair (SO_PEERCRED), and only then sends
the settings, with the broker's connection and the log pipe, over it.
Another process that grabbed the control socket early can only make the
check fail: the bridge is then stopped and started again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import struct
from typing import Any, Dict, List, Sequence, Tuple

_PR_SET_DUMPABLE = 4  # linux/prctl.h
_MAX_SETTINGS = 16 * 1024 * 1024


def not_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): other processes of this user may no longer read this
    one's memory or descriptors (a setuid process like mpubsubd's broker is so already)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: its own rules hold
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def hand_over(
    control: socket.socket, pid: int, settings: Dict[str, Any], fds: Sequence[int]
) -> None:
    """mpubsubd's side: send *settings* and *fds* to the child *pid*, once it proved itself
    on *control* (ValueError, or OSError, if it did not)."""
    _, got, _, _ = socket.recv_fds(control, 1, 1)
    if len(got) != 1:
        for fd in got:
            os.close(fd)
        raise ValueError("no channel came back from the bridge")
    with socket.socket(fileno=got[0]) as private:
        maker = struct.unpack("3i", private.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if maker[0] != pid:
            raise ValueError(f"the channel came from pid {maker[0]}, not from the bridge")
        socket.send_fds(private, [b"{"], list(fds))
        private.sendall(json.dumps(settings).encode()[1:])


def take_over(control_fd: int) -> Tuple[Dict[str, Any], List[int]]:
    """The child's side, called first thing: become non-dumpable, prove itself, and
    receive the settings and descriptors."""
    not_dumpable()
    for fd in (0, 1, 2):  # a classic daemon starts it with them closed: fill them, so
        try:  # that no descriptor received takes one's place (and stderr's, later)
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    ours, theirs = socket.socketpair()
    with socket.socket(fileno=control_fd) as control, theirs:
        socket.send_fds(control, [b"k"], [theirs.fileno()])
    with ours:
        data, fds, _, _ = socket.recv_fds(ours, 64 * 1024, 4)
        chunks = [data]
        size = len(data)
        while size <= _MAX_SETTINGS:
            chunk = ours.recv(64 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    settings: Dict[str, Any] = json.loads(b"".join(chunks))
    return settings, fds
