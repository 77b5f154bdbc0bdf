"""The ``mpubsubd`` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from mpubsub import __version__

from ._config import ConfigError, check, check_instance, config_path
from ._logging import to_journal

#: The exit status of a configuration that cannot be used (sysexits.h's
#: EX_CONFIG): the unit's RestartPreventExitStatus= names it, so systemd
#: does not restart what would fail again.
EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpubsubd",
        description="Run the host's mpubsub broker. Clients find it through the "
        "credentials file (by default /run/mpubsub/broker.pckl).",
    )
    parser.add_argument(
        "-c", "--config", metavar="CONFIG", help=f"configuration file (default: {config_path()})"
    )
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground and log to stderr (for systemd)",
    )
    parser.add_argument(
        "-i",
        "--instance",
        metavar="NAME",
        default="",
        help="run the bus NAME beside the host's main one: its configuration is "
        "/etc/mpubsub/NAME.conf, its files default to /run/mpubsub-NAME/ "
        "(the unit mpubsubd@NAME)",
    )
    parser.add_argument(
        "-t",
        "--check-config",
        action="store_true",
        help="check the configuration and the files it names, print OK or each "
        f"problem, and exit (status 0, or {EX_CONFIG} if it cannot be used)",
    )
    parser.add_argument("--version", action="version", version=f"mpubsubd {__version__}")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Start mpubsubd; on failure, one line on stderr and exit status 1 (78: configuration)."""
    # logrotate may signal the pid in the pidfile the moment it appears: until
    # mpubsubd handles SIGHUP (a reload), one must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config:  # reloads read it again after the daemon moved to /
        args.config = os.path.abspath(args.config)
    if args.instance:
        try:
            check_instance(args.instance)
        except ValueError as exc:
            parser.error(str(exc))
    if args.check_config:
        sys.exit(_check_config(args.config, args.instance))
    try:
        import daemon.pidfile  # noqa: F401, PLC0415
        import lockfile  # noqa: F401, PLC0415
    except ImportError as exc:
        module = (exc.name or "daemon").split(".")[0]
        package = {"daemon": "python-daemon"}.get(module, module)
        sys.exit(
            f"mpubsubd: {package} is not installed: "
            "install the daemon extra, pip install 'mpubsub[daemon]'"
        )
    from ._daemon import StartupError, run_daemon, run_foreground  # noqa: PLC0415

    try:
        # What --check-config checks, before anything is made: a user that does not
        # exist must not leave a runtime directory and an empty log behind.
        config, problems = check(args.config, args.instance)
        if problems:
            raise ConfigError(*problems)
        assert config is not None
        if args.foreground:
            run_foreground(config, args.config, args.instance)
        else:
            run_daemon(config, args.config, args.instance)
    except ConfigError as exc:
        _error(f"mpubsubd: {exc}")
        sys.exit(EX_CONFIG)
    except StartupError as exc:
        _error(f"mpubsubd: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _check_config(path: Optional[str], instance: str) -> int:
    """``--check-config``: OK on stdout and 0, or one line per problem on stderr and 78."""
    _, problems = check(path, instance)
    for problem in problems:
        _error(problem)
    if problems:
        return EX_CONFIG
    print("OK")
    if path is None and not instance and not os.path.exists(config_path()):
        _error(f"mpubsubd: no {config_path()}: the built-in defaults apply")
    return 0


def _error(line: str) -> None:
    """*line* on stderr, at priority err when stderr is the journal."""
    print(f"<3>{line}" if to_journal() else line, file=sys.stderr)
