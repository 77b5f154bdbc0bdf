"""Type aliases shared by the public API (the same names as mpubsub 0.0.1).

Published as ``mpubsub.typing``; inside the package they come from here,
so that no module has to think about a module named like the standard one.
"""

from typing import Any, Callable, Dict, Tuple, Union

__all__ = ["Message", "Subscriber", "Topic"]

#: A topic: a tuple of strings, a string (a one-element tuple) or ``None``
#: (the catch-all when subscribing, the broadcast when publishing).
Topic = Union[Tuple[str, ...], str, None]

#: A subscriber is called as ``subscriber(topic, **message)``; ``topic`` is
#: always the published topic as a tuple.
Subscriber = Callable[..., None]

#: A published message as it travels: its topic and its keyword arguments.
Message = Tuple[Topic, Dict[str, Any]]
