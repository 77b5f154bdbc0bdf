"""Broker addresses and the ``(address, authkey)`` credentials file."""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import stat
import tempfile
from typing import Any, Optional, Tuple, Union

from .errors import CredentialsError

Address = Union[str, Tuple[str, int]]


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` is a TCP address; anything else is a socket path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host and "/" not in text:
        return host.strip("[]"), int(port)
    return text


def family_of(address: Any) -> socket.AddressFamily:
    """The socket family of a multiprocessing-style address."""
    if isinstance(address, str):
        return socket.AF_UNIX
    if isinstance(address, tuple) and len(address) == 2:
        return socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    raise ValueError(f"unsupported broker address {address!r}: use a socket path or (host, port)")


class _PlainUnpickler(pickle.Unpickler):
    """Builds plain tuples, strings, bytes and ints; refuses every global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_credentials(path: Union[str, os.PathLike[str]]) -> Tuple[Address, bytes]:
    """Read an ``(address, authkey)`` pickle, refusing a file someone else could have planted.

    The file itself must be a regular file, not a symbolic link (links in the
    directories above it are followed), owned by root or by the calling
    process's effective user, and not writable by group or others. Only
    plain tuples, strings, bytes and ints are unpickled, never a global.
    Anything else raises CredentialsError, one line naming *path* and why.
    """
    data = _read_trusted(path)
    try:
        address, authkey = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception:
        raise CredentialsError(
            f"credentials file {path} is not an (address, authkey) pickle"
        ) from None
    if isinstance(address, list):
        address = tuple(address)
    if not isinstance(authkey, bytes):
        raise CredentialsError(f"credentials file {path} holds no authkey bytes")
    family_of(address)
    return address, authkey


def _read_trusted(path: Union[str, os.PathLike[str]]) -> bytes:
    """The first 64 KiB of *path*, once its descriptor shows that it may be trusted."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        try:  # a file object would refuse a directory before we could say why
            reason = _distrust(os.fstat(fd))
            data = b"" if reason else os.read(fd, 65536)
        finally:
            os.close(fd)
    except PermissionError:
        raise CredentialsError(
            f"cannot read credentials file {path}: permission denied "
            "(ask for the broker's group, see the 'group' option of mpubsubd)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            reason = "it is a symbolic link"
        else:
            raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
    if reason:
        raise CredentialsError(f"refusing credentials file {path}: {reason}")
    return data


def _distrust(info: os.stat_result) -> str:
    """Why a file with status *info* is not to be trusted; ``''`` if it is."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    uid = os.geteuid()
    if info.st_uid not in (0, uid):
        return f"owned by uid {info.st_uid}, not by root or you (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others can write it (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def write_credentials(
    path: Union[str, os.PathLike[str]],
    address: Address,
    authkey: bytes,
    *,
    overwrite: bool,
    gid: Optional[int] = None,
) -> None:
    """Write the credentials atomically; FileExistsError unless *overwrite*.

    The file is 0600, or 0640 and group *gid* when given: it holds a secret.
    """
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
                os.fchmod(f.fileno(), 0o640)
            pickle.dump((address, authkey), f, protocol=4)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone created it meanwhile
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
