"""Who may publish, subscribe and administer which topics: rules, and each client's share.

A policy is a list of rules ``SUBJECT RIGHT = TOPIC, !TOPIC, ...`` and a
default (allow or deny), as mpubsubd.conf's ``[access]`` section writes it.
For a client, a right and a topic, among the rules whose subject is the
client, the one with the longest topic prefix of that topic decides; at
equal length a deny beats an allow; if none matches, the default decides
publish and subscribe, and admin is refused (only its rules give it: the
list of clients says who runs what), unless the policy has no rule at all.
uid 0 may do everything (but for what the federation bridge relays, which
is the ``federation`` subject's). The broker compiles each client's
``Access`` once, when it connects (and again when the policy changes), so
that a check costs a walk over one topic's prefixes, and nothing at all
for a right that no rule restricts for that client.
"""

from __future__ import annotations

import dataclasses
import grp
import pwd
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ._identity import Identity
from ._protocol import encode_topic, prefix_ends
from ._topics import parse_topic

__all__ = ["RIGHTS", "Access", "Policy", "Rule"]

RIGHTS = ("publish", "subscribe", "admin")
_SUBJECT_KINDS = ("user", "group", "uid")
_PLAIN_SUBJECTS = ("*", "tcp", "federation")
# What one client's answers for one right may hold: topics' bytes and entries, roughly.
_CACHE_BYTES = 64 * 1024
_ENTRY = 100


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line: whose it is, which right, and the topics it allows (True) or denies."""

    subject: str  # "*", "tcp", "federation", "user:NAME", "group:NAME" or "uid:N"
    right: str
    topics: Tuple[Tuple[bytes, bool], ...]  # encoded topic, allowed
    uid: Optional[int] = None  # for user: and uid: subjects
    gid: Optional[int] = None  # for group: subjects

    def applies_to(self, who: Identity) -> bool:
        if self.subject == "*":
            return True
        if self.subject == "federation":
            return who.kind == "federation"
        if who.kind == "federation":
            return False  # what other hosts' users did is not this host's users' doing
        if self.subject == "tcp":
            return who.kind == "tcp"
        if self.gid is not None:
            return self.gid in who.groups
        return who.uid is not None and who.uid == self.uid


def parse_rule(key: str, value: str) -> Rule:
    """The rule of one ``SUBJECT RIGHT = TOPICS`` line; ValueError saying what is wrong."""
    words = key.split()
    if len(words) != 2:
        raise ValueError(
            f"{key.strip()!r} is not 'SUBJECT RIGHT' (for example 'group:sensors publish')"
        )
    subject, right = words
    if right not in RIGHTS:
        raise ValueError(f"unknown right {right!r}: publish, subscribe or admin")
    uid = gid = None
    if subject not in _PLAIN_SUBJECTS:
        kind, _, name = subject.partition(":")
        if kind not in _SUBJECT_KINDS or not name:
            raise ValueError(
                f"unknown subject {subject!r}: user:NAME, group:NAME, uid:N, tcp, federation or *"
            )
        if kind == "uid":
            if not name.isdigit():
                raise ValueError(f"{subject!r}: a uid is a number")
            uid = int(name)
        elif kind == "user":
            try:
                uid = pwd.getpwnam(name).pw_uid
            except KeyError:
                raise ValueError(f"{subject!r}: no such user") from None
        else:
            try:
                gid = grp.getgrnam(name).gr_gid
            except KeyError:
                raise ValueError(f"{subject!r}: no such group") from None
    return Rule(subject, right, _topics(value), uid, gid)


def _topics(value: str) -> Tuple[Tuple[bytes, bool], ...]:
    topics = []
    for written in value.split(","):
        item = written.strip()
        allowed = not item.startswith("!")
        text = item[1:].strip() if not allowed else item
        if not text:
            raise ValueError("an empty topic: write / for every topic")
        topics.append((encode_topic(parse_topic(text)), allowed))
    return tuple(topics)


class Policy:
    """The rules and the default; ``access(identity)`` compiles one client's share."""

    def __init__(self, rules: Iterable[Rule] = (), default: bool = True) -> None:
        self.rules = tuple(rules)
        self.default = default
        self.lines: List[Tuple[str, str]] = []  # what parse() read, if it made this one

    @classmethod
    def parse(
        cls,
        lines: Iterable[Tuple[str, str]],
        bad: Optional[Callable[[str, ValueError], object]] = None,
    ) -> Policy:
        """A policy from ``(key, value)`` lines, as an ``[access]`` section has them:
        ``("default", "deny")``, ``("group:sensors publish", "sensor, !sensor/secret")``.

        ValueError naming what is wrong with the first bad line (an unknown
        subject or right, a user or group this host does not have); with
        *bad*, each bad line is told to ``bad(key, error)`` and left out instead.
        """
        rules, default, read = [], True, []
        for key, value in lines:
            try:
                if key.strip() == "default":
                    if value.strip() not in ("allow", "deny"):
                        raise ValueError(f"default must be allow or deny, not {value.strip()!r}")
                    default = value.strip() == "allow"
                else:
                    rules.append(parse_rule(key, value))
            except ValueError as exc:
                if bad is None:
                    raise
                bad(key, exc)
                continue
            read.append((key, value))
        policy = cls(rules, default)
        policy.lines = read
        return policy

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Policy)
            and self.rules == other.rules
            and self.default == other.default
        )

    def __hash__(self) -> int:
        return hash((self.rules, self.default))

    def describe(self) -> str:
        """One line: how many rules, and the default."""
        return f"{len(self.rules)} rules, default {'allow' if self.default else 'deny'}"

    def access(self, who: Identity) -> Access:
        """What *who* may do."""
        if who.uid == 0 and who.kind != "federation":
            return Access.everything()
        tables: Dict[str, Dict[bytes, bool]] = {right: {} for right in RIGHTS}
        for rule in self.rules:
            if rule.applies_to(who):
                table = tables[rule.right]
                for topic, allowed in rule.topics:
                    table[topic] = table.get(topic, True) and allowed  # a deny wins
        # Without rules, as before policies, everyone may do everything, list clients too.
        admin = self.default and not self.rules
        return Access(tables, {**dict.fromkeys(RIGHTS, self.default), "admin": admin})


class Access:
    """What one client may do: ``may(right, topic)``, and for each right that some
    topic restricts, a cache of answers (``checks``), None where nothing does."""

    def __init__(self, tables: Dict[str, Dict[bytes, bool]], defaults: Dict[str, bool]) -> None:
        self._tables = tables
        self._defaults = defaults  # by right: what no rule decides
        self.checks: Dict[str, Optional[Checks]] = {
            right: None if self._unrestricted(right) else Checks(self, right) for right in RIGHTS
        }

    @classmethod
    def everything(cls) -> Access:
        return cls({right: {} for right in RIGHTS}, dict.fromkeys(RIGHTS, True))

    def _unrestricted(self, right: str) -> bool:
        table = self._tables[right]
        return all(table.values()) and (self._defaults[right] or table.get(b"", False))

    def may(self, right: str, topic: bytes) -> bool:
        """True if the client may *right* on the encoded *topic*.

        A broadcast (publish on ``b''``) reaches the subscribers of every topic:
        it needs publish on / and no topic denied to the client.
        """
        table = self._tables[right]
        if not table:
            return self._defaults[right]
        if not topic and right == "publish" and not all(table.values()):
            return False
        ends: List[int] = list(prefix_ends(topic))
        for end in reversed(ends):
            allowed = table.get(topic[:end])
            if allowed is not None:
                return allowed
        return table.get(b"", self._defaults[right])


class Checks(Dict[bytes, bool]):
    """Encoded topic -> whether one client may use one right on it, computed when asked;
    what it keeps is bounded in bytes (it starts afresh past _CACHE_BYTES)."""

    def __init__(self, access: Access, right: str) -> None:
        super().__init__()
        self._access = access
        self._right = right
        self._size = 0

    def __missing__(self, topic: bytes) -> bool:
        self._size += len(topic) + _ENTRY
        if self._size > _CACHE_BYTES:
            self.clear()
            self._size = len(topic) + _ENTRY
        allowed = self[topic] = self._access.may(self._right, topic)
        return allowed
