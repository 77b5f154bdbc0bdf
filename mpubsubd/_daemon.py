"""Run the broker as mpubsubd: in the foreground for systemd, or as a classic daemon."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import secrets
import signal
import socket
import stat
from typing import Any, Callable, List, Optional, Tuple, Union

from mpubsub import Broker, __version__
from mpubsub._for_mpubsubd import CAPS, printable, reason, write_credentials

from ._config import (
    BROKER_KEYS,
    LIVE_KEYS,
    Config,
    ConfigError,
    changed_keys,
    config_path,
    read_authkey,
)
from ._logging import LogFile, LogFileError, log_file_handler, stderr_handler, use_handler
from ._pidfile import pid_in, read_pid
from ._privileges import Keeper, Root, drop_to, share
from ._supervisor import BridgeSupervisor

logger = logging.getLogger("mpubsubd")


#: Where the configuration was read (the -c path, the instance) and the runtime
#: directories mpubsubd made: what a reload needs to know.
Source = Tuple[Optional[str], str, List[str]]


class StartupError(Exception):
    """mpubsubd cannot start; the message is the one line the user sees."""


def run_foreground(config: Config, path: Optional[str] = None, instance: str = "") -> None:
    """Serve until SIGTERM/SIGINT, logging to stderr and speaking sd_notify.

    *path* and *instance* say where the configuration was read, for reloads.
    """
    use_handler(stderr_handler(), config.log_level)
    stale = check_pidfile(config.pidfile)
    if stale:
        logger.warning("%s", stale)
    pidfile = _pid_lock(config.pidfile)
    made = _make_dirs(config, log_dir=False)
    _acquire(pidfile, config.pidfile)
    try:
        ready = lambda: sd_notify("READY=1\nSTATUS=serving")  # noqa: E731
        _serve(config, (path, instance, made), ready=ready, log=None)
    finally:
        pidfile.release()


def run_daemon(config: Config, path: Optional[str] = None, instance: str = "") -> None:
    """Fork a classic daemon; return once it serves, or raise StartupError saying why not."""
    stale = check_pidfile(config.pidfile)
    made = _make_dirs(config, log_dir=True)
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
            code = _daemon_child(config, (path, instance, made), handler, write_end, stale)
        finally:
            os._exit(code)
    os.close(write_end)
    handler.close()
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.readline().decode(errors="replace").strip()
    os.waitpid(pid, 0)
    if report.startswith("CONFIG "):
        raise ConfigError(report.removeprefix("CONFIG "))
    if report != "READY":
        raise StartupError(report.removeprefix("ERROR ") or "the daemon exited before it was ready")


def _daemon_child(
    config: Config,
    source: Source,
    handler: LogFile,
    pipe: int,
    stale: Optional[str],
) -> int:
    launcher = _Launcher(pipe)
    import daemon  # noqa: PLC0415

    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        pidfile=_pid_lock(config.pidfile),
        files_preserve=[pipe, handler.stream],
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
        _serve(config, source, ready=lambda: launcher.tell("READY"), log=handler)
    except (StartupError, ConfigError) as exc:
        # Said on the launcher's terminal only: the log file may be that of
        # another mpubsubd, running, that this one failed to start beside.
        kind = "CONFIG" if isinstance(exc, ConfigError) else "ERROR"
        launcher.tell(f"{kind} {exc}")
        return 1
    except Exception:
        logger.exception("mpubsubd failed")
        launcher.tell(f"ERROR unexpected failure, see {config.log_file}")
        return 1
    finally:
        context.close()
    return 0


def _serve(
    config: Config,
    source: Source,
    ready: Callable[[], object],
    log: Optional[LogFile],
) -> None:
    """Start the broker as root, serve as ``config.user``, and clean up at the end."""
    account = _account(config)
    authkey = read_authkey(config.authkey_file) if config.authkey_file else secrets.token_bytes(32)
    bridge_key = secrets.token_bytes(32)  # what tells our bridge from any other client
    bridge = _bridge_supervisor(config, bridge_key, log)
    try:
        broker = Broker(
            config.broker_address,
            authkey,
            bridge_key=bridge_key if bridge is not None else None,
            timeout=config.handshake_timeout,
            max_message_size=config.max_message_size,
            max_buffer=config.max_buffer,
            policy=config.policy,
            **{key: getattr(config, key) for key in CAPS},
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.address}: {reason(exc)}") from None
    root = Root(config, *source[:2], pid=os.getpid(), made=source[2])
    try:
        _publish(config, broker, authkey)
        privileged = _become(account, root)
    except BaseException:
        broker.close()
        root.remove_files()
        raise
    service = _Service(config, source, broker, privileged, log, bridge=bridge)
    # mpubsubd owns its signals: the broker is told, from its own loop.
    signal.signal(signal.SIGHUP, lambda signum, frame: service.hangup())
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, lambda signum, frame: broker.stop())
    logger.info("mpubsubd %s serving; clients read %s", __version__, config.credentials)
    ready()
    if bridge is not None:
        bridge.start(broker.address, authkey, broker.open_pair)
    try:
        broker.start()
    finally:
        sd_notify("STOPPING=1")
        if bridge is not None:
            bridge.stop()
        service.close()
        logger.info("mpubsubd stopped")


def _account(config: Config) -> Optional[pwd.struct_passwd]:
    """The user to serve as (None: stay as started); StartupError if it cannot be."""
    account = config.account
    if account is None or account.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise StartupError(
            f"user = {config.user}: only root can serve as another user "
            f"(mpubsubd runs as uid {os.geteuid()}; leave user empty)"
        )
    return account


def _publish(config: Config, broker: Broker, authkey: bytes) -> None:
    """Give the socket and the credentials file to root (and the group) only."""
    try:
        write_credentials(config.credentials, broker.address, authkey, overwrite=True)
    except OSError as exc:
        raise StartupError(f"cannot write {config.credentials}: {reason(exc)}") from None
    try:
        share(config.credentials, broker.address, config.gid)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM and os.geteuid() == 0:
            hint = (
                " (root may not chown here: does a SystemCallFilter= without @chown, "
                "or a CapabilityBoundingSet= without CAP_CHOWN, forbid it?)"
            )
        raise StartupError(
            f"cannot give {exc.filename} to group {config.group or 'root'}: {reason(exc)}{hint}"
        ) from None


def _become(account: Optional[pwd.struct_passwd], root: Root) -> Union[Root, Keeper]:
    """Serve as *account* from now on, a keeper keeping root's work; or stay, with *root*."""
    if account is None:
        return root
    keeper = Keeper(root)
    try:
        drop_to(account)
    except OSError as exc:
        keeper.close()
        raise StartupError(
            f"cannot serve as user {account.pw_name} (uid {account.pw_uid}): {reason(exc)}"
            " (a CapabilityBoundingSet= without CAP_SETUID and CAP_SETGID?)"
        ) from None
    if account.pw_name == "nobody":
        logger.warning(
            "user = nobody: other services run as nobody too, and any of them could signal "
            "mpubsubd or its bridge; give it a user of its own (make install creates mpubsub)"
        )
    logger.info(
        "serving as user %s (uid %d); root's work is left to the keeper, pid %d",
        account.pw_name,
        account.pw_uid,
        keeper.pid,
    )
    return keeper


class _Service:
    """What mpubsubd does while its broker serves: reloads, and the cleanup at the end."""

    def __init__(
        self,
        config: Config,
        source: Source,
        broker: Broker,
        privileged: Union[Root, Keeper],
        log: Optional[LogFile],
        *,
        bridge: Optional[BridgeSupervisor] = None,
    ) -> None:
        self._bridge = bridge
        self._config = config  # as last read: what the live keys are now
        self._started = config  # what the other keys are, until a restart
        self._name = source[0] or config_path(source[1])
        self._broker = broker
        self._privileged = privileged
        self._log = log
        self._pending = False  # a reload is scheduled and has not started

    def hangup(self) -> None:
        """SIGHUP: one reload in the broker's loop, however many signals came before it
        started (a storm of them must not keep the loop from its clients)."""
        if not self._pending:
            self._pending = True
            self._broker.schedule(self.reload)

    def reload(self) -> None:
        """In the broker's loop: read the configuration again, apply what can change."""
        self._pending = False
        sd_notify("RELOADING=1")
        try:
            self._reload()
        except OSError as exc:  # the keeper is gone: nothing changed
            logger.error("reload failed: %s", reason(exc))
        finally:
            sd_notify("READY=1")

    def _reload(self) -> None:
        reloaded = self._privileged.reload()
        new = reloaded.config
        old = self._config
        if new is not None:
            self._config = new
            logging.getLogger().setLevel(new.log_level)
            if self._bridge is not None and new.log_level != old.log_level:
                self._bridge.set_log_level(new.log_level)
        self._reopen_log()  # first: what follows belongs in the new file (logrotate's HUP)
        if new is None:
            more = len(reloaded.problems) - 1
            logger.error(
                "reload refused, the running configuration stays: %s%s",
                reloaded.problems[0],
                f" (and {more} more: mpubsubd --check-config lists them)" if more else "",
            )
            return
        for warning in reloaded.warnings:
            logger.warning("reload: %s", warning)
        try:
            self._broker.reconfigure(
                timeout=new.handshake_timeout, **{key: getattr(new, key) for key in BROKER_KEYS}
            )
        except ValueError as exc:
            logger.error("reload: the broker's caps stay as they were: %s", exc)
        live = [key for key in changed_keys(old, new) if key in LIVE_KEYS]
        # What differs from the running broker, this reload's change or an earlier one's.
        later = [key for key in changed_keys(self._started, new) if key not in LIVE_KEYS]
        logger.info(
            "reloaded %s: %s",
            self._name,
            ", ".join(live) + " changed" if live else "nothing changed",
        )
        if later:
            logger.warning(
                "reload: %s changed in %s, but take%s effect only at the next restart",
                ", ".join(later),
                self._name,
                "s" if len(later) == 1 else "",
            )

    def _reopen_log(self) -> None:
        if self._log is None:
            return
        try:
            self._log.use(self._privileged.open_log())
        except (LogFileError, OSError) as exc:  # the old file goes on
            logger.error("cannot reopen the log file: %s", reason(exc))
        else:
            logger.info("reopened the log file %s", self._config.log_file)

    def close(self) -> None:
        """Remove the broker's files (root's work) and let the keeper go."""
        try:
            failed = self._privileged.remove_files()
        except OSError as exc:
            failed = [reason(exc)]
        for line in failed:
            logger.warning("%s", line)
        self._privileged.close()


def _bridge_supervisor(
    config: Config, bridge_key: bytes, log: Optional[LogFile]
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
    # The files it names the start has checked already (_config.check_files).
    secret = read_authkey(federation.secret_file, "secret_file")
    return BridgeSupervisor(
        config, secret, bridge_key, log_line=log.write_line if log is not None else None
    )


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
    pid = pid_in(text)
    why = _not_mpubsubd(pid)
    if why is None:
        raise StartupError(f"mpubsubd is already running (pid {pid}, pidfile {path})")
    return _remove_pidfile(path, f"removed stale pidfile {path} ({why})")


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
            return read_pid(self.path)

        def release(self) -> None:
            if not os.path.lexists(self.path):
                return  # removed with the broker's other files, by root
            try:
                super().release()
            except lockfile.Error as exc:  # replaced meanwhile: not ours to remove
                logger.warning("left pidfile %s as it is: %s", self.path, reason(exc))

    return PidLock(path, 0)


def _remove_pidfile(path: str, said: str) -> str:
    """Unlink *path* itself (never what a link there points to); return *said*, to log."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot remove pidfile {path}: {reason(exc)}") from None
    return said


def _not_mpubsubd(pid: Optional[int]) -> Optional[str]:
    """Why *pid* is not a running mpubsubd, or None if it may be one (or is someone else's)."""
    if pid is None:
        return "it holds no pid"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        return None  # alive, someone else's: do not take its place
    try:
        name = _other_than_mpubsubd(pid)
    except OSError:
        return None
    if name is None:
        return None
    return f"pid {pid} is {name}, not mpubsubd" if name else f"pid {pid} is not running"


def _other_than_mpubsubd(pid: int) -> Optional[str]:
    """The command name of *pid*, a process that is not mpubsubd ('' for a zombie, not yet
    reaped); None if it is mpubsubd."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        if f.read().rsplit(b")", 1)[-1].split()[:1] == [b"Z"]:
            return ""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"mpubsubd" in f.read():
            return None
    with open(f"/proc/{pid}/comm", "rb") as f:
        return printable(f.read().strip().decode("utf-8", "replace"))


def _acquire(pidfile: object, path: str) -> None:
    try:
        pidfile.acquire()  # type: ignore[attr-defined]
    except Exception as exc:  # lockfile's AlreadyLocked and LockFailed
        raise StartupError(f"cannot lock pidfile {path}: {reason(exc)}") from None


def _make_dirs(config: Config, *, log_dir: bool) -> List[str]:
    """Create missing directories: runtime ones for root (and GROUP), the log one for root.

    Returns the runtime directories made (a reload gives them a new group).
    """
    runtime = [config.credentials, config.pidfile]
    if isinstance(config.broker_address, str):
        runtime.append(config.broker_address)
    wanted = {os.path.dirname(p): config.gid for p in runtime}
    if log_dir:
        wanted.setdefault(os.path.dirname(config.log_file), None)
    made = []
    for directory, gid in sorted(wanted.items()):
        if os.path.isdir(directory):
            continue  # the administrator's (or systemd's RuntimeDirectory=): leave it as it is
        if directory != os.path.dirname(config.log_file) or not log_dir:
            made.append(directory)
        try:
            os.makedirs(directory, exist_ok=True)
            if gid is not None:
                os.chown(directory, -1, gid)
            os.chmod(directory, 0o755 if gid is None else 0o750)
        except OSError as exc:
            raise StartupError(f"cannot create directory {directory}: {reason(exc)}") from None
    return made


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
