"""``python -m mpubsubd``."""

from ._main import main

main()
