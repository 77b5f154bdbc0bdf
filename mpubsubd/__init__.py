"""mpubsubd: the system daemon that runs an mpubsub Broker for a host.

``_config.py`` reads ``/etc/mpubsub/mpubsubd.conf``; ``_daemon.py`` runs the
broker in the foreground (for systemd) or as a classic Unix daemon, and
writes the credentials file clients read; ``_main.py`` is the command.
"""

from ._main import main

__all__ = ["main"]
