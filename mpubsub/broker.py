"""The broker, and ``python -m mpubsub.broker``: a standalone broker.

The standalone broker writes its ``(address, authkey)`` pickle to FILE
(mode 0600: it holds a secret) for clients to read with
``NetPubSub.from_file``, serves until SIGINT or SIGTERM, then removes FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import secrets
import stat
import sys
from typing import List, Optional

from ._broker import CAPS, DEFAULT_MAX_BUFFER, Broker
from ._credentials import parse_address, write_credentials
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT
from ._policy import Policy
from ._protocol import DEFAULT_MAX_MESSAGE

__all__ = ["DEFAULT_MAX_BUFFER", "DEFAULT_MAX_MESSAGE", "Broker", "Policy", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpubsub.broker",
        description="Run a broker and write its (address, authkey) pickle to FILE, "
        "for clients to read with NetPubSub.from_file(FILE).",
    )
    parser.add_argument("file", metavar="FILE", help="where to write the address and authkey")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="a Unix socket path, or HOST:PORT for TCP (default: a private Unix socket)",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        metavar="BYTES",
        help="largest message accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=DEFAULT_MAX_BUFFER,
        metavar="BYTES",
        help="unsent bytes a client may lag behind before it is disconnected "
        "(default: %(default)s)",
    )
    for name, (default, what) in CAPS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=default,
            metavar="N",
            help=f"the most {what} (default: %(default)s)",
        )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time a new connection has to authenticate (default: %(default)s)",
    )
    parser.add_argument(
        "--bridge-key-file",
        metavar="KEYFILE",
        help="take as federation bridge the client whose BRIDGE frame holds the bytes of "
        "KEYFILE (at least 16, readable by its owner only); without it, no client may be "
        "the bridge",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run the standalone broker; exit with a one-line message on a user mistake."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not args.overwrite and os.path.lexists(args.file):
        sys.exit(f"error: {args.file} already exists; pass --overwrite to replace it")
    authkey = secrets.token_bytes(32)
    address = parse_address(args.address) if args.address else None
    try:
        bridge_key = _read_key(args.bridge_key_file) if args.bridge_key_file else None
        broker = Broker(
            address,
            authkey,
            bridge_key=bridge_key,
            timeout=args.handshake_timeout,
            max_message_size=args.max_message_size,
            max_buffer=args.max_buffer,
            **{name: getattr(args, name) for name in CAPS},
        )
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot start the broker: {exc}")
    try:
        write_credentials(args.file, broker.address, authkey, overwrite=args.overwrite)
    except OSError as exc:
        sys.exit(f"error: cannot write {args.file}: {exc.strerror or exc}")
    try:
        broker.start(handle_signals=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.file)


def _read_key(path: str) -> bytes:
    """The bytes of *path*: a regular file, not a symbolic link, that only its owner reads.

    ValueError, one line naming *path*, for anything else.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        why = "a symbolic link, not followed" if exc.errno == errno.ELOOP else exc.strerror
        raise ValueError(f"bridge key file {path}: {why}") from None
    try:  # a file object would refuse a directory before we could say why
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"bridge key file {path}: not a regular file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"bridge key file {path}: others may read it "
                f"(mode {stat.S_IMODE(mode):o}; chmod 600 it)"
            )
        return os.read(fd, 4096)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
