"""The examples run and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_delivers_everything_in_order() -> None:
    """demo.py: every subscriber process gets every publisher's messages once, in order."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--messages", "500"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("1500 of 1500 messages, in order: ok") == 3
    assert "all delivered" in result.stdout
