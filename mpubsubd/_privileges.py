"""What mpubsubd keeps of root once it serves as its own user, and the drop itself.

mpubsubd starts as root: it reads its keys, binds, writes the root-owned
credentials file and takes the pidfile. Then, with ``user =`` set, it
serves as that user, and only a small process it forks first stays root,
the *keeper* (as sshd's monitor or nginx's master). The keeper takes no
input from anyone but the broker process, and of it only three requests,
lines of a few bytes with no argument: re-read the configuration
(``reload``: the file is root's, mode 0640, and the group of the socket
and credentials may change), open the log file (``log``: after
logrotate), remove the broker's files (``stop``, at the end; also done
when the broker process is gone without asking) and nothing else. A
compromised broker process can make it do no more than what a SIGHUP or a
stop would.

Without ``user =`` (or as a user other than root), ``Root`` does the same
in the broker's own process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pwd
import signal
import socket
import stat
import struct
from typing import Callable, List, Optional, Sequence, Tuple

from mpubsub._for_mpubsubd import Address, reason
from mpubsub.broker import Policy

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
        config = None
        if self.config is not None:
            config = {**dataclasses.asdict(self.config), "policy": self.config.policy.lines}
        return json.dumps([config, self.problems, self.warnings]).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Reloaded:
        config, problems, warnings = json.loads(data)
        if config is not None:
            config = Config(
                **{
                    **config,
                    "federation": FederationConfig(**config["federation"]),
                    "policy": Policy.parse(config["policy"]),
                }
            )
        return cls(config, problems, warnings)


class Root:
    """The work that needs root once mpubsubd serves, done in the calling process."""

    def __init__(
        self,
        config: Config,
        path: Optional[str],
        instance: str,
        pid: int,
        made: Sequence[str] = (),
    ) -> None:
        """*made*: the runtime directories mpubsubd made (they follow its group)."""
        self._started = config  # its files stay where they were made, whatever a reload says
        self._made = tuple(made)
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
        """The socket and credentials to group *new* (root only: None), as a start does;
        and the runtime directories mpubsubd made for group *old*, which follow it."""
        share(self._started.credentials, self._started.broker_address, new)
        for directory in self._made:
            if old is not None and os.stat(directory, follow_symlinks=False).st_gid == old:
                give(directory, _group(new), 0o755 if new is None else 0o750, stat.S_ISDIR)

    def close(self) -> None:
        """Nothing to let go: the work is done in this process."""


def share(credentials: str, address: Address, gid: Optional[int]) -> None:
    """The credentials file and the socket (a path) to group *gid*, 0640 and 0660; or,
    None, to root only, 0600. OSError (from give) if one is not what mpubsubd made."""
    give(credentials, _group(gid), 0o600 if gid is None else 0o640, stat.S_ISREG)
    if isinstance(address, str) and not address.startswith("\0"):
        give(address, _group(gid), 0o600 if gid is None else 0o660, stat.S_ISSOCK)


def _group(gid: Optional[int]) -> int:
    """*gid*, or for None root's group when root may give it (else the file keeps its own)."""
    if gid is not None:
        return gid
    return 0 if os.geteuid() == 0 else -1


def give(path: str, gid: int, mode: int, kind: Callable[[int], bool]) -> None:
    """Give *path* to group *gid* (-1: keep its group) with *mode* if it is of *kind*
    (stat.S_ISREG...).

    A link there is never followed: the file is held by an O_PATH descriptor
    opened without following it (a socket can be held no other way), and
    changed through /proc/self/fd, which names that very file.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not kind(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not what mpubsubd made there", path)
        held = f"/proc/self/fd/{fd}"
        try:
            os.chown(held, -1, gid)
            os.chmod(held, mode)
        except OSError as exc:  # named by the path, not by /proc/self/fd
            raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


class Keeper:
    """A forked process that stays root and does a Root's work when the broker asks."""

    def __init__(self, root: Root) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
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
        return Reloaded.from_json(self._ask("reload")[0])

    def open_log(self) -> int:
        error, fds = self._ask("log")
        if not fds:
            raise LogFileError(json.loads(error))
        return fds[0]

    def remove_files(self) -> List[str]:
        failed: List[str] = json.loads(self._ask("stop")[0])
        return failed

    def close(self) -> None:
        """Let the keeper go (it exits when this end closes) and reap it."""
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def _ask(self, request: str) -> Tuple[bytes, List[int]]:
        try:
            self._sock.sendall(request.encode() + b"\n")
            return _receive(self._sock)
        except (OSError, ValueError) as exc:
            raise OSError(f"mpubsubd's keeper (pid {self.pid}) is gone: {reason(exc)}") from None


_HEADER = struct.Struct("!I")  # the length of the reply that follows
_MAX_REPLY = 16 * 1024 * 1024


def _receive(sock: socket.socket) -> Tuple[bytes, List[int]]:
    """One reply of the keeper: its bytes, and the descriptor it may carry."""
    header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 1, socket.MSG_WAITALL)
    if len(header) != _HEADER.size:
        raise ValueError("the keeper closed its end")
    (size,) = _HEADER.unpack(header)
    if size > _MAX_REPLY:
        raise ValueError(f"a reply of {size} bytes")
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the keeper closed its end")
        data += chunk
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
    requests = sock.makefile("rb")
    while True:
        line = requests.readline(16)  # no request is longer: never hold more of it
        if not line.endswith(b"\n"):  # the broker process is gone (killed?), or is not itself
            root.remove_files()  # what it leaves is stale (only a pidfile of its pid goes)
            return
        request = line.strip()
        fds: List[int] = []
        try:
            if request == b"reload":
                reply = root.reload().to_json()
            elif request == b"log":
                try:
                    fds = [root.open_log()]
                    reply = b'""'
                except LogFileError as exc:
                    reply = json.dumps(str(exc)).encode()
            elif request == b"stop":
                reply = json.dumps(root.remove_files()).encode()
            else:  # not the broker process as it was made: nothing more for it
                return
        except Exception as exc:  # a bug of ours: say it, and keep keeping
            reply = _failed(request, exc)
        socket.send_fds(sock, [_HEADER.pack(len(reply))], fds)
        sock.sendall(reply)
        for fd in fds:
            os.close(fd)
        if request == b"stop":  # its files are gone: a new mpubsubd may make them anew
            return


def _failed(request: bytes, exc: Exception) -> bytes:
    """The reply to *request* when doing it raised *exc*."""
    why = f"the keeper failed to {request.decode()}: {type(exc).__name__}: {reason(exc)}"
    if request == b"reload":
        return Reloaded(None, [why], []).to_json()
    return json.dumps([why] if request == b"stop" else why).encode()


def drop_to(account: pwd.struct_passwd) -> None:
    """Become *account* for good: its uid, its group and supplementary groups."""
    os.initgroups(account.pw_name, account.pw_gid)
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
