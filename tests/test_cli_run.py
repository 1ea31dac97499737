"""``edged run`` / ``edged check`` end to end: the real daemon process on real clips, a real
broker and a real RTSP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest
import skimage.data
from helpers.daemon import Daemon, write_config

if TYPE_CHECKING:
    from helpers.broker import Mosquitto
    from helpers.rtsp_server import RtspServer

pytest_plugins = ["helpers.broker", "helpers.rtsp_server"]

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


def edged(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def on(messages: list[dict[str, Any]], suffix: str) -> list[Any]:
    return [m["payload"] for m in messages if m["topic"].endswith(suffix)]


def test_detect_on_the_bikes_clip_over_mqtt(tmp_path: Path, mosquitto: Mosquitto,
                                            bikes_clip: Path, converted_model) -> None:
    """Paced at the clip's 25 fps: a subscriber sees a person and a bicycle around second 5."""
    from helpers.broker import Subscriber

    sub = Subscriber(mosquitto, "edged/e2e/#")
    try:
        done = edged("run", "--task", "detect", "--source", str(bikes_clip),
                     "--model", str(converted_model("ssd_mobilenet_v2_coco")),
                     "--mqtt", f"{mosquitto.host}:{mosquitto.port}", "--device", "e2e",
                     "--threshold", "0.3",  # the detector's usual operating point
                     "--name", "street", "--state-dir", str(tmp_path / "state"))
        assert done.returncode == 0, done.stderr
        assert sub.wait(lambda: sub.on("edged/e2e/availability")
                        and sub.on("edged/e2e/availability")[-1].payload == b"offline", 10)
        results = sub.json("edged/e2e/street/result")
        assert results, done.stderr
        seqs = [r["seq"] for r in results]
        assert seqs == list(range(1, len(seqs) + 1))
        around_5s = [r for r in results if 100 <= r["frame"]["index"] <= 150]  # 4 s .. 6 s
        labels = {d["label"] for r in around_5s for d in r["detections"]}
        assert {"person", "bicycle"} <= labels, labels
        meta = sub.json("edged/e2e/street/meta")[-1]
        assert meta["model"] == "ssd_mobilenet_v2_coco" and meta["task"] == "detect"
    finally:
        sub.close()


def test_classify_a_still_image_to_stdout(tmp_path: Path, converted_model) -> None:
    image = tmp_path / "chelsea.jpg"
    cv2.imwrite(str(image), np.ascontiguousarray(skimage.data.chelsea()[..., ::-1]))
    done = edged("run", "--task", "classify", "--source", str(image), "--device", "d",
                 "--model", str(converted_model("mobilenet_v2_imagenet")),
                 "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    messages = json_lines(done.stdout.splitlines())
    (result,) = on(messages, "/main/result")
    assert result["classes"][0]["label"] in CAT_CLASSES
    assert messages[0]["topic"] == "edged/d/main/meta"


def test_segment_fractions_from_a_config(tmp_path: Path, converted_model) -> None:
    image = tmp_path / "chelsea.png"
    cv2.imwrite(str(image), np.ascontiguousarray(skimage.data.chelsea()[..., ::-1]))
    config = write_config(tmp_path, {
        "device": "seg", "stdout": True, "state_dir": str(tmp_path / "state"),
        "streams": [{"name": "s", "task": "segment", "source": "chelsea.png",
                     "model": str(converted_model("deeplabv3_mnv2_voc"))}]})
    done = edged("run", "--config", str(config))
    assert done.returncode == 0, done.stderr
    (result,) = on(json_lines(done.stdout.splitlines()), "/s/result")
    fractions = {c["label"]: c["fraction"] for c in result["segmentation"]["classes"]}
    assert fractions["cat"] > 0.8 and fractions["cat"] + fractions.get("background", 0) > 0.95


def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, private_mosquitto: Mosquitto,
                                                 bikes_clip: Path, converted_model) -> None:
    """The broker goes away for a few seconds: results wait on disk and arrive in order."""
    from helpers.broker import Subscriber

    broker = private_mosquitto
    sub = Subscriber(broker, "edged/br/#", persistent=True)
    daemon = Daemon("run", "--task", "classify", "--source", str(bikes_clip), "--stdout",
                    "--model", str(converted_model("mobilenet_v2_imagenet")), "--fps", "8",
                    "--mqtt", f"{broker.host}:{broker.port}", "--device", "br",
                    "--state-dir", str(tmp_path / "state"))
    try:
        assert len(sub.wait_count("edged/br/main/result", 3, timeout=60)) >= 3, daemon.log()
        broker.stop()
        down = time.monotonic()
        assert daemon.wait_for(
            lambda: len(on(json_lines(daemon.stdout), "/main/result")) >= 8, 30), daemon.log()
        time.sleep(max(0.0, 2.0 - (time.monotonic() - down)))
        broker.start()
        assert daemon.wait(60) == 0, daemon.log()
        published = [r["seq"] for r in on(json_lines(daemon.stdout), "/main/result")]
        assert sub.wait(lambda: {r["seq"] for r in sub.json("edged/br/main/result")}
                        >= set(published), 30), daemon.log()
        received = [r["seq"] for r in sub.json("edged/br/main/result")]
        first = {}  # QoS 1 may repeat a message; the first arrivals must be in order
        for seq in received:
            first.setdefault(seq, len(first))
        assert sorted(first, key=first.get) == published == list(range(1, len(published) + 1))
    finally:
        daemon.close()
        sub.close()


def test_rtsp_source_restart_is_picked_up(tmp_path: Path, rtsp_server: RtspServer,
                                          converted_model) -> None:
    daemon = Daemon("run", "--task", "classify", "--source", rtsp_server.url, "--fps", "5",
                    "--model", str(converted_model("mobilenet_v2_imagenet")), "--device", "rt",
                    "--state-dir", str(tmp_path / "state"))

    def states() -> list[str]:
        return [s["state"] for s in on(json_lines(daemon.stdout), "/main/status")]

    def results() -> list[dict[str, Any]]:
        return on(json_lines(daemon.stdout), "/main/result")

    try:
        assert daemon.wait_for(lambda: len(results()) >= 3, 60), daemon.log()
        rtsp_server.restart(kill=True)
        assert daemon.wait_for(lambda: "reconnecting" in states(), 30), daemon.log()
        before = len(results())
        assert daemon.wait_for(lambda: states()[-1] == "streaming"
                               and len(results()) >= before + 3, 60), daemon.log()
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert states()[-1] == "offline"
    finally:
        daemon.close()


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--task", "detect", "--source", "/nonexistent/clip.mp4"],
     "edged: edged run: --source: no such file or folder: /nonexistent/clip.mp4"),
    (["run", "--task", "detect"], "edged: run: give --config FILE, or --task and --source"),
    (["run", "--task", "detect", "--source", "/dev/video0", "--mqtt", "h:x"],
     "edged: edged run: --mqtt: port 'x' is not a number (HOST[:PORT])"),
    (["run", "--task", "detect", "--source", "/dev/video0", "--model", "no_such_model"],
     "edged: streams[0].model: unknown model 'no_such_model'"),
    (["check", "--config", "/nonexistent/edged.yaml"],
     "edged: /nonexistent/edged.yaml: no such configuration file"),
    (["plan", "/nonexistent/model.onnx", "--time-limit", "nan"],
     "edged: --time-limit must be positive, got nan"),
])
def test_bad_flags_give_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    done = edged(*args, "--state-dir", str(tmp_path)) if args[0] == "run" else edged(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(expected), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_video_that_is_not_one_gives_one_line(tmp_path: Path, bikes_clip: Path,
                                                converted_model) -> None:
    """Only edged's line: no decoder chatter from the video libraries beneath."""
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(bikes_clip.read_bytes()[-300_000:])  # the tail alone: no index atom
    done = edged("run", "--task", "classify", "--source", str(cut), "--state-dir",
                 str(tmp_path), "--model", str(converted_model("mobilenet_v2_imagenet")),
                 "--log-level", "error")
    assert done.returncode == 2
    assert done.stderr == f"edged: {cut}: not a readable video file\n", done.stderr


def test_missing_default_model_says_how_to_get_it(tmp_path: Path) -> None:
    done = edged("run", "--task", "segment", "--source", "/dev/video0",
                 "--state-dir", str(tmp_path), env={"EDGED_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2
    assert "deeplabv3_mnv2_voc" in done.stderr and "edged convert" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_check(tmp_path: Path, bikes_clip: Path, converted_model) -> None:
    good = write_config(tmp_path, {
        "device": "chk", "stdout": True,
        "streams": [{"name": "a", "task": "classify", "source": str(bikes_clip), "fps": 2,
                     "model": str(converted_model("mobilenet_v2_imagenet"))}]}, "good.yaml")
    # The same answer every time (it once flipped with the machine's load), here while a
    # second check runs beside it.
    first, second = (subprocess.Popen([sys.executable, "-m", "edged", "check", "--config",
                                       str(good)], stdout=subprocess.PIPE, text=True)
                     for _ in range(2))
    for run in (first, second):
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
        assert "ok   a: classify with mobilenet_v2_imagenet, 640x272 frames" in out
        assert "capacity:" in out and "check passed" in out
    hungry = write_config(tmp_path, {
        "device": "chk", "stdout": True,
        "streams": [{"name": n, "task": "segment", "source": str(bikes_clip), "fps": 1000,
                     "model": str(converted_model("deeplabv3_mnv2_voc"))} for n in "ab"]},
        "hungry.yaml")
    done = edged("check", "--config", str(hungry))
    assert done.returncode == 0, done.stdout
    assert "WARN over capacity: the streams need about" in done.stdout
    assert "check passed (1 warning)" in done.stdout

    bad = write_config(tmp_path, {
        "device": "chk", "stdout": True,
        "streams": [{"name": "a", "task": "detect", "source": {
            "uri": "rtsp://127.0.0.1:9/none", "open_timeout": 1},
            "model": str(converted_model("mobilenet_v2_imagenet"))}]}, "bad.yaml")
    done = edged("check", "--config", str(bad))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL streams[0].model: " in done.stdout and "is a classify model" in done.stdout
    assert "FAIL streams[0].source.uri: no frame" in done.stdout
    assert "capacity:" not in done.stdout  # nothing was timed: no empty estimate
