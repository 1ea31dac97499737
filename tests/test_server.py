"""The daemon as a real process: systemd notify and watchdog, SIGHUP reload, commands over a real
broker, SIGTERM shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import msgspec
import numpy as np
import pytest
import skimage.data
from helpers.daemon import Daemon, NotifySocket, write_config

from edged.config import parse_config
from edged.errors import EdgedError
from edged.server import load_models
from edged.stats import ProcessStats, RateMeter, Window, temperatures

if TYPE_CHECKING:
    from helpers.broker import Mosquitto
    from helpers.rtsp_server import RtspServer

# Plugins, not imports: their fixtures register once (imported modules would not be rewritten).
pytest_plugins = ["helpers.broker", "helpers.rtsp_server"]

WATCHDOG_USEC = 1_000_000


def test_ready_watchdog_and_a_stalled_source(tmp_path: Path, rtsp_server: RtspServer,
                                             converted_model) -> None:
    """READY=1 once running; WATCHDOG=1 while frames flow; a source that goes silent without
    closing the connection stalls the stream and the pings stop; they resume with the frames."""
    model = converted_model("mobilenet_v2_imagenet")
    config = write_config(tmp_path, {
        "device": "wd", "stdout": True, "state_dir": str(tmp_path / "state"),
        "streams": [{
            "name": "cam", "task": "classify", "model": str(model), "fps": 5,
            # A long read timeout keeps the reader waiting on the silent server: a hang.
            "source": {"uri": rtsp_server.url, "read_timeout": 60},
            "stall_timeout": 2,
        }],
    })
    notify = NotifySocket(tmp_path / "notify")
    daemon = Daemon("run", "--config", str(config), env={
        "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        assert notify.wait_for("READY", "1", timeout=60), daemon.log()
        assert daemon.wait_for(lambda: any('"cam/result"' in line or "/cam/result" in line
                                           for line in daemon.stdout), 30), daemon.log()
        # Under systemd the journal adds timestamps: log lines start with their level.
        assert daemon.wait_log(r"^INFO edged\.server: edged \S+ running: device wd", 5)
        ready = notify.times("READY", "1")[0]
        assert notify.wait_for("WATCHDOG", "1", timeout=5, after=ready), daemon.log()

        rtsp_server.freeze()
        assert daemon.wait_log(r"stream cam: stalled", timeout=15), daemon.log()
        stalled_at = time.monotonic()
        time.sleep(3 * WATCHDOG_USEC / 1e6)
        assert not [t for t in notify.times("WATCHDOG") if t > stalled_at + 0.2], \
            "watchdog pings went on while the stream was stalled"
        assert notify.wait_for("STATUS", "stream cam stalled", timeout=1)

        rtsp_server.thaw()
        assert notify.wait_for("WATCHDOG", "1", timeout=30, after=time.monotonic()), daemon.log()
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert notify.times("STOPPING", "1")
    finally:
        daemon.close()
        notify.close()


@pytest.fixture
def astronaut_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "astronaut.png"), np.ascontiguousarray(
        skimage.data.astronaut()[..., ::-1]))
    return folder


def deployment(tmp_path: Path, broker: Mosquitto, source: Path, model: Path,
               threshold: float) -> dict:
    return {
        "device": "srv", "state_dir": str(tmp_path / "state"), "stats_interval": 1,
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5},
        "streams": [{"name": "cam", "task": "detect", "model": str(model), "fps": 4,
                     "threshold": threshold, "source": {"uri": str(source), "loop": True}}],
    }


def test_reload_commands_and_shutdown(tmp_path: Path, mosquitto: Mosquitto, astronaut_dir: Path,
                                      converted_model) -> None:
    from helpers.broker import Subscriber  # loaded by pytest_plugins by now

    model = converted_model("ssd_mobilenet_v2_coco")
    config = write_config(tmp_path, deployment(tmp_path, mosquitto, astronaut_dir, model, 0.5))
    prefix = "edged/srv"
    sub = Subscriber(mosquitto, f"{prefix}/#")
    daemon = Daemon("run", "--config", str(config))
    try:
        assert len(sub.wait_count(f"{prefix}/cam/result", 2, timeout=60)) >= 2, daemon.log()
        assert sub.on(f"{prefix}/availability")[-1].payload == b"online"
        assert sub.wait(lambda: sub.on(f"{prefix}/stats"), timeout=10)
        stats = sub.json(f"{prefix}/stats")[-1]
        assert stats["streams"]["cam"]["processed"] >= 1 and stats["process"]["rss_mb"] > 0

        # SIGHUP with a new threshold: applied live (the retained meta shows it).
        write_config(tmp_path, deployment(tmp_path, mosquitto, astronaut_dir, model, 0.9))
        daemon.send(signal.SIGHUP)
        assert sub.wait(lambda: sub.json(f"{prefix}/cam/meta")[-1]["threshold"] == 0.9, 15), \
            daemon.log()
        assert daemon.wait_log(r"reload: stream cam settings applied", 5)

        # SIGHUP with a new source for cam and a new stream: cam restarts, cam2 starts.
        changed = deployment(tmp_path, mosquitto, astronaut_dir, model, 0.9)
        changed["streams"][0]["source"] = {"uri": str(astronaut_dir / "astronaut.png"),
                                           "loop": True}
        changed["streams"].append({**changed["streams"][0], "name": "cam2"})
        write_config(tmp_path, changed)
        daemon.send(signal.SIGHUP)
        assert daemon.wait_log(r"reload: stream cam restarts \(source changed\)", 15)
        assert sub.wait_count(f"{prefix}/cam2/result", 1, timeout=30), daemon.log()
        results = len(sub.on(f"{prefix}/cam/result"))
        assert sub.wait(lambda: len(sub.on(f"{prefix}/cam/result")) > results, 20), daemon.log()

        # SIGHUP with a broken file: reported, the running configuration kept.
        config.write_text("streams: [{name: cam, task: detect, source: /nonexistent.mp4}]\n"
                          "mqtt: {port: 0}\n")
        daemon.send(signal.SIGHUP)
        assert daemon.wait_log(r"reload failed, keeping the running configuration: "
                               r".*streams\[0\]\.source\.uri: no such file", 15), daemon.log()
        assert daemon.wait_log(r"reload failed.*mqtt\.port: must be 1\.\.65535", 1)

        # Commands: bad ones get one-line errors, the daemon goes on; good ones apply.
        replies = f"{prefix}/cam/set/reply"
        for payload in (b"{not json", b'{"threshold": 7}', b'{"treshold": 0.3}',
                        b'{"thresholds": {"persn": 0.5}}'):
            count = len(sub.on(replies))
            sub.client.publish(f"{prefix}/cam/set", payload, qos=1)
            assert sub.wait(lambda n=count: len(sub.on(replies)) > n, 10), daemon.log()
            reply = sub.json(replies)[-1]
            assert reply["ok"] is False and "\n" not in reply["error"], reply
        sub.client.publish(f"{prefix}/cam/set", json.dumps({"threshold": 0.3}), qos=1)
        assert sub.wait(lambda: sub.json(replies)[-1]["ok"] is True, 10), sub.json(replies)
        sub.client.publish(f"{prefix}/set", json.dumps({"fps": 3}), qos=1)
        assert sub.wait(lambda: sub.on(f"{prefix}/set/reply"), 10)
        assert sub.json(f"{prefix}/set/reply")[-1]["ok"] is True
        results = len(sub.on(f"{prefix}/cam/result"))
        assert sub.wait(lambda: len(sub.on(f"{prefix}/cam/result")) > results + 1, 20), \
            "results stopped after the commands"

        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log()
        assert sub.wait(lambda: sub.on(f"{prefix}/availability")
                        and sub.on(f"{prefix}/availability")[-1].payload == b"offline", 10)
        assert sub.wait(lambda: sub.json(f"{prefix}/cam/status")[-1]["state"] == "offline", 10)
        seqs = [r["seq"] for r in sub.json(f"{prefix}/cam/result")]
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))
    finally:
        daemon.close()
        sub.close()


def test_stats_measurements() -> None:
    stats = ProcessStats()
    sum(i * i for i in range(300_000))  # some CPU time to measure
    sample = stats.sample()
    assert sample["cpu_percent"] > 0 and sample["rss_mb"] > 10
    assert sample["peak_rss_mb"] >= sample["rss_mb"] * 0.9
    assert all(isinstance(v, float) for v in sample["temperature_c"].values())
    window = Window(size=100)
    assert window.summary() is None
    for value in range(1, 201):  # only the last 100 are kept
        window.add(float(value))
    assert window.summary() == {"mean": 150.5, "p50": 150.5, "p99": 199.01}
    meter = RateMeter(span=5.0)
    for i in range(11):
        meter.tick(100.0 + i * 0.1)  # 10 per second
    assert meter.rate(101.0) == pytest.approx(10.0)
    assert meter.rate(200.0) == 0.0


def test_temperatures_read_thermal_zones(tmp_path: Path) -> None:
    # Laid out as the kernel does it (this machine has no thermal zones of its own).
    for zone, kind, millis in (("thermal_zone0", "cpu-thermal", "51634\n"),
                               ("thermal_zone1", "", "40000\n"),
                               ("thermal_zone2", "gpu-thermal", "n/a\n")):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "type").write_text(kind)
        (tmp_path / zone / "temp").write_text(millis)
    assert temperatures(str(tmp_path)) == {"cpu-thermal": 51.6, "thermal_zone1": 40.0}


def test_streams_share_one_session_per_model_file(converted_model) -> None:
    model = str(converted_model("mobilenet_v2_imagenet"))
    streams = [{"name": n, "task": "classify", "model": model, "source": "/dev/video0",
                "threads": t} for n, t in (("a", 1), ("b", 2))]
    config = parse_config({"device": "d", "stdout": True, "streams": streams})
    models = load_models(config)
    assert models["a"] == models["b"]
    _, loaded = models["a"]
    assert loaded.session.get_session_options().intra_op_num_threads == 2  # the most asked for

    config = msgspec.structs.replace(config, streams=[
        config.streams[0], msgspec.structs.replace(config.streams[1], task="detect")])
    with pytest.raises(EdgedError, match=r"streams\[1\]\.model: mobilenet_v2_imagenet\.onnx is "
                                         r"a classify model but the stream's task is detect"):
        load_models(config)


def test_a_second_stop_signal_exits_at_once(tmp_path: Path, rtsp_server: RtspServer,
                                            converted_model) -> None:
    """A stop that waits (here for a reader blocked on a silent server, up to its 60 s read
    timeout) ends at once when asked again, as users expect of Ctrl-C pressed twice."""
    config = write_config(tmp_path, {
        "device": "twice", "stdout": True, "state_dir": str(tmp_path / "state"),
        "streams": [{"name": "cam", "task": "classify",
                     "model": str(converted_model("mobilenet_v2_imagenet")),
                     "source": {"uri": rtsp_server.url, "read_timeout": 60}}],
    })
    daemon = Daemon("run", "--config", str(config))
    try:
        assert daemon.wait_for(lambda: any("/cam/result" in line or '"cam/result"' in line
                                           for line in daemon.stdout), 60), daemon.log()
        rtsp_server.freeze()
        time.sleep(1.0)  # the reader is now blocked in a read
        daemon.send(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):  # the first stop waits for the reader
            daemon.wait(3)
        daemon.send(signal.SIGINT)
        assert daemon.wait(5) == 128 + signal.SIGINT, daemon.log()
        assert daemon.wait_log(r"stop asked again: exiting at once", 1)
    finally:
        rtsp_server.thaw()
        daemon.close()
