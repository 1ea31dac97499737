"""systemd: sd_notify datagrams, the watchdog interval, and the unit files (verified and scored
by systemd-analyze itself)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.daemon import NotifySocket

from edged.systemd import Notifier, under_systemd

REPO = Path(__file__).resolve().parent.parent
UNITS = ["edged.service", "edged@.service"]
MAX_EXPOSURE = 1.5


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_reaches_the_socket(tmp_path: Path, abstract: bool) -> None:
    listener = NotifySocket(tmp_path / "notify", abstract=abstract)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": listener.address})
        assert notifier.enabled
        assert notifier.notify(READY=1, STATUS="2 streams running")
        assert listener.wait_for("READY", "1", timeout=5)
        assert listener.messages[0][1] == {"READY": "1", "STATUS": "2 streams running"}
        notifier.close()
    finally:
        listener.close()


def test_without_systemd_notify_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.notify(READY=1) is False
    assert notifier.watchdog_interval is None
    assert not under_systemd({})
    assert under_systemd({"JOURNAL_STREAM": "8:1234"})


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.notify(WATCHDOG=1) is False


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid())}, 2.5),
    ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval == expected


def _edged_executable() -> str:
    """The installed ``edged`` entry point beside this interpreter."""
    path = Path(sys.executable).parent / "edged"
    assert path.is_file(), f"edged is not installed in {path.parent} (pip install -e .)"
    return str(path)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (apt-get install systemd)"
    text = (REPO / "systemd" / unit).read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's install.
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/edged", _edged_executable()))
    targets = [tmp_path / unit]
    if unit.endswith("@.service"):
        instance = tmp_path / unit.replace("@", "@front")
        instance.write_text((tmp_path / unit).read_text())
        targets.append(instance)
    for target in targets:
        done = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no",
                               str(target)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert target.name not in done.stderr, done.stderr  # no warnings about our unit


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure(unit: str) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           str(REPO / "systemd" / unit)], capture_output=True, text=True,
                          timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    exposure = float(match.group(1))
    print(f"{unit}: systemd-analyze security exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit: str) -> None:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    expected = {
        "Type": "notify", "Restart": "on-failure", "DynamicUser": "yes",
        "SupplementaryGroups": "video", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ExecReload": "/bin/kill -HUP $MAINPID", "ConfigurationDirectory": "edged",
        "DeviceAllow": "char-video4linux rw",
    }
    for key, value in expected.items():
        assert value in settings.get(key, []), key
    assert "@system-service" in settings["SystemCallFilter"]
    for key in ("WatchdogSec", "MemoryMax", "StateDirectory"):
        assert settings.get(key), key
    if unit == "edged@.service":
        assert settings["ExecStart"] == ["/usr/local/bin/edged run --config /etc/edged/%i.yaml"]


LOG_SCRIPT = """
import logging
from edged.server import setup_logging
setup_logging("debug")
log = logging.getLogger("edged.test")
log.error("disk full")
log.warning("slow")
log.info("running")
log.debug("detail")
"""


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "redirected"])
def test_log_lines_carry_journal_priorities(tmp_path: Path, journal: bool) -> None:
    """With stderr on the journal (``JOURNAL_STREAM`` names it), each line starts with its
    syslog priority, which ``journalctl -p err`` filters on; redirected elsewhere, it does not."""
    with open(tmp_path / "stderr", "w") as stderr:
        info = os.fstat(stderr.fileno())
        stream = f"{info.st_dev}:{info.st_ino}" if journal else f"{info.st_dev}:1"
        subprocess.run([sys.executable, "-c", LOG_SCRIPT], stderr=stderr, check=True,
                       env={**os.environ, "JOURNAL_STREAM": stream, "INVOCATION_ID": "x"})
    lines = (tmp_path / "stderr").read_text().splitlines()
    expected = ["ERROR edged.test: disk full", "WARNING edged.test: slow",
                "INFO edged.test: running", "DEBUG edged.test: detail"]
    if journal:
        expected = [f"<{p}>{line}" for p, line in zip((3, 4, 6, 7), expected, strict=True)]
    assert lines == expected
