"""Tests for what ``make install`` writes from packaging/ and etc/, and ``make uninstall``.

Each install goes under a temporary directory, offline, and never creates a
user (conftest.make_install). The units are checked statically here, and
under a real systemd in test_systemd.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator

import pytest

from . import needs
from .conftest import ROOT, VENV_WHEELS, make_install

UNITS = ["mpubsubd.service", "mpubsubd@.service"]
# What the issue asks: a unit that starts as root (no User=), becomes
# another user (CAP_SETUID, CAP_SETGID) and reaches the network (this host
# only, unless a drop-in allows more) rates 2.0.
EXPOSURE = 2.0
# The lines of mpubsubd@.service that differ from mpubsubd.service's, and
# what they read there.
INSTANCE_ONLY = {
    "Description=mpubsub message broker %i\n": "Description=mpubsub message broker\n",
    " -c /etc/mpubsub/%i.conf --instance %i\n": " -c /etc/mpubsub/mpubsubd.conf\n",
    "RuntimeDirectory=mpubsub-%i\n": "RuntimeDirectory=mpubsub\n",
    "SyslogIdentifier=mpubsubd@%i\n": "",
}


def shipped_pins() -> Dict[str, str]:
    """packaging/constraints.txt: each distribution make install ships, and its version.

    The pins of what builds the package ([build-system] requires) are left out.
    """
    text = (ROOT / "packaging" / "constraints.txt").read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", text, re.MULTILINE)
    pyproject = (ROOT / "pyproject.toml").read_text()
    build = re.search(r"^requires = \[(.*)\]$", pyproject, re.MULTILINE)
    assert build
    builders = {normalized(re.split(r"[<>=!~ ]", r)[0]) for r in re.findall(r'"([^"]+)"', build[1])}
    return {normalized(name): v for name, v in found if normalized(name) not in builders}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def decoy_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel of *name* at *version* that holds nothing but its metadata."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{dist}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}\n")
    files[f"{info}/RECORD"] = "".join(record) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """``make install`` under a temporary base, from wheels with a newer decoy of each pin."""
    needs.DEBIAN_PYTHON.check(os.path.exists("/usr/bin/python3"))
    base = Path(tempfile.mkdtemp(prefix="mpubsub-packaging-"))
    try:
        wheels = base / "wheels"
        shutil.copytree(VENV_WHEELS, wheels)
        for name, version in shipped_pins().items():
            decoy_wheel(wheels, name, f"{version}.post1")
        make_install(base, wheels=wheels)
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


def test_installed_dependencies_are_the_pinned_ones(installed: Path) -> None:
    """LIBDIR holds the package and each pin at its version, though newer wheels were offered."""
    libdir = installed / "prefix" / "lib" / "mpubsub"
    found = {}
    for info in libdir.glob("*.dist-info"):
        name, version = info.name[: -len(".dist-info")].split("-")
        found[normalized(name)] = version
    assert found == {**shipped_pins(), "mpubsub": "0.1.0"}


@pytest.mark.parametrize("unit", UNITS)
def test_installed_unit_passes_systemd_analyze_verify(installed: Path, unit: str) -> None:
    """Each installed unit runs the installed mpubsubd and verifies without a warning."""
    needs.SYSTEMD.check(needs.which("systemd-analyze"))
    path = installed / "prefix" / "lib" / "systemd" / "system" / unit
    assert "/usr/local/" not in path.read_text()
    assert f" -c {installed}/etc/mpubsub/" in path.read_text()  # SYSCONFDIR's configuration
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_installed_unit_exposure(installed: Path, unit: str) -> None:
    """systemd-analyze security rates each unit at most EXPOSURE."""
    needs.SYSTEMD.check(needs.which("systemd-analyze"))
    path = installed / "prefix" / "lib" / "systemd" / "system" / unit
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True
    )
    level = re.search(r"^→ Overall exposure level for \S+: ([\d.]+) ", result.stdout, re.MULTILINE)
    assert level, result.stdout + result.stderr
    assert float(level[1]) <= EXPOSURE, result.stdout


def test_instance_unit_differs_only_by_its_instance() -> None:
    """mpubsubd@.service is mpubsubd.service but for its INSTANCE_ONLY lines and first comment."""
    systemd = ROOT / "packaging" / "systemd"
    template = (systemd / "mpubsubd@.service").read_text()
    commands = [line for line in template.splitlines() if "bin/mpubsubd" in line]
    assert len(commands) == 3
    assert all(line.endswith(" --instance %i") for line in commands), commands
    body = template[template.index("[Unit]") :]
    for instance, main in INSTANCE_ONLY.items():
        assert instance in body
        body = body.replace(instance, main)
    assert body == (systemd / "mpubsubd.service").read_text()


def test_edited_configuration_is_kept(tmp_path: Path) -> None:
    """A second install keeps edited files and puts the new ones beside them, saying so."""
    assert make_install(tmp_path) == ""
    config = tmp_path / "etc" / "mpubsub" / "mpubsubd.conf"
    logrotate = tmp_path / "etc" / "logrotate.d" / "mpubsubd"
    info = config.stat()
    assert oct(info.st_mode & 0o7777) == "0o640"
    if needs.as_root():
        assert (info.st_uid, info.st_gid) == (0, 0)
    assert make_install(tmp_path) == ""  # unedited: replaced, silently
    # An older release's files, which nobody edited: the upgrade replaces them too.
    shipped = tmp_path / "prefix" / "lib" / "mpubsub" / "shipped"
    for path, name in ((config, "mpubsubd.conf"), (logrotate, "mpubsubd")):
        path.write_text("# as an older release shipped it\n")
        (shipped / name).write_text("# as an older release shipped it\n")
    assert make_install(tmp_path) == ""
    assert config.read_text() == (ROOT / "etc" / "mpubsubd.conf").read_text()
    assert logrotate.read_text() == (ROOT / "etc" / "logrotate.d" / "mpubsubd").read_text()
    config.write_text("[mpubsubd]\nlog_level = DEBUG\n")
    logrotate.write_text("# rotated elsewhere\n")
    said = make_install(tmp_path)
    assert config.read_text() == "[mpubsubd]\nlog_level = DEBUG\n"
    assert logrotate.read_text() == "# rotated elsewhere\n"
    shipped_config = config.with_name("mpubsubd.conf.dist")
    shipped_logrotate = logrotate.with_name("mpubsubd.dpkg-dist")
    assert shipped_config.read_text() == (ROOT / "etc" / "mpubsubd.conf").read_text()
    assert oct(shipped_config.stat().st_mode & 0o7777) == "0o640"
    assert shipped_logrotate.read_text() == (ROOT / "etc" / "logrotate.d" / "mpubsubd").read_text()
    assert said == (
        f"kept your {config}; the new one is {shipped_config}: merge what you need\n"
        f"kept your {logrotate}; the new one is {shipped_logrotate}: merge what you need\n"
    )


def staged(tmp_path: Path) -> Path:
    """``make install`` of a host's /usr/local and /etc into the DESTDIR tmp_path/dest."""
    dest = tmp_path / "dest"
    make_install(tmp_path, f"DESTDIR={dest}", "PREFIX=/usr/local", "SYSCONFDIR=/etc")
    return dest


@pytest.mark.parametrize("edited", [False, True])
def test_uninstall_keeps_only_configuration(tmp_path: Path, edited: bool) -> None:
    """make uninstall removes every file but /etc/mpubsub's, and an edited logrotate file."""
    dest = staged(tmp_path)
    if edited:
        (dest / "etc" / "logrotate.d" / "mpubsubd").write_text("# rotated elsewhere\n")
        staged(tmp_path)  # which leaves the shipped one beside it, for uninstall to remove
    places = [f"DESTDIR={dest}", "PREFIX=/usr/local", "SYSCONFDIR=/etc"]
    said = make_install(tmp_path, *places, target="uninstall")
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir())
    kept = ["etc/logrotate.d/mpubsubd"] if edited else []
    assert left == [*kept, "etc/mpubsub/mpubsubd.conf"]
    logrotate = dest / "etc" / "logrotate.d" / "mpubsubd"
    kept_logrotate = f"kept your edited {logrotate} (remove it by hand if unwanted)\n"
    assert said == (kept_logrotate if edited else "") + f"kept {dest}/etc/mpubsub\n"


def dry_run(*variables: str, target: str = "install") -> str:
    """What ``make -n`` would run: nothing runs, so nothing happens to this host."""
    done = subprocess.run(
        ["make", "-n", target, *variables], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_user_is_created_on_this_host_only() -> None:
    """make install creates the user without DESTDIR, never with one or with CREATE_USER=no."""
    assert 'systemd-sysusers "/usr/local/lib/sysusers.d/mpubsub.conf"' in dry_run()
    staged_or_told = [
        ("DESTDIR=/stage",),
        ("DESTDIR=/stage", "CREATE_USER=yes"),
        ("CREATE_USER=no",),
    ]
    for variables in staged_or_told:
        commands = dry_run(*variables)
        assert "systemd-sysusers " not in commands and "adduser " not in commands


def test_staged_uninstall_touches_no_unit() -> None:
    """make uninstall stops the units on this host only: never for a DESTDIR."""
    assert "systemctl disable --now mpubsubd.service" in dry_run(target="uninstall")
    assert "systemctl" not in dry_run("DESTDIR=/stage", target="uninstall")


def test_sysusers_file_makes_a_system_user(tmp_path: Path) -> None:
    """systemd-sysusers, on a staged root, finds the file and makes mpubsub: no home, no shell."""
    needs.SYSTEMD.check(needs.which("systemd-sysusers"))
    dest = staged(tmp_path)
    # --root: it reads and writes dest's /usr/local/lib and /etc only.
    subprocess.run(["systemd-sysusers", f"--root={dest}"], check=True, capture_output=True)
    user = (dest / "etc" / "passwd").read_text().split(":")
    group = (dest / "etc" / "group").read_text()
    name, _, uid, gid, gecos, home, shell = user
    assert (name, gecos, home, shell.strip()) == (
        "mpubsub",
        "mpubsub broker",
        "/nonexistent",
        "/usr/sbin/nologin",
    )
    assert int(uid) < 1000
    assert group == f"mpubsub:x:{gid}:\n"


def test_logrotate_rotates_every_instance_and_hups_it(tmp_path: Path) -> None:
    """logrotate, on the shipped file pointed at tmp_path, rotates each log and HUPs each pid."""
    needs.LOGROTATE.check(needs.as_root(), needs.which("logrotate"))
    text = (ROOT / "etc" / "logrotate.d" / "mpubsubd").read_text()
    text = text.replace("/var/log/mpubsub/", f"{tmp_path}/var/log/")
    text = text.replace("/run/mpubsub", f"{tmp_path}/run/mpubsub")
    for place in ("/run/", "/var/"):  # no pidfile or log of this host is touched
        assert text.count(place) == text.count(f"{tmp_path}{place}")
    (tmp_path / "logrotate.conf").write_text(text)
    logs = tmp_path / "var" / "log"
    logs.mkdir(parents=True)
    sleepers = []
    try:
        # Two stand-ins for mpubsubd (their command line says so), and a process a
        # stale pidfile names that is not mpubsubd: it must not be signalled.
        wrapper = "import time; time.sleep(60)  # from mpubsubd._main import main"
        stand_in = [sys.executable, "-c", wrapper]  # as make install's wrapper runs mpubsubd
        for name, run, command in [
            ("mpubsubd", "mpubsub", stand_in),
            ("sensors", "mpubsub-sensors", stand_in),
            ("stale", "mpubsub-stale", ["sh", "-c", "sleep 60", "mpubsubd.log"]),  # tail -f, say
        ]:
            (logs / f"{name}.log").write_text("a line\n")
            (tmp_path / "run" / run).mkdir(parents=True)
            sleepers.append(subprocess.Popen(command))
            (tmp_path / "run" / run / "mpubsubd.pid").write_text(f"{sleepers[-1].pid}\n")
        # "0" would make kill -HUP 0 signal logrotate's own process group.
        (tmp_path / "run" / "mpubsub-zero").mkdir()
        (tmp_path / "run" / "mpubsub-zero" / "mpubsubd.pid").write_text("0\n")
        rotated = subprocess.run(
            ["logrotate", "--force", "--state", str(tmp_path / "state"), "logrotate.conf"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            start_new_session=True,  # its own group: a kill -HUP 0 would end it, not pytest
        )
        assert rotated.returncode == 0, rotated.stderr
        info = (logs / "mpubsubd.log").stat()  # made anew, as logrotate's create says
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o640)
        assert sorted(p.name for p in logs.iterdir()) == [
            "mpubsubd.log",
            "mpubsubd.log.1",
            "sensors.log",
            "sensors.log.1",
            "stale.log",
            "stale.log.1",
        ]
        assert [s.wait(timeout=10) for s in sleepers[:2]] == [-signal.SIGHUP, -signal.SIGHUP]
        assert sleepers[2].poll() is None  # not an mpubsubd: left alone
    finally:
        for sleeper in sleepers:
            if sleeper.poll() is None:
                sleeper.kill()
                sleeper.wait()
