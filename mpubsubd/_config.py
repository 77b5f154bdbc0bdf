"""mpubsubd's configuration: an INI file with ``[mpubsubd]`` and, optionally, ``[federation]``."""

from __future__ import annotations

import configparser
import grp
import os
import re
import socket
import stat
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Tuple

from mpubsub._for_mpubsubd import (
    CAPS,
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    parse_address,
    parse_topic,
)
from mpubsub.broker import DEFAULT_MAX_BUFFER, DEFAULT_MAX_MESSAGE

DEFAULT_PATH = "/etc/mpubsub/mpubsubd.conf"
SECTION = "mpubsubd"
FEDERATION = "federation"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class FederationConfig:
    """The ``[federation]`` section: joining other hosts' brokers through NATS."""

    servers: str = ""
    subject_prefix: str = "mpubsub"
    secret_file: str = ""
    name: str = ""
    local_only: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    max_control_line: int = 4096
    max_clock_skew: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.servers)

    @property
    def server_urls(self) -> Tuple[str, ...]:
        return tuple(url.strip() for url in self.servers.split(",") if url.strip())

    @property
    def host_name(self) -> str:
        """This host's name in the federation: ``name``, or the host name."""
        return self.name or socket.gethostname()

    @property
    def local_only_topics(self) -> Tuple[Tuple[str, ...], ...]:
        """The topic prefixes that never leave this host."""
        return tuple(parse_topic(t.strip()) for t in self.local_only.split(",") if t.strip())


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
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_topic_depth: int = CAPS["max_topic_depth"][0]
    max_topic_size: int = CAPS["max_topic_size"][0]
    max_subscriptions: int = CAPS["max_subscriptions"][0]
    max_subscription_bytes: int = CAPS["max_subscription_bytes"][0]
    max_connections: int = CAPS["max_connections"][0]
    max_handshakes: int = CAPS["max_handshakes"][0]
    max_handshakes_per_peer: int = CAPS["max_handshakes_per_peer"][0]
    max_input_buffer: int = CAPS["max_input_buffer"][0]
    route_cache_bytes: int = CAPS["route_cache_bytes"][0]
    federation: FederationConfig = field(default_factory=FederationConfig)

    @property
    def broker_address(self) -> Address:
        """The address as the Broker takes it: a socket path or ``(host, port)``."""
        return parse_address(self.address)

    @property
    def gid(self) -> Optional[int]:
        """The group allowed to connect, or None."""
        return grp.getgrnam(self.group).gr_gid if self.group else None


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
    for section in parser.sections():
        if section not in (SECTION, FEDERATION):
            raise ConfigError(f"{name}: unknown section [{section}]")
    values = _section(parser, name, SECTION, Config)
    if parser.has_section(FEDERATION):
        values["federation"] = FederationConfig(
            **_section(parser, name, FEDERATION, FederationConfig)
        )
    config = Config(**values)
    for key, least in (
        ("max_buffer", "max_message_size"),
        ("max_input_buffer", "max_message_size"),
    ):
        if getattr(config, key) < getattr(config, least):
            raise ConfigError(f"{name}: {key}: must be at least {least}")
    if config.max_topic_size > config.max_message_size:
        raise ConfigError(f"{name}: max_topic_size: must be at most max_message_size")
    federation = config.federation
    if federation.enabled and not federation.secret_file:
        raise ConfigError(f"{name}: secret_file: required in [{FEDERATION}] when servers is set")
    return config


def _section(
    parser: configparser.ConfigParser, name: str, section: str, cls: type
) -> Dict[str, Any]:
    known = {f.name for f in fields(cls)} - {"federation"}
    values: Dict[str, Any] = {}
    for key, raw in parser.items(section):
        if key not in known:
            raise ConfigError(f"{name}: unknown key '{key}' in [{section}]")
        try:
            values[key] = _CHECKS.get(key, _text)(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{name}: {key}: {exc}") from None
    return values


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


def _servers(value: str) -> str:
    for url in (u.strip() for u in value.split(",")):
        if url and not re.match(r"^(nats|tls|ws|wss)://[^/\s]+/?$", url):
            raise ValueError(f"{url!r} is not a NATS URL like nats://host:4222")
    return value


_TOKEN = r"[A-Za-z0-9_-]+"


def _subject_prefix(value: str) -> str:
    if not re.fullmatch(rf"{_TOKEN}(\.{_TOKEN})*", value):
        raise ValueError(f"{value!r} is not NATS tokens (letters, digits, - and _) joined by dots")
    return value


def _control_line(value: str) -> int:
    number: int = _positive(int, "a whole number of bytes")(value)
    if number < 256:  # nats-server's own floor is far above: a typo
        raise ValueError(f"{value!r} is under 256 bytes")
    return number


def _name(value: str) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError("must be at most 255 bytes")
    return value


def _local_only(value: str) -> str:
    # Topics are written as the mpubsub command writes them: a/b is ('a', 'b').
    for text in value.split(","):
        if text.strip() and not parse_topic(text.strip()):
            raise ValueError("'/' would keep every topic on this host: leave servers empty instead")
    return value


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
    **{key: _positive(int, "a whole number") for key in CAPS},
    "servers": _servers,
    "max_control_line": _control_line,
    "max_clock_skew": _positive(float, "a number of seconds"),
    "subject_prefix": _subject_prefix,
    "secret_file": _optional_path,
    "name": _name,
    "local_only": _local_only,
    "creds_file": _optional_path,
    "tls_ca_file": _optional_path,
    "tls_cert_file": _optional_path,
    "tls_key_file": _optional_path,
}


def read_authkey(path: str, key: str = "authkey_file") -> bytes:
    """The secret in *path* (for the setting *key*): non-empty, owned by the user running
    mpubsubd (root, as a service) and readable by it only."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            secret = f.read(4096)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    mode = info.st_mode
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{key}: {path} must belong to the user running mpubsubd (uid {os.geteuid()}), "
            f"not uid {info.st_uid}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{key}: {path} must be readable by its owner only "
            f"(mode {stat.S_IMODE(mode):o}; chmod 600 it)"
        )
    if not secret.strip():
        raise ConfigError(f"{key}: {path} is empty")
    return secret
