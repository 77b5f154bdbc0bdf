"""The networked pub-sub (``mpubsub.net.PubSub`` is its name in mpubsub 0.0.1)."""

from ._netpubsub import DEFAULT_MAX_QUEUED, LOCAL_SUFFIX, NetPubSub

PubSub = NetPubSub

__all__ = ["DEFAULT_MAX_QUEUED", "LOCAL_SUFFIX", "NetPubSub", "PubSub"]
