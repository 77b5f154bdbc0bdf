"""The ``mpubsub`` command: publish, subscribe and inspect a broker from a shell."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import pickle
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._inbox import REFUSALS_LOGGER
from ._netpubsub import NetPubSub
from ._text import printable, reason
from ._topics import format_topic, parse_topic
from .errors import AuthenticationError, MPubSubError, ProtocolError

DEFAULT_CREDENTIALS = "/run/mpubsub/broker.pckl"


class CliError(Exception):
    """A mistake or a failure, told to the user in one line."""


def parse_message(pairs: List[str], whole: Optional[str]) -> Dict[str, Any]:
    """KEY=VALUE pairs, each VALUE JSON if it parses as JSON, else a string."""
    message: Dict[str, Any] = {}
    if whole is not None:
        try:
            message = json.loads(whole)
        except ValueError as exc:
            raise CliError(f"--json: not valid JSON: {exc}") from None
        if not isinstance(message, dict):
            raise CliError("--json: expected a JSON object, such as '{\"n\": 1}'")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"bad argument {pair!r}: expected KEY=VALUE")
        try:
            message[key] = json.loads(value)
        except ValueError:
            message[key] = value
    return message


def connect(path: str) -> NetPubSub:
    """A pub-sub connected to the broker of the credentials file at *path*."""
    try:
        pubsub = NetPubSub.from_file(path)
    except MPubSubError as exc:
        raise CliError(str(exc)) from None
    address = pubsub.address
    try:
        pubsub.connect()
    except AuthenticationError:
        raise CliError(
            f"the broker at {address} refused the key in {path} (a stale credentials file?)"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(
            f"cannot reach the broker at {address}: {exc.strerror} (is it running?)"
        ) from None
    except (OSError, ProtocolError) as exc:
        raise CliError(f"cannot reach the broker at {address}: {reason(exc)}") from None
    return pubsub


def cmd_pub(args: argparse.Namespace) -> None:
    message = parse_message(args.pairs, args.json)
    topic = parse_topic(args.topic)
    with connect(args.credentials) as pubsub:
        pubsub._link.publish_timeout = pubsub._link.timeout  # not forever: a broker may not read
        try:
            pubsub.publish(topic, **message)
        except (ValueError, TypeError) as exc:
            raise CliError(str(exc)) from None
        except TimeoutError as exc:
            # This line says it all: not also the WARNING of the message dropped.
            logging.getLogger("mpubsub.net").setLevel(logging.ERROR)
            raise CliError(str(exc)) from None
        if not pubsub.flush():
            raise CliError("the broker went away before the message left")


# The only global a pickle of plain data needs (protocol 5: the other types
# have opcodes of their own). Not bytearray, say: bytearray(10**10) is 10 GB.
_HARMLESS_GLOBALS = {("builtins", "complex"): complex}


class _GlobalRefused(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, sets, str, bytes, numbers and None; no global but complex."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _HARMLESS_GLOBALS[module, name]
        except KeyError:
            raise _GlobalRefused(f"global {module}.{name} is not allowed") from None


@dataclasses.dataclass(frozen=True)
class NotShown:
    """Stands, as the only value of a message, for a payload ``mpubsub sub`` did not load."""

    reason: str


_NOT_SHOWN = "not_shown"


def load_message(payload: bytes, unsafe: bool = False) -> Dict[str, Any]:
    """The message pickled in *payload*: only plain data, unless *unsafe*.

    Never raises, and never runs code unless *unsafe*: a payload that needs
    any other global, is not a pickle, or is not a dict with str keys comes
    back as ``{'not_shown': NotShown(reason)}``.
    """
    try:
        message = (
            pickle.loads(payload) if unsafe else _PlainDataUnpickler(io.BytesIO(payload)).load()
        )
    except _GlobalRefused as exc:
        return {_NOT_SHOWN: NotShown(f"{exc}; --unsafe-pickle loads it")}
    except Exception as exc:  # whatever it is, it is this message's, shown in its place
        return {_NOT_SHOWN: NotShown(f"cannot unpickle: {exc}")}
    if isinstance(message, dict) and all(isinstance(key, str) for key in message):
        return message
    return {_NOT_SHOWN: NotShown("not a message (a dict with str keys)")}


def _not_shown(message: Dict[str, Any]) -> Optional[str]:
    """Why *message* stands for a payload that was not loaded; None if it is a message."""
    value = message.get(_NOT_SHOWN)
    return value.reason if isinstance(value, NotShown) and len(message) == 1 else None


# What one line shows of a message at most: a publisher cannot make sub print
# (or build) gigabytes from a few hundred bytes that reuse one list.
_MAX_ITEMS = 10_000  # values, over all the message's containers
_MAX_TEXT = 10_000  # characters (or bytes) of one string


class _Elided:
    """Stands for what a line leaves out."""

    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()


def _bounded(value: Any, budget: List[int]) -> Any:
    """A copy of plain data *value* with at most ``budget[0]`` values, strings cut short."""
    budget[0] -= 1
    if budget[0] < 0:
        return _ELIDED
    if isinstance(value, str):
        return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
    if isinstance(value, bytes):
        return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + b"..."
    if type(value) is dict:
        return {_bounded(k, budget): _bounded(v, budget) for k, v in value.items()}
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_bounded(item, budget) for item in value)
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, escaped by ``printable`` unless already printable; or why it cannot be."""
    try:
        text = repr(value)
    except RecursionError:
        return "<not shown: nested too deeply>"
    except ValueError as exc:  # an int too long to convert, say
        return f"<not shown: {printable(str(exc))}>"
    return text if text.isprintable() else printable(text)


def _jsonable(value: Any) -> Any:
    """*value* if JSON can show it, else what ``_shown`` says of it."""
    try:
        json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        return _shown(value)
    return value


def format_line(topic: Tuple[str, ...], message: Dict[str, Any], as_json: bool) -> str:
    """One line for *message*: no control character, whoever published it.

    Text is ``topic key=repr(value) ...``, topic and keys escaped by
    ``printable``; JSON is ``{"topic": [...], "message": {...}}`` with repr()
    for what JSON cannot hold. A payload that was not loaded is a notice.
    At most 10,000 values and 10,000 characters per string are shown
    (``...`` marks what is left out).
    """
    reason = _not_shown(message)
    budget, bounded = [_MAX_ITEMS], {}
    for key, value in message.items():
        try:
            bounded[key] = _bounded(value, budget)
        except RecursionError:  # left whole: _shown and _jsonable say it is too deep
            bounded[key] = value
    message = bounded
    if as_json:
        if reason is not None:
            return json.dumps({"topic": list(topic), _NOT_SHOWN: reason})
        try:
            return json.dumps({"topic": list(topic), "message": message}, default=repr)
        except (TypeError, ValueError, RecursionError):  # say which values, show the others
            shown = {key: _jsonable(value) for key, value in message.items()}
            return json.dumps({"topic": list(topic), "message": shown}, default=repr)
    head = printable(format_topic(topic))
    if reason is not None:
        return f"{head} <not shown: {printable(reason)}>"
    fields = " ".join(f"{printable(key)}={_shown(value)}" for key, value in message.items())
    return f"{head} {fields}" if fields else head


def cmd_sub(args: argparse.Namespace) -> None:
    topics = sorted({parse_topic(t) for t in args.topics} or {()}, key=len)
    # 'a' already covers 'a/b': subscribing to both would print such messages twice.
    topics = [t for i, t in enumerate(topics) if not any(t[: len(p)] == p for p in topics[:i])]
    received = [0]

    def show(topic: Tuple[str, ...], **message: Any) -> None:
        print(format_line(topic, message, args.json), flush=True)
        received[0] += 1
        if received[0] == args.count:
            raise _Enough  # the rest of what this poll() delivers is not printed

    def show_but_broadcasts(topic: Tuple[str, ...], **message: Any) -> None:
        if topic:  # a broadcast reaches every subscription: the first one shows it
            show(topic, **message)

    with connect(args.credentials) as pubsub:
        pubsub._loads = functools.partial(load_message, unsafe=args.unsafe_pickle)
        pubsub.on_error = _reraise  # a closed stdout must end the command, not be logged
        for n, topic in enumerate(topics):
            try:
                pubsub.add_subscriber(topic, show if n == 0 else show_but_broadcasts)
            except ValueError as exc:  # over the broker's limits
                raise CliError(f"cannot subscribe to {format_topic(topic)!r}: {exc}") from None
        pubsub.flush()
        with contextlib.suppress(_Enough):
            while args.count is None or received[0] < args.count:
                pubsub.poll(1.0)


class _Enough(Exception):
    """sub --count N has printed N messages."""


def _reraise(topic: Tuple[str, ...], subscriber: Any, exc: Exception) -> None:
    raise exc


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return " ".join(f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m")) if n) + (
        f" {secs}s" if days or hours or minutes else f"{secs}s"
    )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


_FIGURES: List[Tuple[str, str, Callable[[Any], str]]] = [
    ("uptime", "uptime", _duration),
    ("clients", "clients", str),
    ("subscriptions", "subscriptions", str),
    ("messages in", "messages_in", str),
    ("bytes in", "bytes_in", _size),
    ("messages out", "messages_out", str),
    ("bytes out", "bytes_out", _size),
    ("messages/s", "messages_per_second", lambda v: f"{v:.1f}"),
    ("slow consumers cut", "slow_consumers", str),
    ("connections refused", "refused", str),
    ("publishes and subscriptions refused", "denied", str),
    ("largest client buffer", "largest_buffer", _size),
]

# mpubsubd's federation bridge, when there is one (see mpubsubd._bridge).
_FEDERATION: List[Tuple[str, str, Callable[[Any], str]]] = [
    ("federation", "state", str),
    ("this host", "name", str),
    ("NATS server", "server", lambda v: v or "-"),
    ("NATS subscriptions", "nats_subscriptions", str),
    ("forwarded to other hosts", "forwarded_out", str),
    ("forwarded from other hosts", "forwarded_in", str),
    ("not forwarded (NATS down, slow)", "dropped_out", str),
    ("not forwarded (bridge behind)", "dropped_behind", str),
    ("dropped, unverified", "dropped_unverified", str),
    ("dropped, duplicates", "duplicates", str),
    ("too long for NATS", "too_long", str),
    ("reconnects to NATS", "reconnects", str),
]


def format_stats(stats: Dict[str, Any]) -> str:
    """The figures of a STATS_REPLY as aligned lines, federation included."""
    rows = [(label, _figure(show, stats.get(key, "?"))) for label, key, show in _FIGURES]
    federation = stats.get("federation")
    if isinstance(federation, dict):
        rows += [
            (label, _figure(show, federation.get(key, "?"))) for label, key, show in _FEDERATION
        ]
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {value}\n" for label, value in rows)


def _figure(show: Callable[[Any], str], value: Any) -> str:
    """One figure as the broker sent it, shown escaped (whatever the broker sent)."""
    try:
        return printable(show(value))
    except (TypeError, ValueError):
        return printable(repr(value))


def cmd_stats(args: argparse.Namespace) -> None:
    with connect(args.credentials) as pubsub:
        while True:
            stats = pubsub.broker_statistics()
            if stats is None:
                raise CliError("the broker went away")
            if args.json:
                print(json.dumps(stats), flush=True)
            else:
                print(format_stats(stats), flush=True)
            if args.watch is None:
                return
            time.sleep(args.watch)


def _since(when: float) -> str:
    """How long ago *when* (unix time) was, as stats shows the uptime."""
    return _duration(max(0.0, time.time() - when))


# The columns of ``mpubsub clients``: header, key of Exchange.describe(), how shown.
_CLIENT_COLUMNS: List[Tuple[str, str, Callable[[Any], str]]] = [
    ("ID", "id", str),
    ("USER", "user", str),
    ("UID", "uid", str),
    ("PID", "pid", str),
    ("COMMAND", "command", str),
    ("ADDRESS", "address", str),  # TCP only: a Unix socket's peer is its uid and pid
    ("CONNECTED", "since", _since),
    ("SUBS", "subscriptions", str),
    ("MSGS IN", "messages_in", str),
    ("BYTES IN", "bytes_in", _size),
    ("MSGS OUT", "messages_out", str),
    ("BYTES OUT", "bytes_out", _size),
    ("WAITING", "waiting", _size),
    ("DENIED", "denied", str),
    ("DROPPED", "dropped", str),
    ("ROLE", "bridge", lambda bridge: "bridge" if bridge else "client"),
]


def format_clients(clients: List[Dict[str, Any]], topics: bool = False) -> str:
    """The connections of a CLIENTS_REPLY as an aligned table, a row each, "-" where
    the broker does not know; with *topics*, each one's topics indented below its row."""
    rows = [[header for header, _, _ in _CLIENT_COLUMNS]]
    rows += [
        [_cell(show, client.get(key, "?")) for _, key, show in _CLIENT_COLUMNS]
        for client in clients
    ]
    widths = [max(len(row[n]) for row in rows) for n in range(len(_CLIENT_COLUMNS))]

    def aligned(row: List[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    lines = [aligned(rows[0])]
    for client, row in zip(clients, rows[1:]):
        lines.append(aligned(row))
        subscribed = client.get("topics")
        if topics and isinstance(subscribed, list):
            lines += [f"    {printable(str(topic))}" for topic in subscribed]
    return "".join(f"{line}\n" for line in lines)


def _cell(show: Callable[[Any], str], value: Any) -> str:
    return "-" if value is None or value == "" else _figure(show, value)


def cmd_clients(args: argparse.Namespace) -> None:
    with connect(args.credentials) as pubsub:
        try:
            clients = pubsub.broker_clients()
        except PermissionError as exc:
            raise CliError(f"the broker refused: {exc}") from None
    if clients is None:
        raise CliError("the broker went away")
    if args.json:
        print(json.dumps(clients), flush=True)
    else:
        print(format_clients(clients, args.verbose), end="", flush=True)


def cmd_ping(args: argparse.Namespace) -> None:
    with connect(args.credentials) as pubsub:
        for i in range(args.count):
            started = time.perf_counter()
            if not pubsub.flush():
                raise CliError("the broker went away")
            elapsed = (time.perf_counter() - started) * 1000
            print(f"broker at {pubsub.address}: round trip {elapsed:.3f} ms", flush=True)
            if i + 1 < args.count:
                time.sleep(args.interval)


def _count(text: str) -> int:
    """A count for --count: a whole number above 0."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"not a whole number above 0: {text!r}")
    return count


def _seconds(text: str, above_zero: bool = False) -> float:
    """Seconds to wait: finite, not negative (above 0, if asked)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 if above_zero else seconds >= 0) or math.isinf(seconds):
        above = " above 0" if above_zero else ""
        raise argparse.ArgumentTypeError(f"not a number of seconds{above}: {text!r}")
    return seconds


def _parser() -> argparse.ArgumentParser:
    default = os.environ.get("MPUBSUB_CREDENTIALS", DEFAULT_CREDENTIALS)
    what = "the broker's credentials file (default: $MPUBSUB_CREDENTIALS or {})"
    parser = argparse.ArgumentParser(
        prog="mpubsub", description="Publish, subscribe and inspect an mpubsub broker."
    )
    parser.add_argument(
        "-c",
        "--credentials",
        metavar="PATH",
        default=default,
        help=what.format("%(default)s") + "; here or after COMMAND",
    )
    # The same option after COMMAND wins. Without a default of its own: the
    # subcommand's namespace overwrites the command's, a default too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--credentials",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=what.format(default.replace("%", "%%")),  # as %(default)s would be
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pub = commands.add_parser("pub", parents=[common], help="publish one message")
    pub.add_argument("topic", metavar="TOPIC", help="elements separated by '/'; '/' broadcasts")
    pub.add_argument("pairs", metavar="KEY=VALUE", nargs="*", help="VALUE is JSON, or a string")
    pub.add_argument("--json", metavar="OBJECT", help="the whole message as a JSON object")
    pub.set_defaults(func=cmd_pub)

    sub = commands.add_parser("sub", parents=[common], help="print messages as they arrive")
    sub.add_argument("topics", metavar="TOPIC", nargs="*", help="default: every topic")
    sub.add_argument("--count", type=_count, metavar="N", help="exit after N messages")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="unpickle any message, not only plain data: whoever can publish can run code "
        "as you (default: other messages are shown as a notice)",
    )
    sub.set_defaults(func=cmd_sub)

    stats = commands.add_parser("stats", parents=[common], help="the broker's figures")
    stats.add_argument("--json", action="store_true", help="as one JSON object")
    stats.add_argument(
        "--watch",
        type=functools.partial(_seconds, above_zero=True),
        metavar="SECONDS",
        help="repeat every SECONDS",
    )
    stats.set_defaults(func=cmd_stats)

    clients = commands.add_parser(
        "clients",
        parents=[common],
        help="the broker's connections: who, since when, traffic (needs the admin right)",
    )
    clients.add_argument("--json", action="store_true", help="as one JSON array")
    clients.add_argument(
        "-v", "--verbose", action="store_true", help="and the topics each one subscribes to"
    )
    clients.set_defaults(func=cmd_clients)

    ping = commands.add_parser("ping", parents=[common], help="round-trip time to the broker")
    ping.add_argument("--count", type=_count, default=1, metavar="N", help="pings (default: 1)")
    ping.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS")
    ping.set_defaults(func=cmd_ping)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run one subcommand; errors are one line on stderr and exit status 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mpubsub: %(message)s")
    # A refusal is said in one line, the error's: not also the WARNING of the broker's DENIED.
    logging.getLogger(REFUSALS_LOGGER).setLevel(logging.ERROR)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except CliError as exc:
        sys.exit(f"mpubsub: {exc}")
    except PermissionError as exc:  # the broker's policy: flush() says what it refused
        sys.exit(f"mpubsub: {printable(str(exc))}")
    except (TimeoutError, MPubSubError) as exc:  # the broker's doing, not a bug of ours
        sys.exit(f"mpubsub: {printable(str(exc) or type(exc).__name__)}")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
