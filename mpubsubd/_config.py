"""mpubsubd's configuration: an INI file with ``[mpubsubd]`` and, optionally, ``[federation]``
and ``[access]`` (the policy: whose keys hold ``:``, so that section is read with ``=`` as its
only delimiter)."""

from __future__ import annotations

import ast
import configparser
import grp
import os
import pwd
import re
import socket
import stat
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

from mpubsub._for_mpubsubd import (
    CAPS,
    DEFAULT_HANDSHAKE_TIMEOUT,
    LIVE_SETTINGS,
    Address,
    parse_address,
    parse_topic,
    printable,
    reason,
)
from mpubsub.broker import DEFAULT_MAX_BUFFER, DEFAULT_MAX_MESSAGE, Policy

DEFAULT_PATH = "/etc/mpubsub/mpubsubd.conf"
SECTION = "mpubsubd"
FEDERATION = "federation"
ACCESS = "access"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


#: What a reload (SIGHUP) applies while mpubsubd serves. The rest takes
#: effect at the next start: where the broker listens and its files, the
#: keys, the user, the limits announced to clients when they connect
#: (max_message_size, max_topic_*, max_subscription*), and [federation].
#: BROKER_KEYS are the live keys that are the broker's settings of that name
#: (``policy`` is the [access] section).
BROKER_KEYS = tuple(key for key in LIVE_SETTINGS if key != "timeout")
LIVE_KEYS = (
    "log_level",
    "log_file",
    "group",
    "handshake_timeout",  # the broker's timeout
    *BROKER_KEYS,
    f"[{ACCESS}]",  # the broker's policy, as changed_keys names it
)


class ConfigError(Exception):
    """The configuration cannot be used: one line per problem, naming the file and the key.

    ``str()`` is the first problem (and how many more there are), for a
    one-line message; ``problems`` holds each.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = list(problems)
        more = len(problems) - 1
        extra = f" (and {more} more: mpubsubd --check-config lists them)" if more > 0 else ""
        super().__init__(problems[0] + extra)


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
    user: str = ""
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
    max_connections_per_user: int = CAPS["max_connections_per_user"][0]
    max_subscriptions_per_user: int = CAPS["max_subscriptions_per_user"][0]
    max_buffer_per_user: int = CAPS["max_buffer_per_user"][0]
    federation: FederationConfig = field(default_factory=FederationConfig)
    policy: Policy = field(default_factory=Policy)

    @property
    def broker_address(self) -> Address:
        """The address as the Broker takes it: a socket path or ``(host, port)``."""
        return parse_address(self.address)

    @property
    def gid(self) -> Optional[int]:
        """The group allowed to connect, or None."""
        return grp.getgrnam(self.group).gr_gid if self.group else None

    @property
    def account(self) -> Optional[pwd.struct_passwd]:
        """The user mpubsubd serves as once started, or None to stay as it started.

        ConfigError if there is no such user.
        """
        if not self.user:
            return None
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise ConfigError(
                f"user: no user named {self.user!r} "
                "(make install creates mpubsub; empty: stay root)"
            ) from None


def changed_keys(old: Config, new: Config) -> List[str]:
    """The keys whose values differ, in the file's order; ``[federation]`` for that section."""
    sections = {"federation": f"[{FEDERATION}]", "policy": f"[{ACCESS}]"}
    return [
        sections.get(f.name, f.name)
        for f in fields(Config)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def config_path(instance: str = "") -> str:
    """The file mpubsubd reads without ``-c``: its own, or instance NAME's."""
    return f"/etc/mpubsub/{instance}.conf" if instance else DEFAULT_PATH


def instance_defaults(instance: str) -> Dict[str, Any]:
    """What an instance keeps apart from the host's main broker: its runtime files and log."""
    if not instance:
        return {}
    run = f"/run/mpubsub-{instance}"
    return {
        "address": f"{run}/broker.sock",
        "credentials": f"{run}/broker.pckl",
        "pidfile": f"{run}/mpubsubd.pid",
        "log_file": f"/var/log/mpubsub/{instance}.log",
    }


def check_instance(name: str) -> str:
    """*name* if it can name an instance (a file name, a directory's suffix); ValueError if not."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
        raise ValueError(
            f"instance {name!r}: use letters, digits, '_', '.' and '-' (not first), at most 64"
        )
    if name == "mpubsubd":  # its file would be the main bus's
        raise ValueError("instance 'mpubsubd' is the host's main bus: leave --instance out")
    return name


def load(path: Optional[str] = None, instance: str = "") -> Config:
    """Read *path* (or the default file, which may be missing) and check every value.

    Raises ConfigError naming each problem (file, line and key); files the
    configuration names are checked by ``check_files``.
    """
    config, problems, _ = _read(path, instance)
    if problems:
        raise ConfigError(*problems)
    assert config is not None
    return config


def check(path: Optional[str] = None, instance: str = "") -> Tuple[Optional[Config], List[str]]:
    """Everything ``--check-config`` checks: the file, then the files it names.

    Returns the configuration (None if it cannot be read at all) and one
    line per problem, naming the file, the line and the key.
    """
    config, problems, lines = _read(path, instance)
    if config is not None:
        problems.extend(check_files(config, lines.at if lines is not None else None))
    return config, problems


def _read(
    path: Optional[str], instance: str
) -> Tuple[Optional[Config], List[str], Optional[_Lines]]:
    """The configuration (None if unreadable), its problems, and where its keys are."""
    name = path or config_path(instance)
    parser = configparser.ConfigParser(interpolation=None)
    access = configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),
        default_section="",
        inline_comment_prefixes=("#", ";"),
    )
    access.optionxform = str  # type: ignore[assignment,method-assign]  # user:Alice is not alice
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        ours, theirs = _split_access(text)
        parser.read_string(ours, name)
        access.read_string(theirs, name)
    except FileNotFoundError:
        if path is not None or instance:
            return None, [f"{name}: no such file"], None
        return Config(), [], None
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None) or (
            exc.errors[0][0] if isinstance(exc, configparser.ParsingError) and exc.errors else None
        )
        where = f"{name}:{line}" if line else name
        return None, [f"{where}: {_parser_message(exc)}"], None
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{name}: cannot read: {reason(exc)}"], None
    lines = _Lines(name, text)
    if not parser.has_section(SECTION):
        return None, [f"{name}: no [{SECTION}] section"], lines
    problems = [
        f"{lines.at(section)}: unknown section [{printable(section)}]"
        for section in parser.sections()
        if section not in (SECTION, FEDERATION, ACCESS)
    ]
    values: Dict[str, Any] = {**instance_defaults(instance)}
    values.update(_section(parser, lines, SECTION, Config, problems))
    if parser.has_section(FEDERATION):
        section = _section(parser, lines, FEDERATION, FederationConfig, problems)
        values["federation"] = FederationConfig(**section)
    if access.has_section(ACCESS):
        values["policy"] = _policy(access, name, theirs, problems)
    config = Config(**values)
    for key, least in (
        ("max_buffer", "max_message_size"),
        ("max_input_buffer", "max_message_size"),
        ("max_buffer_per_user", "max_buffer"),
    ):
        if getattr(config, key) < getattr(config, least):
            problems.append(f"{lines.at(SECTION, key)}: {key}: must be at least {least}")
    if config.max_topic_size > config.max_message_size:
        problems.append(
            f"{lines.at(SECTION, 'max_topic_size')}: max_topic_size: "
            "must be at most max_message_size"
        )
    federation = config.federation
    if federation.enabled and not federation.secret_file:
        problems.append(
            f"{lines.at(FEDERATION, 'servers')}: secret_file: "
            f"required in [{FEDERATION}] when servers is set"
        )
    return config, problems, lines


def _split_access(text: str) -> Tuple[str, str]:
    """*text* without the body of its [access] section, and with only that: each with
    every line where it was, for messages that name lines."""
    ours, theirs, inside = [], [], False
    for line in text.splitlines():
        header = re.fullmatch(r"\[(.*)\]", line.strip())
        if header:
            inside = header.group(1) == ACCESS
            ours.append(line)
            theirs.append(line if inside else "")
        elif inside:
            ours.append("")
            theirs.append(line)
        else:
            ours.append(line)
            theirs.append("")
    return "\n".join(ours), "\n".join(theirs)


def _policy(parser: configparser.ConfigParser, name: str, text: str, problems: List[str]) -> Policy:
    """The policy of the [access] section; a line in *problems* for each bad rule."""
    where: Dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if "=" in stripped and stripped[0] not in "#;[" and not line[0].isspace():
            where.setdefault(stripped.split("=", 1)[0].strip(), number)

    def bad(key: str, exc: ValueError) -> None:
        problems.append(f"{name}:{where.get(key, '?')}: {printable(key)}: {exc}")

    lines = []
    for key, value in parser.items(ACCESS):
        if "\n" in value:
            bad(
                key,
                ValueError(
                    "a rule is one line (an indented line continues the one "
                    f"before): {printable(value.replace(chr(10), ' / '))}"
                ),
            )
        else:
            lines.append((key, value))
    return Policy.parse(lines, bad)


def _parser_message(exc: configparser.Error) -> str:
    """configparser's complaint in one line, without the file name it repeats."""
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"{exc.option}: set twice in [{exc.section}]"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"[{exc.section}] appears twice"
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"a key before any section: {printable(exc.line.strip())}"
    if isinstance(exc, configparser.ParsingError):
        line = ast.literal_eval(exc.errors[0][1]) if exc.errors else ""  # it gives a repr
        return f"not KEY = VALUE: {printable(line.strip())}"
    return printable(str(exc).splitlines()[0])


class _Lines:
    """Where each section and key of a configuration file is, for messages."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self._where: Dict[Tuple[str, str], int] = {}
        section = ""
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped[0] in "#;" or line[0].isspace():
                continue  # blank, a comment, or a value continued
            header = re.fullmatch(r"\[(.*)\]", stripped)
            if header:
                section = header.group(1)
                self._where.setdefault((section, ""), number)
            else:
                key = re.split("[=:]", stripped, maxsplit=1)[0].strip().lower()
                self._where[(section, key)] = number

    def at(self, section: str, key: str = "") -> str:
        """``FILE:LINE`` of *key* in *section* (of the section if the key is absent)."""
        line = self._where.get((section, key)) or self._where.get((section, ""))
        return f"{self.name}:{line}" if line else self.name


def check_files(config: Config, where: Optional[Callable[[str, str], str]] = None) -> List[str]:
    """Problems with what *config* names: its user, keys, and what the bridge must read.

    *where(section, key)* says ``FILE:LINE`` of a key, to begin each line with.
    """
    problems: List[str] = []

    def problem(section: str, key: str, text: str) -> None:
        problems.append(f"{where(section, key)}: {text}" if where is not None else text)

    try:
        config.account  # noqa: B018  (it checks the user exists)
    except ConfigError as exc:
        problem(SECTION, "user", str(exc))
    files = ["credentials", "pidfile", "log_file"]
    if isinstance(config.broker_address, str):
        files.insert(0, "address")
    for key in files:
        why = unsafe_directory(os.path.dirname(getattr(config, key)))
        if why:
            problem(SECTION, key, f"{key}: {why}")
    if config.authkey_file:
        try:
            read_authkey(config.authkey_file)
        except ConfigError as exc:
            problem(SECTION, "authkey_file", str(exc))
    federation = config.federation
    if federation.enabled:
        try:
            read_authkey(federation.secret_file, "secret_file")
        except ConfigError as exc:
            problem(FEDERATION, "secret_file", str(exc))
        for key in ("creds_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(federation, key)
            why = path and unreadable(path, config.user)
            if why:
                problem(FEDERATION, key, f"{key}: {why}")
    return problems


def unsafe_directory(directory: str) -> str:
    """Why root should not keep files in *directory*, or ``''``.

    Root creates, changes and removes them by name: a directory on the way
    that another user may change (owned by that user, or writable by others
    without the sticky bit) lets that user put a link in its place, and
    make root work on files elsewhere. Directories not made yet count as safe
    (mpubsubd makes them, root's).
    """
    trusted = {0, os.geteuid()}
    path = os.path.abspath(directory)
    while True:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if info is not None:
            shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if info.st_uid not in trusted or (shared and not info.st_mode & stat.S_ISVTX):
                return (
                    f"{directory} is in {path}, which another user may change "
                    f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): "
                    "keep mpubsubd's files where only root writes"
                )
        if path == "/":
            return ""
        path = os.path.dirname(path)


def unreadable(path: str, user: str) -> str:
    """Why *user* (the bridge's; '' for root) cannot read *path*, or ``''``."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot read {path}: {reason(exc)}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if not user:
        return "" if os.access(path, os.R_OK) else f"cannot read {path}"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return ""  # said once already, as the user's own problem
    groups = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    if info.st_uid == entry.pw_uid:
        readable = info.st_mode & stat.S_IRUSR
    elif info.st_gid in groups:
        readable = info.st_mode & stat.S_IRGRP
    else:
        readable = info.st_mode & stat.S_IROTH
    if readable:
        return ""
    return (
        f"{path} cannot be read by user {user}, who runs the federation bridge "
        f"(owner uid {info.st_uid}, group gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):o})"
    )


def _section(
    parser: configparser.ConfigParser,
    lines: _Lines,
    section: str,
    cls: type,
    problems: List[str],
) -> Dict[str, Any]:
    """The valid values of *section*; a line in *problems* for each invalid one."""
    known = {f.name for f in fields(cls)} - {"federation"}
    values: Dict[str, Any] = {}
    for key, raw in parser.items(section):
        if key not in known:
            problems.append(
                f"{lines.at(section, key)}: unknown key '{printable(key)}' in [{section}]"
            )
            continue
        try:
            values[key] = _CHECKS.get(f"{section}.{key}", _CHECKS.get(key, _text))(raw.strip())
        except ValueError as exc:
            problems.append(f"{lines.at(section, key)}: {key}: {exc}")
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


def _user(value: str) -> str:
    # Whether the user exists is checked at start and by --check-config: the
    # shipped file names mpubsub, which make install creates.
    if value and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", value):
        raise ValueError(f"{value!r} is not a user name")
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


# KEY, or SECTION.KEY where sections share a key's name ([federation]'s user is NATS's).
_CHECKS: Dict[str, Callable[[str], Any]] = {
    f"{SECTION}.user": _user,
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
        raise ConfigError(f"{key}: cannot read {path}: {reason(exc)}") from None
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
