"""The ``mpubsubd`` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mpubsub import __version__

from ._config import DEFAULT_PATH, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpubsubd",
        description="Run the host's mpubsub broker. Clients find it through the "
        "credentials file (by default /run/mpubsub/broker.pckl).",
    )
    parser.add_argument(
        "-c", "--config", metavar="CONFIG", help=f"configuration file (default: {DEFAULT_PATH})"
    )
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground and log to stderr (for systemd)",
    )
    parser.add_argument("--version", action="version", version=f"mpubsubd {__version__}")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Start mpubsubd; on failure, one line on stderr and exit status 1."""
    args = _parser().parse_args(argv)
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
        config = load(args.config)
        if args.foreground:
            run_foreground(config)
        else:
            run_daemon(config)
    except (ConfigError, StartupError) as exc:
        sys.exit(f"mpubsubd: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
