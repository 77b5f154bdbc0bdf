"""Tests for mpubsubd._config: the configuration file and its checks."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Union

import pytest

from mpubsub import _protocol as proto
from mpubsubd._config import Config, ConfigError, FederationConfig, check, load, read_authkey

from . import needs

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mpubsubd.conf"
    path.write_text("[mpubsubd]\n" + body)
    return str(path)


def test_shipped_file_documents_the_defaults() -> None:
    """etc/mpubsubd.conf sets every key, to exactly the built-in defaults (user: mpubsub)."""
    text = (ROOT / "etc" / "mpubsubd.conf").read_text()
    assert load(str(ROOT / "etc" / "mpubsubd.conf")) == dataclasses.replace(
        Config(), user="mpubsub"
    )
    assert "\nuser = mpubsub\n" in text.split("\n[federation]\n")[0]
    keys = [*Config.__dataclass_fields__, *FederationConfig.__dataclass_fields__]
    for key in keys:
        if key not in ("federation", "policy"):
            assert f"\n{key} =" in text, f"{key} is not documented"
    assert "\n[federation]\n" in text


def test_values_are_read(tmp_path: Path) -> None:
    """Keys override the defaults; the address may be TCP."""
    config = load(write(tmp_path, "address = 127.0.0.1:7000\nlog_level = debug\ngroup = users\n"))
    assert config.broker_address == ("127.0.0.1", 7000)
    assert config.log_level == "DEBUG" and config.gid == 100
    assert config.pidfile == Config().pidfile


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "log_level = LOUD",
            r"log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL$",
        ),
        ("max_buffer = lots", r"max_buffer: 'lots' is not a whole number of bytes$"),
        ("max_message_size = 0", r"max_message_size: '0' must be positive$"),
        ("handshake_timeout = -1", r"handshake_timeout: '-1' must be positive$"),
        ("group = no-such-group-here", r"group: no group named 'no-such-group-here'$"),
        ("address = relative.sock", r"address: 'relative.sock' is neither an absolute socket path"),
        ("pidfile = run/x.pid", r"pidfile: 'run/x.pid' is not an absolute path$"),
        ("colour = blue", r"unknown key 'colour' in \[mpubsubd\]$"),
        (
            "max_topic_size = 10\nmax_message_size = 100\nmax_buffer = 10",
            r"max_buffer: must be at least max_message_size$",
        ),
        (
            "max_topic_size = 10\nmax_message_size = 100\nmax_input_buffer = 99",
            r"max_input_buffer: must be at least max_message_size$",
        ),
        (
            "max_message_size = 100\nmax_topic_size = 101",
            r"max_topic_size: must be at most max_message_size$",
        ),
        ("max_handshakes_per_peer = 0", r"max_handshakes_per_peer: '0' must be positive$"),
        ("max_topic_depth = deep", r"max_topic_depth: 'deep' is not a whole number$"),
        (
            "[federation]\nservers = nats://h:4222",
            r"secret_file: required in \[federation\] when servers is set$",
        ),
        (
            "[federation]\nservers = http://h:80",
            r"servers: 'http://h:80' is not a NATS URL like nats://host:4222$",
        ),
        ("[federation]\nsubject_prefix = a..b", r"subject_prefix: 'a..b' is not NATS tokens"),
        ("[federation]\nsubject_prefix = a.*", r"subject_prefix: 'a.\*' is not NATS tokens"),
        ("[federation]\nlocal_only = /", r"local_only: '/' would keep every topic on this host"),
        ("[federation]\nsecret_file = secret", r"secret_file: 'secret' is not an absolute path$"),
        ("[federation]\nmax_control_line = 4k", r"max_control_line: '4k' is not a whole number"),
        ("[federation]\nmax_control_line = 100", r"max_control_line: '100' is under 256 bytes$"),
        ("[federation]\nmax_clock_skew = 0", r"max_clock_skew: '0' must be positive$"),
        ("[federation]\ncolour = blue", r"unknown key 'colour' in \[federation\]$"),
        ("[federaton]\nservers = nats://h:4222", r"unknown section \[federaton\]$"),
        ("[\x1b[31mred]\nx = 1", r"unknown section \[\\x1b\[31mred\]$"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    """Each bad value (or section) is a ConfigError naming the file, the line and the key."""
    path = write(tmp_path, body + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}:[234]: {message}"):
        load(path)


def test_every_problem_is_named_with_its_line(tmp_path: Path) -> None:
    """All problems of a file, each with its line; str() is the first and how many more."""
    path = write(
        tmp_path,
        "# a comment\nmax_bufer = 1\nlog_level = LOUD\n  continued\n"
        "max_message_size = 100\nmax_buffer = 10\n[federation]\nservers = http://h\n[extra]\n",
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [
        f"{path}:10: unknown section [extra]",
        f"{path}:3: unknown key 'max_bufer' in [mpubsubd]",
        f"{path}:4: log_level: 'LOUD\\ncontinued' is not one of DEBUG, INFO, WARNING, ERROR, "
        "CRITICAL",
        f"{path}:9: servers: 'http://h' is not a NATS URL like nats://host:4222",
        f"{path}:7: max_buffer: must be at least max_message_size",
        f"{path}:1: max_topic_size: must be at most max_message_size",  # not set: its section
    ]
    assert str(caught.value) == (
        f"{path}:10: unknown section [extra] (and 5 more: mpubsubd --check-config lists them)"
    )


def test_access_comments_and_continued_lines(tmp_path: Path) -> None:
    """A comment after a rule is not a topic; a rule's value on an indented line after it
    is refused with its line, not merged into the rule before."""
    path = write(
        tmp_path,
        "[access]\n"
        "* subscribe = !secret   # keep secrets out\n"
        "* publish = a ; and b\n"
        "tcp publish = x\n"
        "    tcp subscribe = !y\n",
    )
    config, problems = check(path)
    assert problems == [
        f"{path}:5: tcp publish: a rule is one line (an indented line continues the one "
        "before): x / tcp subscribe = !y"
    ]
    assert config is not None
    assert [rule.topics for rule in config.policy.rules] == [
        ((proto.encode_topic(("secret",)), False),),
        ((proto.encode_topic(("a",)), True),),
    ]


def test_access_section_is_read_with_its_own_delimiter(tmp_path: Path) -> None:
    """[access] keys hold ':' (only '=' separates), keep their case, and each bad rule is
    named with its line; the other sections still take 'key: value'."""
    path = write(
        tmp_path,
        "log_level: DEBUG\n"
        "[access]\n"
        "# SUBJECT RIGHT = TOPICS\n"
        "default = deny\n"
        "group:users publish = sensor, !sensor/secret\n"
        "user:nobody subscribe = /\n"
        "user:Nobody subscribe = x\n"
        "uid:12 read = x\n"
        "*  admin = /\n",
    )
    config, problems = check(path)
    assert problems == [
        f"{path}:8: user:Nobody subscribe: 'user:Nobody': no such user",
        f"{path}:9: uid:12 read: unknown right 'read': publish, subscribe or admin",
    ]
    assert config is not None and config.log_level == "DEBUG"
    policy = config.policy
    assert policy.default is False
    assert [(r.subject, r.right) for r in policy.rules] == [
        ("group:users", "publish"),
        ("user:nobody", "subscribe"),
        ("*", "admin"),
    ]
    twice = write(tmp_path, "[access]\ngroup:users publish = a\ngroup:users publish = b\n")
    with pytest.raises(ConfigError, match=r":4: group:users publish: set twice in \[access\]$"):
        load(twice)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mpubsubd]\nlog_level = INFO\nlog_level = DEBUG\n", ":3: log_level: set twice"),
        ("log_level = INFO\n", ":1: a key before any section: log_level = INFO"),
        ("[mpubsubd]\njust words\n", ":2: not KEY = VALUE: just words"),
        ("[mpubsubd]\n[mpubsubd]\n", ":2: [mpubsubd] appears twice"),
        (b"[mpubsubd]\nname = \xff\n", ": cannot read: "),
    ],
)
def test_unreadable_files_name_the_line(
    tmp_path: Path, text: Union[str, bytes], message: str
) -> None:
    """What configparser cannot read at all is one line, with the line where it could."""
    path = tmp_path / "mpubsubd.conf"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path) + message)}"):
        load(str(path))


def test_missing_files(tmp_path: Path) -> None:
    """A missing explicit file is an error; a file without the section too."""
    with pytest.raises(ConfigError, match=r"no such file$"):
        load(str(tmp_path / "absent.conf"))
    other = tmp_path / "other.conf"
    other.write_text("[other]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"no \[mpubsubd\] section$"):
        load(str(other))


def test_authkey_file(tmp_path: Path) -> None:
    """A stable key is read from a file only its owner can read."""
    key = tmp_path / "authkey"
    key.write_bytes(b"0123456789abcdef")
    key.chmod(0o600)
    assert read_authkey(str(key)) == b"0123456789abcdef"
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"must be readable by its owner only \(mode 640"):
        read_authkey(str(key))
    key.write_bytes(b"\n")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match=r"is empty$"):
        read_authkey(str(key))


def test_federation_section(tmp_path: Path) -> None:
    """[federation] is read with its own checks; servers without a secret is refused."""
    path = write(
        tmp_path,
        "[federation]\nservers = nats://127.0.0.1:4222, tls://[::1]:4223\n"
        "secret_file = /etc/mpubsub/secret\nname = host-a\nlocal_only = metrics/raw, private\n",
    )
    federation = load(path).federation
    assert federation.enabled and federation.host_name == "host-a"
    assert federation.server_urls == ("nats://127.0.0.1:4222", "tls://[::1]:4223")
    assert federation.local_only_topics == (("metrics", "raw"), ("private",))
    assert not FederationConfig().enabled and FederationConfig().host_name


def test_secret_must_be_ours(tmp_path: Path) -> None:
    """A key file another user owns is refused, even at mode 0600: that user could read it."""
    key = tmp_path / "secret"
    key.write_bytes(b"0123456789abcdef")
    key.chmod(0o600)
    needs.OTHER_USERS.check(needs.as_root())
    os.chown(key, 65534, -1)  # nobody
    with pytest.raises(ConfigError, match=r"^secret_file: .* must belong to the user running"):
        read_authkey(str(key), "secret_file")


def test_check_names_files_the_bridge_cannot_read(tmp_path: Path) -> None:
    """The bridge runs as user: a root-only TLS file is a problem, named with its line."""
    needs.OTHER_USERS.check(needs.as_root())
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef")
    secret.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    ca.chmod(0o600)
    path = write(
        tmp_path,
        f"user = nobody\n[federation]\nservers = nats://127.0.0.1:4222\nsecret_file = {secret}\n"
        f"tls_ca_file = {ca}\n",
    )
    config, problems = check(path)
    assert config is not None and len(problems) == 1
    assert problems[0].startswith(f"{path}:6: tls_ca_file: {ca} cannot be read by user nobody")
    os.chown(ca, -1, 65534)
    ca.chmod(0o640)
    assert check(path)[1] == []
