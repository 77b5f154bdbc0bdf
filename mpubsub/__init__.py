"""A publish-subscribe system for Python, in one process or across many.

How the pieces build on each other: ``PubSub`` (``_pubsub.py``) delivers
messages inside one process. ``NetPubSub`` (``_netpubsub.py``) is a PubSub
that also sends what it publishes to a ``Broker`` (``_broker.py``) and
delivers what the broker sends it; its connection, made again whenever it
is lost, is a ``Link`` (``_link.py``). ``mpubsub.aio.NetPubSub``
(``aio.py``) is the same for asyncio programs: what both do with frames is
``_client.py``'s, and its connection an ``AioLink`` (``_aiolink.py``).
Between them runs the wire protocol of ``_protocol.py``, opened by the
handshake of ``_handshake.py`` (both
roles, bytes in and out, no sockets): multiprocessing's authentication,
then frames whose topic the broker reads and whose pickled message only
pub-subs unpickle. The broker's loop hands its connections (``_clients.py``)
what the selector says, and their frames to the ``Exchange``
(``_exchange.py``), which routes them through the ``Router``
(``_routing.py``). Who each connection is comes from the kernel
(``_identity.py``); what it may do from the ``Policy`` (``_policy.py``);
what it may hold from its user's account (``_accounts.py``). mpubsubd
(the ``mpubsubd`` package) runs a Broker for a host and, through its
federation bridge, joins it to other hosts' brokers over NATS; of the
library's insides it uses ``_for_mpubsubd.py`` only.
"""

from ._broker import Broker
from ._identity import Sender, current_sender
from ._netpubsub import NetPubSub
from ._pubsub import ErrorHandler, PubSub
from .errors import AuthenticationError, CredentialsError, MPubSubError, ProtocolError

__all__ = [
    "AuthenticationError",
    "Broker",
    "CredentialsError",
    "ErrorHandler",
    "MPubSubError",
    "NetPubSub",
    "ProtocolError",
    "PubSub",
    "Sender",
    "__version__",
    "current_sender",
]

__version__ = "0.1.0"
