"""edged under real systemd: the shipped ``systemd/edged.service`` in a booted container.

The container (``systemd_container``) runs mosquitto, an MJPEG camera of bikes.mp4 frames and a
recorder of every ``edged/#`` message; these tests start, reload, freeze, probe and stop the
real service there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from system.systemd_container import (
    CAMERA_PORT,
    CAMERA_UNIT,
    REPORT,
    TEST_DIR,
    Container,
    monotonic_usec,
    wait_until,
)

UNIT = "edged.service"
DEVICE = "nspawn"
STREAM = "cam"
STALL_TIMEOUT = 5.0
MAX_EXPOSURE = 1.5
# The daemon must write only here: its state (the outbox) and its model cache.
WRITABLE = ("/var/lib/edged", "/var/cache/edged")
# Per-service throw-away folders (PrivateTmp=): writable, but nobody else sees them.
PRIVATE = ("/tmp", "/var/tmp")
READ_ONLY = ("/", "/etc", "/etc/edged", "/etc/systemd/system", "/usr", "/usr/local/bin",
             "/opt/edged", TEST_DIR, "/root", "/home", "/var", "/var/lib", "/var/log", "/srv",
             "/run", "/dev/shm", "/boot", "/mnt")

# Runs as the service's user in its mount namespace: try to create a file in each folder.
_WRITE_PROBE = """import json, os, sys
out = {}
for folder in sys.argv[1:]:
    try:
        with open(os.path.join(folder, ".edged-probe"), "w") as f:
            f.write("probe")
        out[folder] = "written"
    except OSError as exc:
        out[folder] = exc.strerror
print(json.dumps(out))
"""


def deployment(threshold: float) -> dict[str, Any]:
    """The deployment the service runs: SSD on the container's camera, results to mosquitto.

    ``read_timeout`` is longer than the watchdog, so a frozen camera hangs the read (a stall)
    instead of being reopened; ``stall_timeout`` is short to keep the test quick.
    """
    return {
        "device": DEVICE,
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "stats_interval": 5,
        "streams": [{
            "name": STREAM, "task": "detect", "fps": 5, "threshold": threshold,
            "model": f"{TEST_DIR}/ssd_mobilenet_v2_coco.onnx",
            "source": {"uri": f"http://127.0.0.1:{CAMERA_PORT}/stream", "open_timeout": 5,
                       "read_timeout": 120},
            "stall_timeout": STALL_TIMEOUT,
        }],
    }


def topic(suffix: str) -> str:
    return f"edged/{DEVICE}/{suffix}"


def payloads(container: Container, suffix: str, since: float) -> list[Any]:
    """JSON payloads recorded on ``edged/<device>/<suffix>`` since ``since`` (epoch)."""
    return [json.loads(p) for _, t, p in container.mqtt(since) if t == topic(suffix)]


def seconds(value: str) -> float:
    """A systemd time span as ``systemctl show`` prints it (``30s``, ``1min 30s``) in seconds."""
    units = {"min": 60.0, "ms": 0.001, "us": 1e-6, "s": 1.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(min|ms|us|s|h)", value))


@pytest.fixture
def service(systemd_container: Container) -> Iterator[Container]:
    """The shipped unit started (``systemctl start`` returns once it is active) with
    threshold 0.3; stopped afterwards."""
    container = systemd_container
    container.write_config(deployment(threshold=0.3))
    container.systemctl("reset-failed", UNIT, ok=False)
    container.systemctl("start", UNIT, timeout=150)
    yield container
    container.systemctl("stop", UNIT, timeout=60, ok=False)


def test_security_exposure_of_shipped_unit(systemd_container: Container) -> None:
    out = systemd_container.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", out)
    assert overall, f"no overall exposure in systemd-analyze output:\n{out[-500:]}"
    print(f"\nsystemd-analyze security {UNIT} (in the container): {overall.group(0)}")
    REPORT["systemd-analyze security edged.service"] = f"{overall.group(1)} {overall.group(2)}"
    assert float(overall.group(1)) <= MAX_EXPOSURE
    assert overall.group(2) == "OK"


def test_active_only_after_ready(systemd_container: Container) -> None:
    container = systemd_container
    container.write_config(deployment(threshold=0.3))
    since = monotonic_usec()
    container.systemctl("start", "--no-block", UNIT)
    states: list[tuple[str, str, str]] = []

    def active() -> bool:
        props = container.show(UNIT, "ActiveState", "SubState", "MainPID")
        states.append((props["ActiveState"], props["SubState"], props["MainPID"]))
        return props["ActiveState"] == "active"

    try:
        wait_until(active, 120, "edged.service active", interval=0.05)
        # While the daemon ran but had not sent READY=1 yet, systemd held the unit in start.
        assert ("activating", "start") in {(a, s) for a, s, pid in states if pid != "0"}, states
        props = container.show(UNIT, "ExecMainStartTimestampMonotonic",
                               "ActiveEnterTimestampMonotonic", "StatusText")
        loaded = [int(e["__MONOTONIC_TIMESTAMP"]) for e in container.journal(UNIT, since)
                  if "model ssd_mobilenet_v2_coco loaded" in str(e.get("MESSAGE"))]
        assert loaded, "no 'model loaded' line in the journal"
        started = int(props["ExecMainStartTimestampMonotonic"])
        ready = int(props["ActiveEnterTimestampMonotonic"])
        assert started < loaded[0] <= ready
        # STATUS= from the daemon reaches systemd over the notify socket too.
        assert props["StatusText"].startswith("1 stream(s)"), props["StatusText"]
        REPORT["start -> READY=1 (active)"] = f"{(ready - started) / 1e6:.1f} s"
    finally:
        container.systemctl("stop", UNIT, timeout=60, ok=False)


def test_hardening_holds(service: Container) -> None:
    container = service
    pid = container.show(UNIT, "MainPID")["MainPID"]
    status = dict(line.split(":", 1) for line in
                  container.run("cat", f"/proc/{pid}/status").stdout.splitlines())
    uid = status["Uid"].split()[0]
    assert uid != "0", "the service runs as root"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a system call filter is in force
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0

    folders = (*WRITABLE, *PRIVATE, *READ_ONLY)
    probe = container.run("nsenter", "-t", pid, "-m", "-S", uid, "-G", uid,
                          "/opt/edged/bin/python3", "-c", _WRITE_PROBE, *folders)
    outcome = json.loads(probe.stdout)
    try:
        assert {f: outcome[f] for f in (*WRITABLE, *PRIVATE)} == dict.fromkeys(
            (*WRITABLE, *PRIVATE), "written")
        written = [f for f in READ_ONLY if outcome[f] == "written"]
        assert not written, f"the service could write to {written}: {outcome}"
        # Its /tmp and /var/tmp are its own: the probe files are not in the system's.
        for folder in PRIVATE:
            assert container.run("test", "-e", f"{folder}/.edged-probe", ok=False).returncode
        assert container.run("test", "-e", "/var/lib/private/edged/.edged-probe",
                             ok=False).returncode == 0
    finally:
        container.run("rm", "-f", *(f"{f}/.edged-probe" for f in (*WRITABLE, "/")), ok=False)


def test_reload_applies_threshold(service: Container) -> None:
    container = service
    start = time.time()

    def low_scores() -> list[float]:
        return [d["score"] for r in payloads(container, f"{STREAM}/result", start)
                for d in r["detections"] if d["score"] < 0.7]

    assert wait_until(low_scores, 60, "a detection scoring 0.3..0.7 before the reload")
    container.write_config(deployment(threshold=0.7))
    since_usec = monotonic_usec()
    reloaded_at = time.time()
    container.systemctl("reload", UNIT)

    def after_reload() -> list[dict[str, Any]]:
        messages = container.mqtt(reloaded_at)
        applied = [when for when, t, p in messages
                   if t == topic(f"{STREAM}/meta") and json.loads(p)["threshold"] == 0.7]
        # The meta message goes out once the new settings are in place: frames captured after
        # it are processed with them (one captured before may still be in flight).
        results = [r for r in payloads(container, f"{STREAM}/result", reloaded_at)
                   if applied and r["frame"]["epoch"] > applied[0]]
        return results if sum(bool(r["detections"]) for r in results) >= 5 else []

    results = wait_until(after_reload, 60, "5 results with detections after the reload")
    scores = [d["score"] for r in results for d in r["detections"]]
    assert min(scores) >= 0.7, scores
    assert container.show(UNIT, "NRestarts", "ActiveState") == {"NRestarts": "0",
                                                               "ActiveState": "active"}
    assert any("reload: stream cam settings applied" in m
               for m in container.messages(UNIT, since_usec))


def test_stop_publishes_offline_and_exits_0(service: Container) -> None:
    container = service
    wait_until(lambda: payloads(container, f"{STREAM}/result", 0), 60, "a first result")
    limit = seconds(container.show(UNIT, "TimeoutStopUSec")["TimeoutStopUSec"])
    since = time.time()
    container.systemctl("stop", UNIT, timeout=limit + 30)
    took = time.time() - since
    REPORT["systemctl stop"] = f"{took:.1f} s (limit {limit:g} s)"
    assert took < limit
    props = container.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    messages = [(t, p) for _, t, p in container.mqtt(since)]
    assert (topic("availability"), "offline") in messages
    assert {"offline"} <= {json.loads(p)["state"] for t, p in messages
                           if t == topic(f"{STREAM}/status")}


def test_watchdog_restarts_stalled_pipeline(service: Container) -> None:
    container = service
    wait_until(lambda: payloads(container, f"{STREAM}/result", 0), 60, "a first result")
    props = container.show(UNIT, "WatchdogUSec", "RestartUSec", "NRestarts")
    assert props["NRestarts"] == "0"
    budget = STALL_TIMEOUT + seconds(props["WatchdogUSec"]) + seconds(props["RestartUSec"]) + 30
    since_usec = monotonic_usec()
    frozen = time.monotonic()
    # The camera keeps its connection open and sends nothing: the pipeline stalls.
    container.systemctl("kill", "--signal=SIGSTOP", CAMERA_UNIT)
    try:
        wait_until(lambda: int(container.show(UNIT, "NRestarts")["NRestarts"]) >= 1, budget,
                   "a watchdog restart of edged.service")
        REPORT["camera frozen -> watchdog restart"] = f"{time.monotonic() - frozen:.0f} s"
    finally:
        container.systemctl("kill", "--signal=SIGCONT", CAMERA_UNIT)
    log = container.messages(UNIT, since_usec)
    stalled = [i for i, m in enumerate(log) if f"stream {STREAM}: stalled" in m]
    watchdog = [i for i, m in enumerate(log) if "Watchdog timeout" in m]
    assert stalled and watchdog and stalled[0] < watchdog[0], log[-20:]
    assert any("Failed with result 'watchdog'" in m for m in log)
    # The restarted daemon streams again once the camera is back.
    since = time.time()
    wait_until(lambda: payloads(container, f"{STREAM}/result", since), 60,
               "results from the restarted daemon")
    # READY=1 follows the source's opening by a poll (50 ms): results may come first.
    wait_until(lambda: container.show(UNIT, "ActiveState")["ActiveState"] == "active", 10,
               "edged.service active again after its restart")
