"""The broker's listening socket: stale socket files, exposure, and descriptor limits."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import sys

logger = logging.getLogger("mpubsub.broker")


def raise_file_limit() -> int:
    """Allow as many descriptors as the hard limit does: one per client; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    logger.info("open file limit: %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse one that is alive."""
    if path.startswith("\0") or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        logger.info("removed stale socket file %s", path)
        return
    except OSError:
        return  # not a socket, or not ours: let bind() report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"a broker is already listening on {path}")


def warn_if_exposed(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        logger.warning(
            "listening on %s: messages travel in plain text; use trusted networks only", host
        )


def address_account(address: object) -> str:
    """Whose quotas a TCP peer at *address* counts in: its IP address (an IPv6 /64)."""
    assert isinstance(address, tuple)
    host = ipaddress.ip_address(str(address[0]).split("%")[0])
    if isinstance(host, ipaddress.IPv6Address):
        if host.ipv4_mapped is not None:
            return str(host.ipv4_mapped)
        # One host or site usually holds a whole /64: count it as one peer.
        return str(ipaddress.IPv6Network((host, 64), strict=False))
    return str(host)
