"""Tests for what ``make install`` writes from packaging/ and etc/.

Each install goes under a temporary directory, offline, and never creates a
user (conftest.make_install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from . import needs
from .conftest import make_install


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """``make install`` under a temporary base."""
    needs.DEBIAN_PYTHON.check(os.path.exists("/usr/bin/python3"))
    base = Path(tempfile.mkdtemp(prefix="mpubsub-packaging-"))
    try:
        make_install(base)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_mpubsub_wrapper_imports_nothing_from_cwd(installed: Path, planted: Path) -> None:
    """The installed mpubsub, run by root beside planted modules, imports none of them."""
    command = installed / "prefix" / "bin" / "mpubsub"
    shown = subprocess.run(
        [str(command), "--help"], capture_output=True, text=True, timeout=60, cwd=planted
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: mpubsub ")
    assert [p.name for p in planted.glob("*.imported")] == []
