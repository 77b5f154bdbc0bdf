"""The exceptions mpubsub raises (argument mistakes are plain TypeError/ValueError)."""

from multiprocessing import AuthenticationError

__all__ = ["AuthenticationError", "CredentialsError", "MPubSubError", "ProtocolError"]


class MPubSubError(Exception):
    """Base class of mpubsub's own errors."""


class ProtocolError(MPubSubError):
    """The peer sent something the wire protocol does not allow.

    Raised by the frame decoder on garbage, truncated or oversized frames, and
    by ``NetPubSub.connect`` when the broker speaks another protocol version
    or refuses the client. The connection concerned is closed.
    """


class CredentialsError(MPubSubError):
    """A credentials file is missing, unreadable, malformed or unsafe."""


# Wrong keys raise multiprocessing's own AuthenticationError, re-exported here,
# so code written for mpubsub 0.0.1 (or for multiprocessing) keeps catching it.
