"""What mpubsubd may use of the library beyond its public names: this module, and only it.

mpubsubd ships with the library and moves with it: these names may change
between versions of mpubsub as mpubsubd does. Applications use the public
names (``mpubsub``, ``mpubsub.net``, ``mpubsub.broker``, ``mpubsub.errors``,
``mpubsub.typing``). tests/test_exports.py pins both lists, and that
mpubsubd imports nothing else of mpubsub.
"""

from . import _protocol as protocol
from ._broker import CAPS, LIVE_SETTINGS
from ._connect import open_stream
from ._credentials import Address, parse_address, read_credentials, write_credentials
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT
from ._identity import sender_of
from ._memo import Memo
from ._text import printable, reason
from ._topics import format_topic, parse_topic

__all__ = [
    "CAPS",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "LIVE_SETTINGS",
    "Address",
    "Memo",
    "format_topic",
    "open_stream",
    "parse_address",
    "parse_topic",
    "printable",
    "protocol",
    "read_credentials",
    "reason",
    "sender_of",
    "write_credentials",
]
