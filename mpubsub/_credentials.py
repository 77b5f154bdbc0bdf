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
    """Read an ``(address, authkey)`` pickle, refusing files others may write."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(65536)
    except PermissionError:
        raise CredentialsError(
            f"cannot read credentials file {path}: permission denied "
            "(ask for the broker's group, see the 'group' option of mpubsubd)"
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CredentialsError(
            f"refusing credentials file {path}: others can write it (mode {stat.S_IMODE(mode):o})"
        )
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
