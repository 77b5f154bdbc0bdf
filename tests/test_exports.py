"""The public surface of mpubsub, and the seam between the library and mpubsubd, pinned.

A name added to or taken from a public module, or a private module of the
library imported by mpubsubd, fails here: on purpose, so that it is a
decision (trio's test_exports does the same).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

import mpubsub
import mpubsub.aio
import mpubsub.broker
import mpubsub.net

ROOT = Path(__file__).resolve().parent.parent

# Each module's names, sorted, as words: a change here is a decision about the surface.
PUBLIC: Dict[str, str] = {
    "mpubsub": "AuthenticationError Broker CredentialsError ErrorHandler MPubSubError "
    "NetPubSub ProtocolError PubSub Sender __version__ current_sender",
    "mpubsub.net": "DEFAULT_MAX_QUEUED LOCAL_SUFFIX NetPubSub PubSub",
    "mpubsub.aio": "DEFAULT_MAX_BYTES DEFAULT_MAX_MESSAGES DEFAULT_MAX_QUEUED LOCAL_SUFFIX "
    "Messages NetPubSub",
    "mpubsub.broker": "Broker DEFAULT_MAX_BUFFER DEFAULT_MAX_MESSAGE Policy main",
    "mpubsub.errors": "AuthenticationError CredentialsError MPubSubError ProtocolError",
    "mpubsub.typing": "Message Subscriber Topic",
    # What mpubsubd may use beyond the public names: this module, and only it.
    "mpubsub._for_mpubsubd": "Address CAPS DEFAULT_HANDSHAKE_TIMEOUT LIVE_SETTINGS Memo "
    "format_topic open_stream parse_address parse_topic printable protocol read_credentials reason "
    "sender_of write_credentials",
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_each_public_module_exports_exactly_its_names(module: str) -> None:
    """__all__ is the pinned list, and every name in it exists."""
    imported = importlib.import_module(module)
    assert " ".join(sorted(imported.__all__)) == PUBLIC[module]
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.{name}"


def test_the_names_of_0_0_1_are_still_there() -> None:
    """mpubsub 0.0.1's PubSub, net.PubSub and broker.Broker, with its arguments."""
    assert mpubsub.net.PubSub is mpubsub.NetPubSub
    assert mpubsub.broker.Broker is mpubsub.Broker
    parameters = list(inspect.signature(mpubsub.Broker).parameters)
    assert parameters[:4] == ["address", "authkey", "backlog", "timeout"]
    assert list(inspect.signature(mpubsub.NetPubSub).parameters)[:2] == ["address", "authkey"]
    for method in ("publish", "add_subscriber", "remove_subscriber", "clear_subscribers"):
        assert callable(getattr(mpubsub.PubSub, method))
    for method in ("connect", "disconnect", "poll", "wait_forever", "set_broker"):
        assert callable(getattr(mpubsub.NetPubSub, method))


def imports(package: str) -> Iterator[Tuple[str, int, str, List[str]]]:
    """(file, line, module, names) of each import in *package*'s files."""
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path.name, node.lineno, alias.name, []
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path.name, node.lineno, node.module, [a.name for a in node.names]


def test_mpubsubd_uses_only_public_names_and_the_seam() -> None:
    """mpubsubd imports of mpubsub only the public modules' public names, and the seam's."""
    allowed = {module: set(names.split()) for module, names in PUBLIC.items()}
    wrong = []
    for file, line, module, names in imports("mpubsubd"):
        if module.split(".")[0] != "mpubsub":
            continue
        if module not in allowed or not set(names) <= allowed[module]:
            wrong.append(f"{file}:{line}: {module} {names}")
    assert wrong == []


def test_the_library_imports_the_standard_library_only() -> None:
    """mpubsub stays standard-library only, and knows nothing of mpubsubd."""
    wrong = [
        f"{file}:{line}: {module}"
        for file, line, module, _ in imports("mpubsub")
        if module.split(".")[0] not in sys.stdlib_module_names
    ]
    assert wrong == []


def test_no_module_inside_the_package_imports_the_public_typing_module() -> None:
    """mpubsub.typing is for applications; inside, the aliases come from _types."""
    inside = [
        path.name
        for path in (ROOT / "mpubsub").glob("*.py")
        if path.name != "typing.py" and "from .typing import" in path.read_text()
    ]
    assert inside == []
    public = importlib.import_module("mpubsub.typing")
    assert public.Topic is importlib.import_module("mpubsub._types").Topic
