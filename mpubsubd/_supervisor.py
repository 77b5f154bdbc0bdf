"""mpubsubd's care of its federation bridge: start it, restart it when it dies, stop it.

The bridge is a child process rather than a unit of its own: it reads the
same configuration, lives exactly as long as the broker it serves (it
exits when the broker's connection closes), works the same under systemd,
as a classic daemon and in the foreground, and a slow NATS can never stall
the broker's single-threaded loop.

It is forked, not executed anew: a process of mpubsubd's user that exec()s
is dumpable, and another process of that user could trace or read it (its
keys) until it made itself otherwise. A fork of the broker process, which
the kernel made non-dumpable when it changed its user, is so from its
first instruction, and it has the settings in memory: nothing to hand over.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import IO, Callable, List, Optional, Tuple

from mpubsub._for_mpubsubd import Address

from ._config import Config

logger = logging.getLogger("mpubsubd")

_FIRST_DELAY = 0.5
_MAX_DELAY = 30.0
_STABLE = 60.0  # a bridge that ran this long restarts at once after it died
_STOP_TIMEOUT = 5.0
_MAX_LINE = 64 * 1024  # of the bridge's log lines, copied as they come


class BridgeSupervisor:
    """Keeps one bridge process running from ``start()`` to ``stop()``."""

    def __init__(
        self,
        config: Config,
        secret: bytes,
        bridge_key: bytes,
        *,
        log_line: Optional[Callable[[str], None]],
    ) -> None:
        """*log_line*, if given, takes each line the bridge writes on stderr (for the log
        file); without, the bridge's stderr is mpubsubd's (the journal)."""
        # What the bridge, a fork of this process, finds in its memory.
        self._federation = config.federation
        self._secret = secret
        self._bridge_key = bridge_key  # the broker takes as bridge only who shows it
        self._broker: Tuple[Address, bytes] = ("", b"")  # start() says which
        self._log_level = config.log_level
        self._log_line = log_line
        self._dial: Callable[[], socket.socket] = socket.socket  # start() says how
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: Optional[_Forked] = None
        self._levels: Optional[int] = None  # the pipe to the running bridge, for set_log_level
        self._thread = threading.Thread(target=self._supervise, name="bridge", daemon=True)

    @property
    def pid(self) -> Optional[int]:
        """The running bridge's pid, or None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self, address: Address, authkey: bytes, dial: Callable[[], socket.socket]) -> None:
        """Start a bridge to the broker at *address*, which it authenticates to with
        *authkey*, over a connection *dial* opens for each bridge (``Broker.open_pair``:
        the bridge, as mpubsubd's user, may open neither the credentials file nor the
        socket's)."""
        self._broker = (address, authkey)
        self._dial = dial
        self._thread.start()

    def stop(self) -> None:
        """Stop the bridge (SIGTERM, then SIGKILL after a few seconds) and wait for it."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("the bridge (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(_STOP_TIMEOUT)

    def _supervise(self) -> None:
        delay = _FIRST_DELAY
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = self._spawn()
            logger.info("federation bridge started (pid %d)", self._process.pid)
            code = self._process.wait()
            # The bridge also exits when mpubsubd stops its broker: give the
            # stop a moment to be told before calling this a failure.
            if self._stopping.wait(0.5):
                return
            if time.monotonic() - started >= _STABLE:
                delay = _FIRST_DELAY
            logger.warning(
                "the federation bridge exited with status %d; restarting in %.1f s", code, delay
            )
            self._stopping.wait(delay)
            delay = min(delay * 2, _MAX_DELAY)

    def _spawn(self) -> _Forked:
        read_end = write_end = None
        if self._log_line is not None:  # the bridge's stderr, copied into the log file
            read_end, write_end = os.pipe()
        levels, self._levels = _new_levels_pipe(self._levels)
        with self._dial() as connected:
            pid = os.fork()
            if pid == 0:  # the bridge
                code = 1
                try:
                    fds = [connected.fileno(), levels]
                    fds += [write_end] if write_end is not None else []
                    code = self._be_the_bridge(fds)
                except BaseException:  # never back into the broker's code: said, then gone
                    traceback.print_exc()
                finally:
                    os._exit(code)
        os.close(levels)
        if write_end is not None:
            os.close(write_end)
        if read_end is not None:
            stream = os.fdopen(read_end, "rb")
            threading.Thread(
                target=self._copy_lines, args=(stream,), name="bridge log", daemon=True
            ).start()
        return _Forked(pid)

    def set_log_level(self, level: str) -> None:
        """At reload: the running bridge logs at *level* from now on, and so do the next."""
        self._log_level = level
        levels = self._levels
        if levels is not None:
            with contextlib.suppress(OSError):  # no bridge now, or a stuck one: the next
                os.write(levels, f"{level}\n".encode())

    def _be_the_bridge(self, fds: List[int]) -> int:
        """The forked bridge's life; its exit status.

        Of what it inherited it keeps stdin, stdout, stderr and *fds* only: a
        client's socket or the broker's end of the bridge's own pair, kept open
        here, would hide the broker's death from its peers. The broker's objects
        that held the rest are never finalized here (gc.freeze), so that none
        closes a number the bridge has opened meanwhile.
        """
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)  # the broker's handlers are not the bridge's
        gc.freeze()
        os.chdir("/")  # it holds no directory mpubsubd was started in (-f from anywhere)
        keep = sorted({0, 1, 2, *fds})
        for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        if self._log_line is not None:  # stderr is the log pipe from now on
            os.dup2(fds[2], 2)
        # A stderr of its own: the broker's may have been locked by another thread at fork.
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        _name_process(b"mpubsubd-bridge")
        from ._bridge import Bridge, main  # noqa: PLC0415  (only the bridge needs nats)

        bridge = Bridge(
            self._federation,
            self._broker,
            self._secret,
            self._bridge_key,
            connected=socket.socket(fileno=fds[0]),
        )
        return main(bridge, fds[1], log_to_file=self._log_line is not None, level=self._log_level)

    def _copy_lines(self, stream: IO[bytes]) -> None:
        """The bridge's lines into mpubsubd's log file, until the bridge exits."""
        assert self._log_line is not None
        with stream:
            while True:
                line = stream.readline(_MAX_LINE)  # longer ones arrive in pieces
                if not line:
                    return
                self._log_line(line.decode("utf-8", "backslashreplace"))


def _new_levels_pipe(old: Optional[int]) -> Tuple[int, int]:
    """A pipe for the next bridge's log levels, its read end and its write end (the
    previous bridge's write end *old* is closed); the write end never blocks."""
    if old is not None:
        os.close(old)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    return read_end, write_end


def _name_process(name: bytes) -> None:
    """prctl(PR_SET_NAME): what ps and /proc/PID/comm show for this process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


_PR_SET_NAME = 15  # linux/prctl.h


class _Forked:
    """A forked child, as far as the supervisor needs it (subprocess.Popen's names)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
