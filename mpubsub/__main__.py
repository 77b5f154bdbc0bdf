"""``python -m mpubsub``: the mpubsub command."""

from ._cli import main

main()
