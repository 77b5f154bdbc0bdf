"""What mpubsubd keeps of root once it serves as its own user, and the drop itself.

mpubsubd starts as root: it reads its keys, binds, writes the root-owned
credentials file and takes the pidfile. Then, with ``user =`` set, it
serves as that user, and only a small process it forks first stays root,
the *keeper* (as sshd's monitor or nginx's master). The keeper takes no
input from anyone but the broker process, and of it only four requests,
none with an argument: re-read the configuration (``reload``: the file is
root's, mode 0640, and the group of the socket and credentials may change),
open the log file (``log``: after logrotate), remove the broker's files
(``stop``, at the end) and nothing else. A compromised broker process can
make it do no more than what a SIGHUP or a stop would.

Without ``user =`` (or as a user other than root), ``Root`` does the same
in the broker's own process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import signal
import socket
import stat
from typing import List, Optional, Tuple

from mpubsub._for_mpubsubd import reason

from ._config import Config, FederationConfig, check
from ._logging import LogFileError, open_log_file
from ._pidfile import read_pid


@dataclasses.dataclass
class Reloaded:
    """What a reload read: the new configuration, or the problems that refused it."""

    config: Optional[Config]
    problems: List[str]
    warnings: List[str]  # what the new configuration asked and could not be done

    def to_json(self) -> bytes:
        config = dataclasses.asdict(self.config) if self.config is not None else None
        return json.dumps([config, self.problems, self.warnings]).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Reloaded:
        config, problems, warnings = json.loads(data)
        if config is not None:
            config = Config(**{**config, "federation": FederationConfig(**config["federation"])})
        return cls(config, problems, warnings)


class Root:
    """The work that needs root once mpubsubd serves, done in the calling process."""

    def __init__(self, config: Config, path: Optional[str], instance: str, pid: int) -> None:
        self._started = config  # its files stay where they were made, whatever a reload says
        self._gid = config.gid
        self._log_file = config.log_file
        self._path, self._instance = path, instance
        self._pid = pid  # the broker process, whose pidfile is removed at the end

    def reload(self) -> Reloaded:
        """Read the configuration again; give the socket and credentials their new group."""
        config, problems = check(self._path, self._instance)
        if config is None or problems:
            return Reloaded(None, problems, [])
        warnings = []
        if config.gid != self._gid:
            try:
                self._regroup(self._gid, config.gid)
                self._gid = config.gid
            except OSError as exc:
                warnings.append(
                    f"cannot give the broker's files to group {config.group!r}: {reason(exc)}"
                )
        self._log_file = config.log_file
        return Reloaded(config, [], warnings)

    def open_log(self) -> int:
        """A descriptor of the log file (as last read), appending; made 0640 if missing."""
        return open_log_file(self._log_file)

    def remove_files(self) -> List[str]:
        """Remove the socket, the credentials and our pidfile; what could not be removed."""
        started = self._started
        paths = [started.credentials]
        address = started.broker_address
        if isinstance(address, str) and not address.startswith("\0"):
            paths.append(address)
        if read_pid(started.pidfile) == self._pid:  # not a pidfile someone put in its place
            paths.append(started.pidfile)
        failed = []
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(f"cannot remove {path}: {reason(exc)}")
        return failed

    def _regroup(self, old: Optional[int], new: Optional[int]) -> None:
        """The socket and credentials to group *new* (root only: None), as a start does."""
        started = self._started
        address = started.broker_address
        files = [(started.credentials, 0o640, 0o600)]
        if isinstance(address, str) and not address.startswith("\0"):
            files.append((address, 0o660, 0o600))
        for path, shared, private in files:
            os.chown(path, -1, 0 if new is None else new, follow_symlinks=False)
            os.chmod(path, private if new is None else shared, follow_symlinks=False)
        # Directories mpubsubd made for the old group (0750 root:OLD) follow it.
        for directory in sorted({os.path.dirname(path) for path, _, _ in files}):
            info = os.lstat(directory)
            if old is not None and stat.S_ISDIR(info.st_mode) and info.st_gid == old:
                os.chown(directory, -1, 0 if new is None else new, follow_symlinks=False)
                os.chmod(directory, 0o755 if new is None else 0o750)


class Keeper:
    """A forked process that stays root and does a Root's work when the broker asks."""

    def __init__(self, root: Root) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # the keeper
            code = 1
            try:
                ours.close()
                _keep(root, theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._sock = ours

    def reload(self) -> Reloaded:
        data, _ = self._ask("reload")
        return Reloaded.from_json(data)

    def open_log(self) -> int:
        data, fds = self._ask("log")
        if not fds:
            raise LogFileError(data.decode(errors="replace"))
        return fds[0]

    def remove_files(self) -> List[str]:
        data, _ = self._ask("stop")
        failed: List[str] = json.loads(data)
        return failed

    def close(self) -> None:
        """Let the keeper go (it exits when this end closes) and reap it."""
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def _ask(self, request: str) -> Tuple[bytes, List[int]]:
        try:
            self._sock.sendall(request.encode())
            data, fds, _, _ = socket.recv_fds(self._sock, 1 << 20, 1)
        except OSError as exc:
            raise OSError(f"mpubsubd's keeper (pid {self.pid}) is gone: {reason(exc)}") from None
        if not data:
            raise OSError(f"mpubsubd's keeper (pid {self.pid}) is gone")
        return data, fds


def _keep(root: Root, sock: socket.socket) -> None:
    """The keeper's life: answer the broker process until it closes its end."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # it ends when the broker process does
    keep = sock.fileno()
    # Nothing of the broker's stays open here: a listener kept by the keeper would
    # leave clients waiting on a broker that is gone.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while True:
        request = sock.recv(64)
        if request == b"reload":
            sock.sendall(root.reload().to_json())
        elif request == b"log":
            try:
                fd = root.open_log()
            except LogFileError as exc:
                sock.sendall(str(exc).encode())
            else:
                socket.send_fds(sock, [b"ok"], [fd])
                os.close(fd)
        elif request == b"stop":
            sock.sendall(json.dumps(root.remove_files()).encode())
        else:  # the broker process closed its end (b""), or is not itself
            return


def drop_to(account: pwd.struct_passwd) -> None:
    """Become *account* for good: its uid, its group and supplementary groups."""
    os.initgroups(account.pw_name, account.pw_gid)
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
