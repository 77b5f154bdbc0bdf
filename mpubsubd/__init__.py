"""mpubsubd: the system daemon that runs an mpubsub Broker for a host.

``_config.py`` reads ``/etc/mpubsub/mpubsubd.conf``; ``_daemon.py`` runs the
broker in the foreground (for systemd) or as a classic Unix daemon, and
writes the credentials file clients read; ``_main.py`` is the command.
With ``[federation]``, ``_supervisor.py`` keeps a bridge process
(``_bridge.py``) joining the broker to other hosts' through NATS, with the
subjects and signed envelopes of ``_federation.py``.
"""

from ._main import main

__all__ = ["main"]
