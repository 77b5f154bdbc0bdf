"""A broker with an access policy, for tests: as mpubsubd's [access] section would set it.

    python policy_broker.py CREDENTIALS SOCKET KEY=VALUE...

Listens on the Unix socket SOCKET with the policy of the KEY=VALUE lines
("default=allow", "* admin=!/"), writes CREDENTIALS, prints "ready" and
serves until SIGTERM. Socket and credentials are open to every user
(modes 0666 and 0644): the tests run clients as nobody against it.
"""

from __future__ import annotations

import os
import secrets
import sys

from mpubsub._credentials import write_credentials
from mpubsub.broker import Broker, Policy


def main() -> None:
    credentials, address, *lines = sys.argv[1:]
    policy = Policy.parse((key, value) for key, _, value in (x.partition("=") for x in lines))
    authkey = secrets.token_bytes(32)
    broker = Broker(address, authkey, policy=policy)
    os.chmod(address, 0o666)  # connecting to a Unix socket needs write permission on it
    write_credentials(credentials, broker.address, authkey, overwrite=False)
    os.chmod(credentials, 0o644)
    print("ready", flush=True)
    broker.start(handle_signals=True)


if __name__ == "__main__":
    main()
