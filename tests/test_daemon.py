"""Tests for mpubsubd._daemon: the daemon really forks, locks, serves and cleans up."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from mpubsub import Broker, CredentialsError, NetPubSub

from . import needs
from .conftest import (
    alive,
    make_install,
    stopped,
    wait_closed,
    wait_for,
)
from .processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
MPUBSUBD = [sys.executable, "-m", "mpubsubd"]


class Daemon:
    """An mpubsubd configuration in a directory of its own, and the daemons started on it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run = base / "run"
        self.config = base / "mpubsubd.conf"
        self.credentials = self.run / "broker.pckl"
        self.pidfile = self.run / "mpubsubd.pid"
        self.socket = self.run / "broker.sock"
        self.log = base / "log" / "mpubsubd.log"
        self.command = MPUBSUBD  # or an installed wrapper
        self.cwd: Optional[Path] = None  # where the commands run; None: here
        self.pids: List[int] = []
        self.procs: List[subprocess.Popen[str]] = []
        self.configure()

    def configure(self, **extra: str) -> None:
        """Write the configuration: this directory's files, then *extra* (may replace them)."""
        keys = {
            "address": str(self.socket),
            "credentials": str(self.credentials),
            "pidfile": str(self.pidfile),
            "log_file": str(self.log),
            **extra,
        }
        lines = ["[mpubsubd]", *(f"{key} = {value}" for key, value in keys.items())]
        self.config.write_text("\n".join(lines) + "\n")

    def launch(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the launcher; it returns once the daemon serves (or failed)."""
        result = subprocess.run(
            [*self.command, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.cwd,
        )
        if result.returncode == 0:
            self.pids.append(self.pid())
        return result

    def foreground(self, env: Optional[Dict[str, str]] = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*self.command, "-f", "-c", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=self.cwd,
        )
        self.procs.append(proc)
        return proc

    def foreground_stderr(self) -> str:
        """Run mpubsubd -f until it has served a client, then stop it; what it said."""
        proc = self.foreground()
        wait_for(lambda: self.credentials.exists() or proc.poll() is not None, what="mpubsubd -f")
        if proc.poll() is None:
            exchange(self.credentials)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        return err

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def started(self) -> int:
        """Launch a daemon that must start; its pid."""
        result = self.launch()
        assert result.returncode == 0, result.stderr
        return self.pid()

    def signal(self, signum: int) -> int:
        """Send *signum* to the running daemon and wait until it is gone; its pid."""
        pid = self.pid()
        os.kill(pid, signum)
        wait_for(lambda: not alive(pid), what=f"pid {pid} to exit")
        return pid

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
                try:
                    wait_for(lambda pid=pid: not alive(pid), what=f"pid {pid} to exit")  # type: ignore[misc]
                except BaseException:
                    os.kill(pid, signal.SIGKILL)
                    raise


@pytest.fixture
def mpubsubd() -> Iterator[Daemon]:
    """A daemon configuration in a world-traversable temporary directory, always stopped."""
    base = Path(tempfile.mkdtemp(prefix="mpubsubd-test-"))
    base.chmod(0o755)  # nobody must reach it in the group test
    daemon = Daemon(base)
    try:
        yield daemon
    finally:
        daemon.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def exchange(credentials: Path) -> None:
    """Two clients made with from_file pass a message through the broker."""
    with NetPubSub.from_file(credentials) as sub, NetPubSub.from_file(credentials) as pub:
        got: List[Tuple[Tuple[str, ...], Any]] = []

        def fn(topic: Tuple[str, ...], **message: Any) -> None:
            got.append((topic, message))

        sub.add_subscriber("hello", fn)
        assert sub.flush()
        pub.publish("hello", n=1)
        wait_for(lambda: sub.poll(0.05) or got, what="a message through mpubsubd")
        assert got == [(("hello",), {"n": 1})]


def test_daemonizes_and_serves(mpubsubd: Daemon) -> None:
    """The launcher returns when the daemon serves; it runs apart, with 0600 root credentials."""
    result = mpubsubd.launch()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    pid = mpubsubd.pid()
    assert alive(pid)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    assert int(fields[1]) != os.getpid()  # parent: not us (it detached)
    assert int(fields[3]) != os.getsid(0)  # a session of its own, detached from ours
    assert int(fields[3]) != pid  # forked twice: not a session leader, no terminal ever
    info = mpubsubd.credentials.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    sock = mpubsubd.socket.stat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600  # no group set
    exchange(mpubsubd.credentials)
    assert "serving" in mpubsubd.log.read_text()


def test_second_instance_refused(mpubsubd: Daemon) -> None:
    """A second mpubsubd on the same pidfile names the first and leaves it alone."""
    assert mpubsubd.launch().returncode == 0
    pid = mpubsubd.pid()
    second = subprocess.run(
        [*MPUBSUBD, "-c", str(mpubsubd.config)], capture_output=True, text=True, timeout=60
    )
    assert second.returncode != 0
    assert second.stderr == (
        f"mpubsubd: mpubsubd is already running (pid {pid}, pidfile {mpubsubd.pidfile})\n"
    )
    foreground = mpubsubd.foreground()
    _, err = foreground.communicate(timeout=30)
    assert foreground.returncode != 0 and f"(pid {pid}," in err
    assert mpubsubd.pid() == pid and alive(pid)
    exchange(mpubsubd.credentials)


def test_recovers_after_kill_9(mpubsubd: Daemon) -> None:
    """After SIGKILL, the stale pidfile and socket are replaced at the next start."""
    mpubsubd.started()
    old = mpubsubd.signal(signal.SIGKILL)
    assert mpubsubd.pidfile.exists() and mpubsubd.socket.exists()
    result = mpubsubd.launch()
    assert result.returncode == 0 and result.stderr == ""  # the daemon's log says it
    assert mpubsubd.pid() != old
    assert f"removed stale pidfile {mpubsubd.pidfile} (pid {old} is not running)" in (
        mpubsubd.log.read_text()
    )
    exchange(mpubsubd.credentials)


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "socket"])
def test_pidfile_not_a_regular_file_is_not_read(
    mpubsubd: Daemon, kind: str, foreground: bool
) -> None:
    """A symlink (to a root-only file), a fifo or a socket as pidfile is removed unread."""
    secret = mpubsubd.base / "secret"
    secret.write_text("s3cret-line\n")
    secret.chmod(0o600)
    mpubsubd.run.mkdir()
    if kind == "symlink":
        mpubsubd.pidfile.symlink_to(secret)
        warning = f"removed pidfile {mpubsubd.pidfile}: a symbolic link, not followed"
    else:  # opening a fifo to read it would wait for a writer forever
        if kind == "fifo":
            os.mkfifo(mpubsubd.pidfile)
        else:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(mpubsubd.pidfile))
        warning = f"removed pidfile {mpubsubd.pidfile}: not a regular file, not read"
    if foreground:
        said = mpubsubd.foreground_stderr()
    else:
        result = mpubsubd.launch()
        assert result.returncode == 0, result.stderr
        said = result.stderr + mpubsubd.log.read_text()
    assert "s3cret" not in said
    assert warning in said
    assert secret.read_text() == "s3cret-line\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "text",
    ["hunter2\n", "4242 hunter2\n", "\x1b[2J\n", "9" * 64],
    ids=["word", "pid-and", "escape", "huge"],
)
def test_pidfile_text_is_not_logged(mpubsubd: Daemon, text: str) -> None:
    """A pidfile that does not hold a pid is removed as stale, its text never repeated."""
    mpubsubd.run.mkdir()
    mpubsubd.pidfile.write_text(text)
    result = mpubsubd.launch()
    assert result.returncode == 0, result.stderr
    log = mpubsubd.log.read_text()
    assert "hunter2" not in log and "\x1b" not in log
    assert f"removed stale pidfile {mpubsubd.pidfile} (it holds no pid)" in log


def test_sigterm_cleans_up(mpubsubd: Daemon) -> None:
    """SIGTERM stops the daemon and removes its pidfile, socket and credentials."""
    mpubsubd.started()
    mpubsubd.signal(signal.SIGTERM)
    assert not mpubsubd.pidfile.exists()
    assert not mpubsubd.socket.exists()
    assert not mpubsubd.credentials.exists()
    assert "mpubsubd stopped" in mpubsubd.log.read_text()


def test_sighup_reopens_log(mpubsubd: Daemon) -> None:
    """After logrotate renames the log, SIGHUP starts a new file and says so in it."""
    assert mpubsubd.launch().returncode == 0
    rotated = mpubsubd.log.with_suffix(".log.1")
    mpubsubd.log.rename(rotated)
    os.kill(mpubsubd.pid(), signal.SIGHUP)
    wait_for(mpubsubd.log.exists, what="a new log file")
    wait_for(lambda: "reopened the log file" in mpubsubd.log.read_text(), what="the SIGHUP line")
    assert "serving" in rotated.read_text()


def test_log_file_is_created_0640(mpubsubd: Daemon) -> None:
    """The daemon's log file, and the one it starts after logrotate renamed it, are 0640."""
    mpubsubd.started()
    assert stat.S_IMODE(mpubsubd.log.stat().st_mode) == 0o640
    mpubsubd.log.rename(mpubsubd.log.with_suffix(".log.1"))
    os.kill(mpubsubd.pid(), signal.SIGHUP)
    wait_for(mpubsubd.log.exists, what="a new log file")
    assert stat.S_IMODE(mpubsubd.log.stat().st_mode) == 0o640


def test_symlinked_log_file_is_refused(mpubsubd: Daemon) -> None:
    """A symbolic link as log_file is neither followed nor replaced: one line, exit status 1."""
    target = mpubsubd.base / "target"
    target.write_text("root's\n")
    mpubsubd.log.parent.mkdir()
    mpubsubd.log.symlink_to(target)
    result = mpubsubd.launch()
    assert result.stderr == (
        f"mpubsubd: cannot open log_file {mpubsubd.log}: a symbolic link, not followed\n"
    )
    assert result.returncode == 1
    assert target.read_text() == "root's\n" and mpubsubd.log.is_symlink()
    assert not mpubsubd.pidfile.exists()


def test_foreground_speaks_sd_notify(mpubsubd: Daemon) -> None:
    """With -f and NOTIFY_SOCKET: READY=1 once serving, RELOADING=1 on SIGHUP, STOPPING=1."""
    address = str(mpubsubd.base / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(30)
        proc = mpubsubd.foreground({"NOTIFY_SOCKET": address})
        assert notify.recv(4096).startswith(b"READY=1")
        assert mpubsubd.pid() == proc.pid  # the lock is held in the foreground too
        exchange(mpubsubd.credentials)
        proc.send_signal(signal.SIGHUP)
        assert notify.recv(4096) == b"RELOADING=1"
        assert notify.recv(4096) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "INFO mpubsubd: mpubsubd 0.1.0 serving" in err
    assert not mpubsubd.pidfile.exists()


def test_bad_config_starts_nothing(mpubsubd: Daemon) -> None:
    """An invalid log_level is one line naming the file, line and key, and status 78."""
    mpubsubd.configure(log_level="LOUD")
    result = mpubsubd.launch()
    assert result.returncode == 78  # EX_CONFIG: the unit's RestartPreventExitStatus=
    assert result.stderr == (
        f"mpubsubd: {mpubsubd.config}:6: log_level: 'LOUD' is not one of "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL\n"
    )
    assert not mpubsubd.pidfile.exists() and not mpubsubd.run.exists()


def test_address_in_use_is_reported(mpubsubd: Daemon) -> None:
    """A socket another broker listens on makes the launcher fail with the reason."""
    mpubsubd.run.mkdir()
    other = Broker(str(mpubsubd.socket), b"k")
    try:
        result = mpubsubd.launch()
    finally:
        other.close()
    assert result.returncode != 0
    assert result.stderr.startswith(f"mpubsubd: cannot listen on {mpubsubd.socket}: ")
    assert "already listening" in result.stderr
    assert not mpubsubd.pidfile.exists()


def test_group_members_connect_others_cannot(mpubsubd: Daemon) -> None:
    """With group set, nobody cannot read the credentials, but nobody in the group connects."""
    needs.check_other_users()
    group = grp.getgrgid(100).gr_name  # 'users', present on Debian
    mpubsubd.configure(group=group)
    assert mpubsubd.launch().returncode == 0
    info = mpubsubd.credentials.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == 100
    lib = mpubsubd.base / "lib"
    shutil.copytree(ROOT / "mpubsub", lib / "mpubsub")
    code = (
        "import sys; from mpubsub import NetPubSub, CredentialsError\n"
        "try:\n"
        f"    p = NetPubSub.from_file({str(mpubsubd.credentials)!r})\n"
        "except CredentialsError as e:\n"
        "    sys.exit(str(e))\n"
        "p.connect(); print('flushed', p.flush()); p.disconnect()\n"
    )

    def as_nobody(*groups: str) -> subprocess.CompletedProcess[str]:
        ids = ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
        return subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", *ids, "/usr/bin/python3", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"},
            cwd="/",
        )

    outsider = as_nobody()
    assert outsider.returncode != 0
    assert "permission denied" in outsider.stderr
    member = as_nobody("100")
    assert member.returncode == 0, member.stderr
    assert member.stdout == "flushed True\n"
    with pytest.raises(CredentialsError):  # and the library refuses others' writable files
        os.chmod(mpubsubd.credentials, 0o660)
        NetPubSub.from_file(mpubsubd.credentials)


def test_version_and_missing_dependency() -> None:
    """--version prints the version; without python-daemon the error names the extra."""
    version = subprocess.run([*MPUBSUBD, "--version"], capture_output=True, text=True)
    assert version.stdout == "mpubsubd 0.1.0\n"
    code = "import sys; sys.modules['daemon'] = None; from mpubsubd._main import main; main([])"
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert missing.returncode != 0
    assert missing.stderr == (
        "mpubsubd: python-daemon is not installed: "
        "install the daemon extra, pip install 'mpubsub[daemon]'\n"
    )


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The mpubsubd wrapper of ``make install`` into a temporary prefix."""
    needs.DEBIAN_PYTHON.check(os.path.exists("/usr/bin/python3"))
    base = Path(tempfile.mkdtemp(prefix="mpubsubd-install-"))
    base.chmod(0o755)  # what mpubsubd runs once it is nobody must read it
    try:
        make_install(base)
        yield base / "prefix" / "bin" / "mpubsubd"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_installed_wrapper_imports_nothing_from_cwd(
    installed: Path, planted: Path, mpubsubd: Daemon
) -> None:
    """The installed mpubsubd, run by root beside planted modules, imports none of them."""
    version = subprocess.run(
        [str(installed), "--version"], capture_output=True, text=True, timeout=60, cwd=planted
    )
    assert [p.name for p in planted.glob("*.imported")] == []
    assert version.stdout == "mpubsubd 0.1.0\n"
    mpubsubd.command, mpubsubd.cwd = [str(installed)], planted
    assert "serving" in mpubsubd.foreground_stderr()
    mpubsubd.started()
    exchange(mpubsubd.credentials)
    mpubsubd.signal(signal.SIGTERM)
    assert [p.name for p in planted.glob("*.imported")] == []


def test_clients_survive_daemon_restart(mpubsubd: Daemon, helpers: Callable[..., Any]) -> None:
    """mpubsubd stopped and started again under traffic: its clients carry on by themselves."""
    mpubsubd.started()
    # Both run until told to stop: traffic goes on, however long the restart takes.
    sub = helpers("subscriber", mpubsubd.credentials, "data", 0, "--gaps", "--seconds", 300)
    pub = helpers("publisher", mpubsubd.credentials, "data", 0, "p", "--pause", 0.001)

    def delivered() -> int:
        with NetPubSub.from_file(mpubsubd.credentials) as watcher:
            stats = watcher.broker_statistics()
        return 0 if stats is None else int(stats["messages_out"])

    wait_for(lambda: delivered() > 500, what="traffic before the restart")
    mpubsubd.signal(signal.SIGTERM)
    mpubsubd.started()  # a new key: the clients re-read the credentials file
    after = wait_for(lambda: (n := delivered()) > 500 and n, 60, what="traffic after the restart")
    sent = stopped(pub, r"sent (\d+)")
    # The subscriber is the new daemon's only one: it has all it delivered, and more.
    received = stopped(sub, r"stopped (\d+) in order")
    assert after <= received <= sent


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_pidfile_swapped_for_a_fifo_does_not_hang_the_stop(
    mpubsubd: Daemon, foreground: bool
) -> None:
    """A fifo put in the pidfile's place while mpubsubd runs is left alone at its stop."""
    if foreground:
        proc = mpubsubd.foreground()
        wait_for(mpubsubd.credentials.exists, what="mpubsubd -f")
        pid = proc.pid
    else:
        pid = mpubsubd.started()
    mpubsubd.pidfile.unlink()
    os.mkfifo(mpubsubd.pidfile)  # reading it would wait for a writer forever
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), what="mpubsubd to stop")
    assert stat.S_ISFIFO(mpubsubd.pidfile.lstat().st_mode)
    said = proc.communicate(timeout=10)[1] if foreground else mpubsubd.log.read_text()
    assert f"left pidfile {mpubsubd.pidfile} as it is" in said


def test_log_file_swapped_for_a_fifo_stalls_nothing(mpubsubd: Daemon) -> None:
    """A fifo put in the log file's place before a SIGHUP is not opened; the broker serves on."""
    pid = mpubsubd.started()
    mpubsubd.log.rename(mpubsubd.log.with_suffix(".log.1"))
    os.mkfifo(mpubsubd.log)  # opening it to write would wait for a reader forever
    os.kill(pid, signal.SIGHUP)
    with NetPubSub.from_file(str(mpubsubd.credentials), timeout=5) as pubsub:
        for _ in range(3):  # each log line tries the file again
            assert pubsub.broker_statistics() is not None
    assert mpubsubd.signal(signal.SIGTERM) == pid


def log_has(daemon: Daemon, text: str, what: str) -> str:
    """Wait until the daemon's log holds *text*; the log."""
    wait_for(lambda: daemon.log.exists() and text in daemon.log.read_text(), what=what)
    return daemon.log.read_text()


def test_check_config_says_ok_or_each_problem(mpubsubd: Daemon) -> None:
    """--check-config: OK and 0; or each problem with file, line and key, and 78; starts nothing."""
    check = [*MPUBSUBD, "--check-config", "-c", str(mpubsubd.config)]
    good = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert (good.returncode, good.stdout, good.stderr) == (0, "OK\n", "")
    mpubsubd.configure(max_bufer="1", log_level="LOUD", authkey_file=str(mpubsubd.base / "key"))
    bad = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 78 and bad.stdout == ""
    assert bad.stderr.splitlines() == [  # the files it names too, whatever else is wrong
        f"{mpubsubd.config}:6: unknown key 'max_bufer' in [mpubsubd]",
        f"{mpubsubd.config}:7: log_level: 'LOUD' is not one of "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL",
        f"{mpubsubd.config}:8: authkey_file: cannot read {mpubsubd.base / 'key'}: "
        "No such file or directory",
    ]
    mpubsubd.configure(user="no-such-user-here")  # the user must exist
    missing = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 78
    assert missing.stderr == (
        f"{mpubsubd.config}:6: user: no user named 'no-such-user-here' "
        "(make install creates mpubsub; empty: stay root)\n"
    )
    started = mpubsubd.launch()  # and the start says the same, having made nothing
    assert started.returncode == 78
    assert started.stderr == f"mpubsubd: {missing.stderr}"
    assert not mpubsubd.run.exists()  # nothing was started
    usage = subprocess.run([*check, "--instance", "../etc"], capture_output=True, text=True)
    assert usage.returncode == 2 and "instance '../etc'" in usage.stderr


def test_instance_keeps_its_files_apart(tmp_path: Path) -> None:
    """--instance NAME: /etc/mpubsub/NAME.conf, files under /run/mpubsub-NAME/ unless set."""
    code = (
        "from mpubsubd._config import load, config_path\n"
        "import sys\n"
        "c = load(sys.argv[1], 'sensors')\n"
        "print(config_path('sensors'), c.address, c.credentials, c.pidfile, c.log_file, c.group)\n"
    )
    config = tmp_path / "sensors.conf"
    config.write_text("[mpubsubd]\ngroup = users\n")
    shown = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True
    )
    assert shown.stdout.split() == [
        "/etc/mpubsub/sensors.conf",
        "/run/mpubsub-sensors/broker.sock",
        "/run/mpubsub-sensors/broker.pckl",
        "/run/mpubsub-sensors/mpubsubd.pid",
        "/var/log/mpubsub/sensors.log",
        "users",
    ]
    absent = subprocess.run(
        [*MPUBSUBD, "--check-config", "--instance", "no-such-bus-here"],
        capture_output=True,
        text=True,
    )
    assert absent.returncode == 78
    assert absent.stderr == "/etc/mpubsub/no-such-bus-here.conf: no such file\n"


def test_reload_applies_what_can_change_and_names_the_rest(mpubsubd: Daemon) -> None:
    """SIGHUP re-reads the file: log level and caps apply at once; the address waits, WARNING."""
    pid = mpubsubd.started()
    with NetPubSub.from_file(str(mpubsubd.credentials), timeout=5) as first:
        assert first.flush()
        mpubsubd.configure(log_level="DEBUG", max_connections="1")
        text = mpubsubd.config.read_text()
        mpubsubd.config.write_text(text.replace(str(mpubsubd.socket), f"{mpubsubd.socket}.new"))
        os.kill(pid, signal.SIGHUP)
        log = log_has(mpubsubd, "reloaded", "the reload")
        assert f"reloaded {mpubsubd.config}: log_level, max_connections changed" in log
        assert (
            f"WARNING: reload: address changed in {mpubsubd.config}, "
            "but takes effect only at the next restart"
        ) in log
        second = NetPubSub.from_file(str(mpubsubd.credentials), timeout=2)
        with pytest.raises((ConnectionError, OSError)):  # max_connections = 1 holds
            second.connect()
        log_has(mpubsubd, "refusing a connection: 1 connections", "the cap's warning")
        first.add_subscriber("news/today", lambda topic, **message: None, weak=False)
        assert first.flush()  # the client connected before goes on
        log_has(mpubsubd, "subscribed to news/today", "a DEBUG line of its subscription")
    log_has(mpubsubd, "INFO: client 1 (uid 0 root, pid ", "an INFO line of its disconnection")
    assert mpubsubd.socket.exists()  # still where it started


def test_reload_refuses_a_bad_config(mpubsubd: Daemon) -> None:
    """A typo at reload is one ERROR naming file, line and key; the broker serves on as it was."""
    pid = mpubsubd.started()
    mpubsubd.configure(max_bufer="1")
    os.kill(pid, signal.SIGHUP)
    log = log_has(mpubsubd, "reload refused", "the refusal")
    assert (
        "ERROR: reload refused, the running configuration stays: "
        f"{mpubsubd.config}:6: unknown key 'max_bufer' in [mpubsubd]\n"
    ) in log
    exchange(mpubsubd.credentials)
    assert mpubsubd.pid() == pid


def test_journal_lines_carry_their_priority(mpubsubd: Daemon) -> None:
    """When stderr is the journal (JOURNAL_STREAM names it), each line starts <N>: <4> WARNING."""
    mpubsubd.run.mkdir()
    mpubsubd.pidfile.write_text("999999\n")  # stale: a WARNING at start
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    proc = subprocess.Popen(
        [*MPUBSUBD, "-f", "-c", str(mpubsubd.config)], stderr=write_end, env=env
    )
    os.close(write_end)
    try:
        wait_for(mpubsubd.credentials.exists, what="mpubsubd -f")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        stop_process(proc)
    with os.fdopen(read_end) as stream:
        lines = stream.read().splitlines()
    assert f"<4>WARNING mpubsubd: removed stale pidfile {mpubsubd.pidfile} " in "\n".join(lines)
    assert "<6>INFO mpubsubd: mpubsubd 0.1.0 serving; clients read " in "\n".join(lines)
    assert all(line.startswith(("<4>", "<6>", "<7>")) for line in lines), lines


def children_of(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found


def groups_of(pid: int) -> List[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Groups:"))
    return [int(n) for n in line.split()[1:]]


def uid_of(pid: int) -> List[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Uid:"))
    return [int(n) for n in line.split()[1:]]


def test_serves_as_its_user_with_root_owned_files(installed: Path, mpubsubd: Daemon) -> None:
    """user = nobody: the broker serves as nobody, its files stay root's; reload regroups them,
    logrotate's SIGHUP gets a new root-owned log, and the stop removes everything."""
    needs.check_other_users()
    mpubsubd.command = [str(installed)]
    mpubsubd.configure(user="nobody")
    pid = mpubsubd.started()
    assert uid_of(pid) == [65534] * 4
    (keeper,) = children_of(pid)  # root's work: reload, log file, cleanup
    assert uid_of(keeper) == [0] * 4
    assert groups_of(pid) == [65534]  # nobody's own groups, none of root's
    # The keeper holds stdin, stdout, stderr and its line to the broker: no listener, no log.
    assert len(os.listdir(f"/proc/{keeper}/fd")) == 4
    for path, mode in ((mpubsubd.credentials, 0o600), (mpubsubd.socket, 0o600)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, mode)
    assert "serving as user nobody (uid 65534)" in mpubsubd.log.read_text()
    exchange(mpubsubd.credentials)
    mpubsubd.configure(user="nobody", group="users")
    mpubsubd.log.rename(mpubsubd.log.with_suffix(".log.1"))
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, f"reloaded {mpubsubd.config}: group changed", "the reload")
    for path, mode in ((mpubsubd.credentials, 0o640), (mpubsubd.socket, 0o660)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 100, mode)
    info = mpubsubd.log.stat()  # made anew by the keeper, for logrotate's rename
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o640)
    exchange(mpubsubd.credentials)
    assert mpubsubd.signal(signal.SIGTERM) == pid
    wait_for(lambda: not alive(keeper), what="the keeper to exit")
    assert not mpubsubd.credentials.exists() and not mpubsubd.socket.exists()
    assert not mpubsubd.pidfile.exists()
    log = mpubsubd.log.with_suffix(".log.1").read_text() + mpubsubd.log.read_text()
    assert "WARNING: user = nobody: other services run as nobody too" in log
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert "mpubsubd stopped" in log and len(warnings) == 1, warnings


def test_user_that_cannot_be_taken_is_refused(installed: Path, mpubsubd: Daemon) -> None:
    """Not root with another user configured: one line, status 1, nothing left behind."""
    needs.check_other_users()
    mpubsubd.configure(  # nobody's own, writable places: later keys win
        user="root",
        **{
            "address": str(mpubsubd.base / "nobody" / "s"),
            "credentials": str(mpubsubd.base / "nobody" / "c"),
            "log_file": str(mpubsubd.base / "nobody" / "l"),
            "pidfile": str(mpubsubd.base / "nobody" / "p"),
        },
    )
    (mpubsubd.base / "nobody").mkdir()
    os.chown(mpubsubd.base / "nobody", 65534, 65534)
    result = subprocess.run(
        [
            *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
            *(str(installed), "-f", "-c", str(mpubsubd.config)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "mpubsubd: user = root: only root can serve as another user "
        "(mpubsubd runs as uid 65534; leave user empty)"
    )


def test_pidfile_naming_another_process_says_what_it_is(mpubsubd: Daemon) -> None:
    """A pidfile naming PID 1 (running, not mpubsubd) is stale, and the log says what pid 1 is."""
    mpubsubd.run.mkdir()
    mpubsubd.pidfile.write_text("1\n")
    mpubsubd.started()
    init = Path("/proc/1/comm").read_text().strip()
    assert f"removed stale pidfile {mpubsubd.pidfile} (pid 1 is {init}, not mpubsubd)" in (
        mpubsubd.log.read_text()
    )


def test_refused_second_instance_leaves_the_running_log_alone(mpubsubd: Daemon) -> None:
    """A second mpubsubd on the same socket and log, another pidfile: the reason on its terminal,
    nothing in the running daemon's log."""
    mpubsubd.started()
    before = mpubsubd.log.read_text()
    mpubsubd.configure(pidfile=str(mpubsubd.base / "second.pid"))
    result = mpubsubd.launch()
    assert result.returncode == 1
    assert result.stderr.startswith(f"mpubsubd: cannot listen on {mpubsubd.socket}: ")
    assert mpubsubd.log.read_text() == before
    exchange(mpubsubd.credentials)  # the first serves on


def test_a_storm_of_sighups_is_one_reload_at_a_time(mpubsubd: Daemon) -> None:
    """Signals that come while a reload waits to run make no more reloads: no backlog of
    reloads keeps the loop from its clients once the storm is over."""
    pid = mpubsubd.started()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        os.kill(pid, signal.SIGHUP)
    during = mpubsubd.log.read_text().count(": nothing changed")
    with NetPubSub.from_file(str(mpubsubd.credentials), timeout=5) as pubsub:
        assert pubsub.flush()
    mpubsubd.configure(log_level="DEBUG")  # the last reload, after every one of the storm
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "log_level changed", "the last reload")
    after = mpubsubd.log.read_text().count(": nothing changed") - during
    assert after <= 2, (during, after)


def test_relative_config_path_still_reloads(mpubsubd: Daemon) -> None:
    """-c mpubsubd.conf from the config's directory: the daemon moved to /, reloads read it."""
    mpubsubd.cwd = mpubsubd.base
    result = subprocess.run(
        [*mpubsubd.command, "-c", mpubsubd.config.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=mpubsubd.base,
    )
    assert result.returncode == 0, result.stderr
    mpubsubd.pids.append(mpubsubd.pid())
    os.kill(mpubsubd.pid(), signal.SIGHUP)
    assert f"reloaded {mpubsubd.config}: nothing changed" in log_has(mpubsubd, "reload", "it")


@pytest.mark.parametrize(
    "swapped", ["credentials-link", "socket-link", "credentials-dir"], ids=lambda name: name
)
def test_keeper_outlives_what_it_refuses(installed: Path, mpubsubd: Daemon, swapped: str) -> None:
    """The credentials or the socket swapped for a link to a root file (or a directory)
    before a reload that changes group: the keeper touches neither the link's target nor the
    directory, says so, and still does the next reload and the cleanup."""
    needs.check_other_users()
    mpubsubd.command = [str(installed)]
    mpubsubd.configure(user="nobody")
    pid = mpubsubd.started()
    target = mpubsubd.base / "target"
    target.write_text("root's\n")
    target.chmod(0o600)
    place = mpubsubd.socket if swapped.startswith("socket") else mpubsubd.credentials
    place.unlink()
    if swapped.endswith("dir"):
        place.mkdir(mode=0o700)
        target = place
    else:
        place.symlink_to(target)
    mpubsubd.configure(user="nobody", group="users")
    os.kill(pid, signal.SIGHUP)
    log = log_has(mpubsubd, "reloaded", "the reload")
    assert "WARNING: reload: cannot give the broker's files to group 'users': " in log
    info = target.stat()
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0o700 if target == place else 0o600)
    mpubsubd.configure(user="nobody", log_level="DEBUG")
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "log_level", "the second reload")
    assert mpubsubd.signal(signal.SIGTERM) == pid
    assert not mpubsubd.pidfile.exists()


def test_reload_warns_of_what_differs_from_the_running_broker(mpubsubd: Daemon) -> None:
    """The WARNING names every restart-only key that differs from what runs, whichever
    reload changed it, and none once the file says what runs again."""
    pid = mpubsubd.started()
    mpubsubd.configure(max_message_size="1048576")
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "WARNING: reload: max_message_size changed", "the first reload")
    mpubsubd.configure(max_message_size="1048576", max_topic_depth="64")
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "WARNING: reload: max_message_size, max_topic_depth changed", "the second")
    mpubsubd.configure(log_level="DEBUG")  # what runs, but the level
    os.kill(pid, signal.SIGHUP)
    log = log_has(mpubsubd, "log_level changed", "the third reload")
    assert log.count("WARNING") == 2, log


@pytest.mark.parametrize("made", [True, False], ids=["made", "administrators"])
def test_reload_regroups_only_the_directories_mpubsubd_made(mpubsubd: Daemon, made: bool) -> None:
    """A new group: a runtime directory mpubsubd made for the old one follows it; one the
    administrator made (here 2750 root:users) is left as it is."""
    if not made:
        mpubsubd.run.mkdir()
        os.chown(mpubsubd.run, 0, 100)
        mpubsubd.run.chmod(0o2750)
    mpubsubd.configure(group="users")
    pid = mpubsubd.started()
    before = mpubsubd.run.stat()
    mpubsubd.configure(group="nogroup")
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "group changed", "the reload")
    after = mpubsubd.run.stat()
    assert mpubsubd.credentials.stat().st_gid == 65534
    if made:
        assert (before.st_gid, after.st_gid, stat.S_IMODE(after.st_mode)) == (100, 65534, 0o750)
    else:
        assert (after.st_gid, stat.S_IMODE(after.st_mode)) == (100, 0o2750)


def test_keeper_removes_what_a_killed_broker_left(installed: Path, mpubsubd: Daemon) -> None:
    """user = nobody, the broker killed (-9): its keeper removes the stale socket, credentials
    and pidfile, so no one (logrotate) takes a reused pid for mpubsubd's."""
    needs.check_other_users()
    mpubsubd.command = [str(installed)]
    mpubsubd.configure(user="nobody")
    pid = mpubsubd.started()
    (keeper,) = children_of(pid)
    mpubsubd.signal(signal.SIGKILL)
    wait_for(lambda: not alive(keeper), what="the keeper to exit")
    assert not mpubsubd.pidfile.exists()
    assert not mpubsubd.credentials.exists() and not mpubsubd.socket.exists()


def test_reload_changes_the_handshake_timeout_at_once(mpubsubd: Daemon) -> None:
    """handshake_timeout is live: lowered from 120 s to 0.5 s, a silent peer is cut at once,
    and no WARNING says it waits for a restart."""
    mpubsubd.configure(handshake_timeout="120")
    pid = mpubsubd.started()
    mpubsubd.configure(handshake_timeout="0.5")
    os.kill(pid, signal.SIGHUP)
    log = log_has(mpubsubd, "reloaded", "the reload")
    assert f"reloaded {mpubsubd.config}: handshake_timeout changed" in log
    assert "WARNING" not in log
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(mpubsubd.socket))
        wait_closed(silent, what="the silent peer to be cut")


def test_refused_reload_still_reopens_the_log(mpubsubd: Daemon) -> None:
    """logrotate's SIGHUP meets a bad file: the reload is refused, the log is reopened all
    the same, and the refusal is in the new file."""
    pid = mpubsubd.started()
    mpubsubd.log.rename(mpubsubd.log.with_suffix(".log.1"))
    mpubsubd.configure(max_bufer="1")
    os.kill(pid, signal.SIGHUP)
    log_has(mpubsubd, "reload refused", "the refusal in the new log")


def test_reload_moves_the_log_file(mpubsubd: Daemon) -> None:
    """log_file is live: the next line goes to the new path, which the reload names."""
    pid = mpubsubd.started()
    moved = mpubsubd.log.with_name("moved.log")
    mpubsubd.configure(log_file=str(moved))
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: moved.exists() and "reopened the log file" in moved.read_text(), what="it")
    assert f"reopened the log file {moved}" in moved.read_text()


def test_reload_back_to_no_group(mpubsubd: Daemon) -> None:
    """group = users, then empty, then users, then empty again: each reload gives the files
    the group it names (root only: 0600), and the runtime directory mpubsubd made for users
    goes back to 0755 root:root."""
    mpubsubd.configure(group="users")
    pid = mpubsubd.started()
    assert stat.S_IMODE(mpubsubd.run.stat().st_mode) == 0o750
    for group, gid, mode in (("", 0, 0o600), ("users", 100, 0o640), ("", 0, 0o600)):
        mpubsubd.configure(group=group)
        before = mpubsubd.log.read_text().count("group changed")
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: mpubsubd.log.read_text().count("group changed") > before, what="it")  # noqa: B023
        info = mpubsubd.credentials.stat()
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (gid, mode), group
    info = mpubsubd.run.stat()
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0o755)


def test_a_start_that_fails_leaves_no_files(mpubsubd: Daemon) -> None:
    """Root without CAP_CHOWN cannot give the files to the group: the start fails saying
    what may forbid it, and the credentials it wrote are gone."""
    needs.check_other_users()
    mpubsubd.configure(group="users")
    mpubsubd.run.mkdir()  # the administrator's: mpubsubd need not make it
    result = subprocess.run(
        ["setpriv", "--bounding-set=-chown", *MPUBSUBD, "-f", "-c", str(mpubsubd.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"mpubsubd: cannot give {mpubsubd.credentials} to group users: Operation not permitted "
        "(root may not chown here: does a SystemCallFilter= without @chown, "
        "or a CapabilityBoundingSet= without CAP_CHOWN, forbid it?)"
    )
    assert not mpubsubd.credentials.exists() and not mpubsubd.socket.exists()


def test_check_config_problems_are_errors_in_the_journal(mpubsubd: Daemon) -> None:
    """Under systemd (JOURNAL_STREAM names stderr) each problem line is priority 3, err."""
    mpubsubd.configure(max_bufer="1", log_level="LOUD")
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    check = subprocess.run(
        [*MPUBSUBD, "--check-config", "-c", str(mpubsubd.config)],
        stderr=write_end,
        env=env,
        timeout=60,
    )
    os.close(write_end)
    with os.fdopen(read_end) as stream:
        lines = stream.read().splitlines()
    assert check.returncode == 78
    assert len(lines) == 2 and all(line.startswith(f"<3>{mpubsubd.config}:") for line in lines)


def test_files_where_another_user_may_swap_directories_are_refused(mpubsubd: Daemon) -> None:
    """A runtime directory inside one nobody owns: nobody could put a link in its place,
    and root would remove or regroup files elsewhere. Refused at check and start (78)."""
    needs.check_other_users()
    theirs = mpubsubd.base / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    mpubsubd.configure(credentials=str(theirs / "run" / "broker.pckl"))
    result = mpubsubd.launch()
    assert result.returncode == 78
    assert result.stderr == (
        f"mpubsubd: {mpubsubd.config}:3: credentials: {theirs / 'run'} is in {theirs}, which "
        "another user may change (owner uid 65534, mode 755): keep mpubsubd's files where "
        "only root writes\n"
    )
    assert not (theirs / "run").exists()
