"""mpubsubd's care of its federation bridge: start it, restart it when it dies, stop it.

The bridge is a child process rather than a unit of its own: it reads the
same configuration, lives exactly as long as the broker it serves (it
exits when the broker's connection closes), works the same under systemd,
as a classic daemon and in the foreground, and a slow NATS can never stall
the broker's single-threaded loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, Optional

from mpubsub._for_mpubsubd import Address, reason

from ._config import Config
from ._handover import hand_over

logger = logging.getLogger("mpubsubd")

_FIRST_DELAY = 0.5
_MAX_DELAY = 30.0
_STABLE = 60.0  # a bridge that ran this long restarts at once after it died
_STOP_TIMEOUT = 5.0
_MAX_LINE = 64 * 1024  # of the bridge's log lines, copied as they come
# The directory holding this mpubsubd package, and how the bridge starts.
_PACKAGES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BRIDGE_MAIN = (
    "import sys; where = sys.argv.pop(1)\n"
    "if where not in sys.path: sys.path.insert(0, where)\n"
    "from mpubsubd._handover import take_over\n"
    "settings, fds = take_over(int(sys.argv[1]))\n"
    "from mpubsubd._bridge import main; main(settings, fds)"
)
_HANDOVER_TIMEOUT = 30.0  # for the bridge to start and ask for its keys


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
        self._settings: Dict[str, Any] = {
            "federation": dataclasses.asdict(config.federation),
            "secret": secret.hex(),
            "bridge_key": bridge_key.hex(),  # the broker takes as bridge only who shows it
            "log_to_file": log_line is not None,
            "log_level": config.log_level,
        }
        self._log_line = log_line
        self._dial: Callable[[], socket.socket] = socket.socket  # start() says how
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen[bytes]] = None
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
        self._settings.update(address=address, authkey=authkey.hex())
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

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The bridge runs as mpubsubd's user (root, or the user it became):
        # isolated (-I: neither the working directory nor PYTHON* variables
        # reach its sys.path) and from "/", it imports mpubsubd from where this
        # process found it, and the rest from the interpreter's own directories.
        # It gets its keys and descriptors once it can prove itself (_handover).
        control, theirs = socket.socketpair()
        with control:
            with theirs:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-c", _BRIDGE_MAIN, _PACKAGES, str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    cwd="/",
                )
            control.settimeout(_HANDOVER_TIMEOUT)
            try:
                self._hand_over(control, process.pid)
            except (OSError, ValueError) as exc:
                logger.warning(
                    "the bridge (pid %d) was not given its keys: %s; stopping it",
                    process.pid,
                    reason(exc),
                )
                process.kill()
        return process

    def _hand_over(self, control: socket.socket, pid: int) -> None:
        read_end = write_end = None
        if self._log_line is not None:  # the bridge's stderr, copied into the log file
            read_end, write_end = os.pipe()
        try:
            with self._dial() as connected:
                fds = [connected.fileno()] + ([write_end] if write_end is not None else [])
                hand_over(control, pid, self._settings, fds)
        except BaseException:
            if read_end is not None:
                os.close(read_end)
            raise
        finally:
            if write_end is not None:
                os.close(write_end)
        if read_end is not None:
            stream = os.fdopen(read_end, "rb")
            threading.Thread(
                target=self._copy_lines, args=(stream,), name="bridge log", daemon=True
            ).start()

    def _copy_lines(self, stream: IO[bytes]) -> None:
        """The bridge's lines into mpubsubd's log file, until the bridge exits."""
        assert self._log_line is not None
        with stream:
            while True:
                line = stream.readline(_MAX_LINE)  # longer ones arrive in pieces
                if not line:
                    return
                self._log_line(line.decode("utf-8", "backslashreplace"))
