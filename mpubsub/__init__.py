"""A publish-subscribe system for Python, in one process or across many.

How the pieces build on each other: ``PubSub`` (``_pubsub.py``) delivers
messages inside one process. ``NetPubSub`` (``_netpubsub.py``) is a PubSub
that also sends what it publishes to a ``Broker`` (``_broker.py``) and
delivers what the broker sends it. Between them runs the wire protocol of
``_protocol.py``: multiprocessing's authentication, then frames whose topic
the broker reads and whose pickled message only pub-subs unpickle.
mpubsubd (the ``mpubsubd`` package) runs a Broker for a host and, through
its federation bridge, joins it to other hosts' brokers over NATS.
"""

from ._broker import Broker
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
    "__version__",
]

__version__ = "0.1.0"
