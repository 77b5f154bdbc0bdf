"""Run the broker as mpubsubd: in the foreground for systemd, or as a classic daemon."""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import stat
from typing import Any, Callable, Optional

from mpubsub import Broker, __version__
from mpubsub._for_mpubsubd import CAPS, reason, write_credentials

from ._config import Config, ConfigError, read_authkey
from ._logging import LogFileError, log_file_handler, stderr_handler, use_handler
from ._supervisor import BridgeSupervisor

logger = logging.getLogger("mpubsubd")

_PID_LIMIT = 1 << 22  # Linux's PID_MAX_LIMIT: every pid is below it


class StartupError(Exception):
    """mpubsubd cannot start; the message is the one line the user sees."""


def run_foreground(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, logging to stderr and speaking sd_notify."""
    use_handler(stderr_handler(), config.log_level)
    stale = check_pidfile(config.pidfile)
    if stale:
        logger.warning("%s", stale)
    pidfile = _pid_lock(config.pidfile)
    _make_dirs(config, log_dir=False)
    _acquire(pidfile, config.pidfile)
    try:
        _serve(config, ready=lambda: sd_notify("READY=1\nSTATUS=serving"), reopen=None)
    finally:
        pidfile.release()


def run_daemon(config: Config) -> None:
    """Fork a classic daemon; return once it serves, or raise StartupError saying why not."""
    stale = check_pidfile(config.pidfile)
    _make_dirs(config, log_dir=True)
    try:
        handler = log_file_handler(config.log_file)
    except LogFileError as exc:
        raise StartupError(str(exc)) from None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon-to-be: python-daemon forks twice more and detaches
        os.close(read_end)
        code = 1
        try:
            code = _daemon_child(config, handler, write_end, stale)
        finally:
            os._exit(code)
    os.close(write_end)
    handler.close()
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.readline().decode(errors="replace").strip()
    os.waitpid(pid, 0)
    if report != "READY":
        raise StartupError(report.removeprefix("ERROR ") or "the daemon exited before it was ready")


def _daemon_child(config: Config, handler: logging.Handler, pipe: int, stale: Optional[str]) -> int:
    launcher = _Launcher(pipe)
    import daemon  # noqa: PLC0415

    stream = getattr(handler, "stream", None)
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        pidfile=_pid_lock(config.pidfile),
        files_preserve=[pipe, stream],
        # The broker handles SIGTERM and SIGINT itself, and mpubsubd SIGHUP.
        signal_map={signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGTSTP: None},
    )
    try:
        context.open()
    except Exception as exc:  # lockfile's AlreadyLocked, an unusable directory...
        launcher.tell(f"ERROR cannot lock pidfile {config.pidfile}: {reason(exc)}")
        return 1
    use_handler(handler, config.log_level)
    if stale:  # said here, in the daemon's log, not on the launcher's terminal
        logger.warning("%s", stale)
    try:
        _serve(config, ready=lambda: launcher.tell("READY"), reopen=handler)
    except (StartupError, ConfigError) as exc:
        logger.error("%s", exc)
        launcher.tell(f"ERROR {exc}")
        return 1
    except Exception:
        logger.exception("mpubsubd failed")
        launcher.tell(f"ERROR unexpected failure, see {config.log_file}")
        return 1
    finally:
        context.close()
    return 0


def _serve(config: Config, ready: Callable[[], object], reopen: Optional[logging.Handler]) -> None:
    authkey = read_authkey(config.authkey_file) if config.authkey_file else secrets.token_bytes(32)
    bridge_key = secrets.token_bytes(32)  # what tells our bridge from any other client
    bridge = _bridge_supervisor(
        config, bridge_key, log_file=config.log_file if reopen is not None else None
    )
    try:
        broker = Broker(
            config.broker_address,
            authkey,
            bridge_key=bridge_key if bridge is not None else None,
            timeout=config.handshake_timeout,
            max_message_size=config.max_message_size,
            max_buffer=config.max_buffer,
            **{key: getattr(config, key) for key in CAPS},
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.address}: {reason(exc)}") from None
    try:
        _secure_socket(broker, config.gid)
        write_credentials(
            config.credentials, broker.address, authkey, overwrite=True, gid=config.gid
        )
    except OSError as exc:
        broker.close()
        raise StartupError(f"cannot write {config.credentials}: {reason(exc)}") from None

    def on_hangup() -> None:
        sd_notify("RELOADING=1")
        if isinstance(reopen, logging.handlers.WatchedFileHandler):
            try:
                reopen.reopenIfNeeded()
            except OSError as exc:  # each log line tries again; the broker goes on
                logger.error(
                    "SIGHUP: cannot open the log file %s: %s", config.log_file, reason(exc)
                )
            else:
                logger.info("SIGHUP: reopened the log file %s", config.log_file)
        else:
            logger.info("SIGHUP: nothing to reopen, logging to stderr")
        sd_notify("READY=1")

    # mpubsubd owns its signals: the broker is told, from its own loop.
    signal.signal(signal.SIGHUP, lambda signum, frame: broker.schedule(on_hangup))
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, lambda signum, frame: broker.stop())
    logger.info("mpubsubd %s serving; clients read %s", __version__, config.credentials)
    ready()
    if bridge is not None:
        bridge.start()
    try:
        broker.start()
    finally:
        sd_notify("STOPPING=1")
        if bridge is not None:
            bridge.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.credentials)
        logger.info("mpubsubd stopped")


def _bridge_supervisor(
    config: Config, bridge_key: bytes, log_file: Optional[str]
) -> Optional[BridgeSupervisor]:
    """The supervisor of the federation bridge, when [federation] names servers."""
    federation = config.federation
    if not federation.enabled:
        return None
    try:
        import nats  # noqa: F401, PLC0415  (only the bridge uses it: check it is there)
    except ImportError:
        raise StartupError(
            "federation needs nats-py: install the federation extra, "
            "pip install 'mpubsub[federation]'"
        ) from None
    if federation.creds_file:
        try:
            import nkeys  # noqa: F401, PLC0415
        except ImportError:
            raise StartupError("creds_file needs the nkeys package: pip install nkeys") from None
    for key in ("creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(federation, key)
        if path and not os.access(path, os.R_OK):
            raise StartupError(f"{key}: cannot read {path}")
    secret = read_authkey(federation.secret_file, "secret_file")
    return BridgeSupervisor(config, secret, bridge_key, log_file=log_file)


def check_pidfile(path: str) -> Optional[str]:
    """Refuse to start beside a live mpubsubd; remove the pidfile of a dead one.

    Only a regular file is read, and of what it holds only a pid is ever repeated: a
    symbolic link is not followed, and it, like any other thing that is not a regular
    file, is removed unread. Returns what to log when a pidfile was removed, else None.
    """
    # The pidfile's directory may be writable by others: a link there could point
    # at a root-only file, and a fifo would block the open forever.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _remove_pidfile(path, f"removed pidfile {path}: a symbolic link, not followed")
        if exc.errno == errno.ENXIO:  # a socket
            return _remove_pidfile(path, f"removed pidfile {path}: not a regular file, not read")
        raise StartupError(f"cannot read pidfile {path}: {reason(exc)}") from None
    try:
        text = os.read(fd, 64) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError as exc:
        raise StartupError(f"cannot read pidfile {path}: {reason(exc)}") from None
    finally:
        os.close(fd)
    if text is None:
        return _remove_pidfile(path, f"removed pidfile {path}: not a regular file, not read")
    pid = _pid_in(text)
    if pid is not None and _is_mpubsubd(pid):
        raise StartupError(f"mpubsubd is already running (pid {pid}, pidfile {path})")
    return _remove_pidfile(
        path, f"removed stale pidfile {path} (pid {pid or '?'} is not a running mpubsubd)"
    )


def _pid_lock(path: str) -> Any:
    """python-daemon's lock on the pidfile *path*, reading it as check_pidfile does.

    At release, lockfile reads the pidfile to check it is ours: with open(),
    which follows a link and waits forever on a fifo put there meanwhile.
    This lock reads it without either, and leaves a pidfile that is no
    longer ours as it is, with a warning.
    """
    import daemon.pidfile  # noqa: PLC0415  (checked by the caller: a clear error if missing)
    import lockfile  # noqa: PLC0415

    class PidLock(daemon.pidfile.TimeoutPIDLockFile):  # type: ignore[misc]
        def read_pid(self) -> Optional[int]:
            return _read_pid(self.path)

        def release(self) -> None:
            try:
                super().release()
            except lockfile.Error as exc:  # replaced meanwhile: not ours to remove
                logger.warning("left pidfile %s as it is: %s", self.path, reason(exc))

    return PidLock(path, 0)


def _read_pid(path: str) -> Optional[int]:
    """The pid in the regular file *path*; None for anything else, never blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _pid_in(os.read(fd, 64)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _pid_in(text: bytes) -> Optional[int]:
    """The pid *text* holds (ASCII digits, blanks around), or None if it holds no pid."""
    digits = text.strip()
    pid = int(digits) if digits.isdigit() else 0  # bytes.isdigit(): ASCII digits only
    return pid if 0 < pid < _PID_LIMIT else None


def _remove_pidfile(path: str, said: str) -> str:
    """Unlink *path* itself (never what a link there points to); return *said*, to log."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot remove pidfile {path}: {reason(exc)}") from None
    return said


def _is_mpubsubd(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's: do not take its place
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mpubsubd" in f.read()
    except OSError:
        return True


def _acquire(pidfile: object, path: str) -> None:
    try:
        pidfile.acquire()  # type: ignore[attr-defined]
    except Exception as exc:  # lockfile's AlreadyLocked and LockFailed
        raise StartupError(f"cannot lock pidfile {path}: {reason(exc)}") from None


def _make_dirs(config: Config, *, log_dir: bool) -> None:
    """Create missing directories: runtime ones for root (and GROUP), the log one for root."""
    runtime = [config.credentials, config.pidfile]
    if isinstance(config.broker_address, str):
        runtime.append(config.broker_address)
    wanted = {os.path.dirname(p): config.gid for p in runtime}
    if log_dir:
        wanted.setdefault(os.path.dirname(config.log_file), None)
    for directory, gid in sorted(wanted.items()):
        if os.path.isdir(directory):
            continue  # the administrator's (or systemd's RuntimeDirectory=): leave it as it is
        try:
            os.makedirs(directory, exist_ok=True)
            if gid is not None:
                os.chown(directory, -1, gid)
            os.chmod(directory, 0o755 if gid is None else 0o750)
        except OSError as exc:
            raise StartupError(f"cannot create directory {directory}: {reason(exc)}") from None


def _secure_socket(broker: Broker, gid: Optional[int]) -> None:
    """A Unix socket only root (and GROUP, when set) may connect to."""
    address = broker.address
    if not isinstance(address, str) or address.startswith("\0"):
        return
    if gid is None:
        os.chmod(address, 0o600)
    else:
        os.chown(address, -1, gid)
        os.chmod(address, 0o660)


def sd_notify(message: str) -> bool:
    """Tell systemd about our state when it asked (NOTIFY_SOCKET); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address, reason(exc))
        return False
    return True


class _Launcher:
    """The pipe to the waiting launcher: one line, READY or ERROR, then closed."""

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd

    def tell(self, line: str) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:  # only once: the descriptor's number may be reused after
            with contextlib.suppress(OSError):  # the launcher may be gone
                os.write(fd, line.encode() + b"\n")
            os.close(fd)


__all__ = [
    "ConfigError",
    "StartupError",
    "check_pidfile",
    "run_daemon",
    "run_foreground",
    "sd_notify",
]
