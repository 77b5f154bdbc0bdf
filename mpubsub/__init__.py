"""A publish-subscribe system for Python, in one process or across many.

How the pieces build on each other: ``PubSub`` (``_pubsub.py``) delivers
messages inside one process.
"""

from ._pubsub import ErrorHandler, PubSub

__all__ = ["ErrorHandler", "PubSub", "__version__"]

__version__ = "0.1.0"
