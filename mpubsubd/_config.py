"""mpubsubd's configuration: an INI file with one section, ``[mpubsubd]``."""

from __future__ import annotations

import configparser
import grp
import logging
import os
import stat
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional

from mpubsub._broker import DEFAULT_MAX_BUFFER
from mpubsub._credentials import Address, parse_address
from mpubsub._protocol import DEFAULT_MAX_MESSAGE

DEFAULT_PATH = "/etc/mpubsub/mpubsubd.conf"
SECTION = "mpubsubd"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Config:
    """Every setting, with the defaults ``etc/mpubsubd.conf`` documents."""

    address: str = "/run/mpubsub/broker.sock"
    credentials: str = "/run/mpubsub/broker.pckl"
    group: str = ""
    pidfile: str = "/run/mpubsub/mpubsubd.pid"
    authkey_file: str = ""
    log_file: str = "/var/log/mpubsub/mpubsubd.log"
    log_level: str = "INFO"
    max_message_size: int = DEFAULT_MAX_MESSAGE
    max_buffer: int = DEFAULT_MAX_BUFFER
    handshake_timeout: float = 5.0

    @property
    def broker_address(self) -> Address:
        """The address as the Broker takes it: a socket path or ``(host, port)``."""
        return parse_address(self.address)

    @property
    def gid(self) -> Optional[int]:
        """The group allowed to connect, or None."""
        return grp.getgrnam(self.group).gr_gid if self.group else None

    @property
    def level(self) -> int:
        return int(getattr(logging, self.log_level))


def load(path: Optional[str]) -> Config:
    """Read *path* (or the default file, which may be missing) and check every value."""
    parser = configparser.ConfigParser(interpolation=None)
    name = path or DEFAULT_PATH
    try:
        with open(name, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        if path is not None:
            raise ConfigError(f"{name}: no such file") from None
        return Config()
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{name}: no [{SECTION}] section")
    known = {f.name: f for f in fields(Config)}
    values: Dict[str, Any] = {}
    for key, raw in parser.items(SECTION):
        if key not in known:
            raise ConfigError(f"{name}: unknown key '{key}' in [{SECTION}]")
        try:
            values[key] = _CHECKS.get(key, _text)(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{name}: {key}: {exc}") from None
    config = Config(**values)
    if config.max_buffer < config.max_message_size:
        raise ConfigError(f"{name}: max_buffer: must be at least max_message_size")
    return config


def _text(value: str) -> str:
    return value


def _positive(convert: Callable[[str], Any], unit: str) -> Callable[[str], Any]:
    def check(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            raise ValueError(f"{value!r} is not {unit}") from None
        if number <= 0:
            raise ValueError(f"{value!r} must be positive")
        return number

    return check


def _log_level(value: str) -> str:
    if value.upper() not in _LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(_LEVELS)}")
    return value.upper()


def _group(value: str) -> str:
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no group named {value!r}") from None
    return value


def _address(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    parsed = parse_address(value)
    if isinstance(parsed, str) and not os.path.isabs(parsed):
        raise ValueError(f"{value!r} is neither an absolute socket path nor HOST:PORT")
    return value


def _absolute_path(value: str) -> str:
    if not os.path.isabs(value):
        raise ValueError(f"{value!r} is not an absolute path")
    return value


def _optional_path(value: str) -> str:
    return _absolute_path(value) if value else value


_CHECKS: Dict[str, Callable[[str], Any]] = {
    "address": _address,
    "credentials": _absolute_path,
    "group": _group,
    "pidfile": _absolute_path,
    "authkey_file": _optional_path,
    "log_file": _absolute_path,
    "log_level": _log_level,
    "max_message_size": _positive(int, "a whole number of bytes"),
    "max_buffer": _positive(int, "a whole number of bytes"),
    "handshake_timeout": _positive(float, "a number of seconds"),
}


def read_authkey(path: str) -> bytes:
    """The stable key in *path*, which must be non-empty and readable by its owner only."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read(4096)
    except OSError as exc:
        raise ConfigError(f"authkey_file: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"authkey_file: {path} must be readable by its owner only "
            f"(mode {stat.S_IMODE(mode):o}; chmod 600 it)"
        )
    if not key.strip():
        raise ConfigError(f"authkey_file: {path} is empty")
    return key
