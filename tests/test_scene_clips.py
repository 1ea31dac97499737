"""Tracks, zones and lines on a real clip through the real daemon and a real broker."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.broker import Subscriber
from helpers.daemon import Daemon, write_config

from edged.config import parse_config
from edged.model import load_model
from edged.pipeline import Pipeline

if TYPE_CHECKING:
    from helpers.broker import Mosquitto

pytest_plugins = ["helpers.broker"]

# bikes.mp4's shot boundaries: the first frame of each new shot (25 frames/s, 250 frames).
CUTS = {30, 76, 137, 187, 242}
ZONES = {"left": {"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}}
LINES = {"middle": {"points": [[0.5, 0], [0.5, 1]], "directions": ["westward", "eastward"]}}


class Collecting:
    """A sink that keeps every message in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    def publish(self, topic_suffix: str, payload: Any, retain: bool = False) -> None:
        self.messages.append((topic_suffix, payload))

    def close(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict:
        return {}


def test_tracks_end_at_the_clips_scene_cuts(bikes_clip: Path, converted_model,
                                            tmp_path: Path) -> None:
    """Every frame of bikes.mp4 through a tracking detector: tracks end at the shot
    boundaries (reason scene_cut), never carried into the next shot, and nowhere else."""
    model_path = converted_model("ssd_mobilenet_v2_coco")
    stream = parse_config({"stdout": True, "streams": [{
        "name": "s", "task": "detect", "model": str(model_path), "zones": ZONES,
        "source": {"uri": str(bikes_clip), "realtime": False}}]}).streams[0]
    sink = Collecting()
    pipeline = Pipeline(stream, load_model(model_path), [sink], "dev",
                        state_dir=str(tmp_path))
    pipeline.start()
    try:
        deadline = time.monotonic() + 300
        while not pipeline.finished and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pipeline.finished
    finally:
        pipeline.stop()
    cut_frames, frame = set(), None
    pending_cut = False
    for topic, payload in sink.messages:
        if topic == "s/events" and payload.get("reason") == "scene_cut":
            pending_cut = True
        elif topic == "s/result":
            frame = payload["frame"]["index"]
            if pending_cut:
                cut_frames.add(frame)
                pending_cut = False
    assert cut_frames and cut_frames <= CUTS, cut_frames
    assert len(cut_frames) >= 3, cut_frames
    ended = [p for t, p in sink.messages if t == "s/events" and p["type"] == "end"]
    new = [p for t, p in sink.messages if t == "s/events" and p["type"] == "new"]
    assert {e["track"] for e in ended} == {n["track"] for n in new}  # every track ended
    # A detection has its track's id once the track is confirmed (its second frame).
    tracked = [d for t, p in sink.messages if t == "s/result" for d in p["detections"]]
    assert tracked and sum("track" in d for d in tracked) >= 0.85 * len(tracked)


def deployment(tmp_path: Path, broker: Mosquitto, clip: Path, model: Path) -> dict:
    return {
        "device": "scene", "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive": 5},
        "streams": [{"name": "bikes", "task": "detect", "model": str(model), "zones": ZONES,
                     "lines": LINES, "source": {"uri": str(clip), "realtime": False}}],
    }


def run_once(config: Path, sub: Subscriber) -> list[dict]:
    """Run edged over the whole clip; the line messages the subscriber got meanwhile."""
    before = len(sub.on("edged/scene/bikes/lines/middle"))
    daemon = Daemon("run", "--config", str(config))
    try:
        assert daemon.wait(300) == 0, daemon.log()
    finally:
        daemon.close()
    assert sub.wait(lambda: len(sub.on("edged/scene/bikes/lines/middle")) > before, 10)
    return sub.json("edged/scene/bikes/lines/middle")[before:]


def test_zone_and_line_over_a_run_and_a_restart(tmp_path: Path, mosquitto: Mosquitto,
                                                bikes_clip: Path, converted_model) -> None:
    model = converted_model("ssd_mobilenet_v2_coco")
    config = write_config(tmp_path, deployment(tmp_path, mosquitto, bikes_clip, model))
    sub = Subscriber(mosquitto, "edged/scene/#")
    try:
        first = run_once(config, sub)
        counted = first[-1]["total"]
        assert sum(counted.values()) >= 1, first[-1]  # riders cross the middle of the frame
        events = sub.json("edged/scene/bikes/events")
        kinds = {e["type"] for e in events}
        assert {"new", "end", "enter", "leave"} <= kinds, kinds
        # Zone occupancy is stable: each track enters the zone at most twice in the clip.
        entries: dict[int, int] = {}
        for e in events:
            if e["type"] == "enter":
                entries[e["track"]] = entries.get(e["track"], 0) + 1
        assert max(entries.values()) <= 2, entries
        occupancy = sub.json("edged/scene/bikes/zones/left")
        assert occupancy[-1]["total"] == 0  # every track ended with the clip

        # A restart: the counts come back from the state directory, and the same clip adds
        # to them.
        second = run_once(config, sub)
        assert second[0]["total"] == counted, (second[0], counted)
        assert all(second[-1]["total"][d] >= counted[d] for d in counted)

        # A reset through a command, answered on the reply topic (the clip looped this time,
        # so that edged is still there to answer).
        looping = deployment(tmp_path, mosquitto, bikes_clip, model)
        looping["streams"][0]["source"]["loop"] = True
        results = len(sub.on("edged/scene/bikes/result"))
        restart = Daemon("run", "--config", str(write_config(tmp_path, looping, "loop.yaml")))
        try:  # the stream runs once its results come
            assert sub.wait(lambda: len(sub.on("edged/scene/bikes/result")) > results, 30)
            sub.client.publish("edged/scene/bikes/set", json.dumps({"reset_lines": ["midle"]}),
                               qos=1)
            assert sub.wait(lambda: sub.json("edged/scene/bikes/set/reply"), 10)
            assert "did you mean 'middle'" in sub.json("edged/scene/bikes/set/reply")[-1]["error"]
            sub.client.publish("edged/scene/bikes/set", json.dumps({"reset_lines": True}), qos=1)
            assert sub.wait(lambda: len(sub.json("edged/scene/bikes/set/reply")) >= 2, 10)
            assert sub.json("edged/scene/bikes/set/reply")[-1]["ok"] is True
            assert sub.wait(lambda: {"westward": 0, "eastward": 0} in [
                m["total"] for m in sub.json("edged/scene/bikes/lines/middle")], 10)
            restart.send(signal.SIGTERM)
            restart.wait(30)
        finally:
            restart.close()
    finally:
        sub.close()


def test_check_draws_what_was_configured(tmp_path: Path, bikes_clip: Path,
                                         converted_model) -> None:
    """``edged check --draw`` shows the zones, lines and masks on a frame of the source."""
    import subprocess
    import sys

    import cv2
    import numpy as np

    from edged.annotate import LINE_COLOUR, ZONE_COLOUR

    config = write_config(tmp_path, {"stdout": True, "streams": [{
        "name": "bikes", "task": "detect", "model": str(converted_model("ssd_mobilenet_v2_coco")),
        "source": str(bikes_clip), "zones": ZONES, "lines": LINES,
        "masks": [[[0.8, 0], [1, 0], [1, 0.3], [0.8, 0.3]]]}]})
    picture = tmp_path / "scene.png"
    done = subprocess.run([sys.executable, "-m", "edged", "check", "--config", str(config),
                           "--draw", str(picture)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    image = cv2.imread(str(picture))
    assert image.shape == (272, 640, 3)
    for colour in (ZONE_COLOUR, LINE_COLOUR):
        assert np.all(image == colour, axis=2).sum() > 100, colour
    assert f"drew bikes's zones, lines and masks on {picture}" in done.stdout
