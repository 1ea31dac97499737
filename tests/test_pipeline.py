"""One stream's pipeline with real models and real images: results, publish policies, snapshots,
live commands."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.config import ConfigError, parse_config
from edged.errors import EdgedError
from edged.frame import Frame
from edged.model import Model, load_model
from edged.pipeline import Pipeline, changed, command_all, parse_command
from edged.sinks import encode_payload

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


class CollectingSink:
    """A real ``Sink`` that keeps what it is given, in order (what a subscriber would see)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any, bool]] = []
        self._lock = threading.Lock()

    def publish(self, topic_suffix: str, payload: bytes | dict, retain: bool = False) -> None:
        encode_payload(payload)  # the payload must be sendable as it is
        with self._lock:
            self.messages.append((topic_suffix, payload, retain))

    def close(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, Any]:
        return {"messages": len(self.messages)}

    def on(self, suffix: str) -> list[Any]:
        with self._lock:
            return [payload for topic, payload, _ in self.messages if topic == suffix]


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos from scikit-image as PNG files."""
    directory = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("chelsea", "coffee", "astronaut"):
        paths[name] = directory / f"{name}.png"
        cv2.imwrite(str(paths[name]), bgr(getattr(skimage.data, name)()))
    return paths


@pytest.fixture(scope="module")
def classifier(converted_model) -> Model:
    return load_model(converted_model("mobilenet_v2_imagenet"))


@pytest.fixture(scope="module")
def detector(converted_model) -> Model:
    return load_model(converted_model("ssd_mobilenet_v2_coco"))


def stream_config(uri: str, task: str, **stream: Any):
    return parse_config({"device": "test", "stdout": True, "streams": [
        {"name": "s", "task": task, "source": {"uri": uri, "realtime": False}, **stream}]}
    ).streams[0]


def run_to_end(pipeline: Pipeline, timeout: float = 60.0) -> None:
    pipeline.start()
    deadline = time.monotonic() + timeout
    while not pipeline.finished:
        assert time.monotonic() < deadline, "the pipeline did not finish"
        time.sleep(0.02)
    pipeline.stop()


def frame_of(rgb: np.ndarray, index: int = 0) -> Frame:
    return Frame(bgr(rgb), index, time.time(), time.monotonic())


def test_classify_a_still_image(photos: dict[str, Path], classifier: Model) -> None:
    sink = CollectingSink()
    pipeline = Pipeline(stream_config(str(photos["chelsea"]), "classify", top_k=3), classifier,
                        [sink], "test")
    run_to_end(pipeline)
    (result,) = sink.on("s/result")
    assert result["classes"][0]["label"] in CAT_CLASSES
    assert (result["seq"], result["stream"], result["device"], result["task"]) == (
        1, "s", "test", "classify")
    assert len(result["classes"]) == 3
    assert set(result["latency_ms"]) >= {"preprocess", "inference", "postprocess", "total"}
    meta = sink.on("s/meta")[0]
    assert meta["task"] == "classify" and meta["input"] == {"width": 224, "height": 224}
    states = [status["state"] for status in sink.on("s/status")]
    assert states[:2] == ["opening", "streaming"] and "ended" in states
    assert all(retain for topic, _, retain in sink.messages if topic in ("s/status", "s/meta"))


def test_segmentation_fractions(photos: dict[str, Path], converted_model) -> None:
    model = load_model(converted_model("deeplabv3_mnv2_voc"))
    sink = CollectingSink()
    config = stream_config(str(photos["chelsea"]), "segment",
                           publish={"class_map": "rle", "class_map_size": 32})
    run_to_end(Pipeline(config, model, [sink], "test"))
    (result,) = sink.on("s/result")
    fractions = {c["label"]: c["fraction"] for c in result["segmentation"]["classes"]}
    assert fractions["cat"] > 0.8, fractions
    assert sum(fractions.values()) <= 1.0001
    class_map = result["segmentation"]["class_map"]
    assert class_map["format"] == "rle" and max(class_map["width"], class_map["height"]) == 32


def test_detect_with_snapshot(photos: dict[str, Path], detector: Model) -> None:
    sink = CollectingSink()
    config = stream_config(str(photos["astronaut"]), "detect",
                           publish={"snapshot": True, "snapshot_interval": 0})
    run_to_end(Pipeline(config, detector, [sink], "test"))
    (result,) = sink.on("s/result")
    assert "person" in {d["label"] for d in result["detections"]}
    (snapshot,) = sink.on("s/snapshot")
    image = cv2.imdecode(np.frombuffer(snapshot, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (512, 512, 3)


def test_snapshots_are_rate_limited(photos: dict[str, Path], detector: Model) -> None:
    sink = CollectingSink()
    config = stream_config(str(photos["astronaut"]), "detect",
                           publish={"snapshot": True, "snapshot_interval": 3600})
    pipeline = Pipeline(config, detector, [sink], "test")
    astronaut = skimage.data.astronaut()
    for i in range(4):
        pipeline.process(frame_of(astronaut, i))
    assert len(sink.on("s/result")) == 4 and len(sink.on("s/snapshot")) == 1


def image_folder(directory: Path, photos: dict[str, Path], names: list[str]) -> Path:
    directory.mkdir()
    for i, name in enumerate(names):
        (directory / f"{i:03d}.png").write_bytes(photos[name].read_bytes())
    return directory


def test_policy_change_publishes_top1_changes_with_contiguous_seq(
        tmp_path: Path, photos: dict[str, Path], classifier: Model) -> None:
    folder = image_folder(tmp_path / "f", photos,
                          ["chelsea", "chelsea", "coffee", "coffee", "coffee", "chelsea"])
    sink = CollectingSink()
    pipeline = Pipeline(stream_config(str(folder), "classify", publish={"policy": "change"}),
                        classifier, [sink], "test")
    run_to_end(pipeline)
    results = sink.on("s/result")
    assert [r["frame"]["index"] for r in results] == [0, 2, 5]
    assert [r["seq"] for r in results] == [1, 2, 3]
    assert (pipeline.processed, pipeline.skipped) == (6, 3)


def test_policy_rate_limits_results(tmp_path: Path, photos: dict[str, Path],
                                    classifier: Model) -> None:
    folder = image_folder(tmp_path / "f", photos, ["chelsea", "coffee"] * 3)
    sink = CollectingSink()
    config = stream_config(str(folder), "classify", publish={"policy": "rate", "rate": 0.01})
    run_to_end(Pipeline(config, classifier, [sink], "test"))
    assert len(sink.on("s/result")) == 1


def test_fps_limit(tmp_path: Path, photos: dict[str, Path], classifier: Model) -> None:
    folder = image_folder(tmp_path / "f", photos, ["coffee"] * 6)
    sink = CollectingSink()
    pipeline = Pipeline(stream_config(str(folder), "classify", fps=10), classifier, [sink], "t")
    started = time.monotonic()
    run_to_end(pipeline)
    assert len(sink.on("s/result")) == 6
    assert time.monotonic() - started >= 0.5  # 6 frames at most 10 per second


@pytest.mark.parametrize(("old", "new", "expected"), [
    (Counter(person=1), Counter(person=1), False),
    (Counter(person=1), Counter(person=2), True),  # a count change is a change
    (Counter(person=1), Counter(person=1, bicycle=1), True),
    ({"cat": 0.500, "background": 0.500}, {"cat": 0.509, "background": 0.491}, False),
    ({"cat": 0.500, "background": 0.500}, {"cat": 0.520, "background": 0.480}, True),
    ({"cat": 0.995}, {"cat": 0.995, "dog": 0.02}, True),
    ("tabby, tabby cat", "tiger cat", True),
])
def test_change_detection(old: Any, new: Any, expected: bool) -> None:
    assert changed(old, new) is expected


def test_commands_apply_live(detector: Model) -> None:
    sink = CollectingSink()
    pipeline = Pipeline(stream_config("/dev/video0", "detect"), detector, [sink], "test")
    astronaut = skimage.data.astronaut()
    pipeline.process(frame_of(astronaut))
    assert sink.on("s/result")[-1]["detections"]

    reply = pipeline.command({"thresholds": {"person": 0.999}, "fps": 4})
    assert reply == {"ok": True, "stream": "s",
                     "applied": {"thresholds": {"person": 0.999}, "fps": 4.0}}
    assert pipeline.config.fps == 4.0
    pipeline.process(frame_of(astronaut, 1))
    assert "person" not in {d["label"] for d in sink.on("s/result")[-1]["detections"]}
    assert sink.on("s/meta")[-1]["thresholds"] == {"person": 0.999}

    assert pipeline.command({"threshold": 0.99, "thresholds": {"person": 0.5}})["ok"]
    pipeline.process(frame_of(astronaut, 2))
    assert {d["label"] for d in sink.on("s/result")[-1]["detections"]} == {"person"}

    assert pipeline.command({"pause": True})["ok"] and pipeline.paused
    assert sink.on("s/status")[-1]["paused"] is True
    assert pipeline.command({"resume": True})["ok"] and not pipeline.paused


@pytest.mark.parametrize(("message", "error"), [
    ({"treshold": 0.4}, "treshold: unknown command (did you mean 'threshold'?)"),
    ({"threshold": 1.5}, "threshold: must be 0..1"),
    ({"threshold": "high"}, "threshold: must be a number, got text 'high'"),
    ({"fps": -2}, "fps: must be 0.001..1000"),
    ({"fps": 0}, "fps: must be 0.001..1000"),
    ({"fps": 1e-300}, "fps: must be 0.001..1000"),
    ({"pause": "yes"}, "pause: must be true or false, got text 'yes'"),
    ({"fps": math.nan}, "fps: must be 0.001..1000"),
    ({"fps": math.inf}, "fps: must be 0.001..1000"),
    ({"pause": True, "resume": True}, "pause and resume: give one of them, not both"),
    ({"thresholds": {"persn": 0.5}}, "stream.thresholds: 'persn' is not a label"),
    ({"thresholds": [0.5]}, "thresholds: must be a mapping, got a list"),
    ({"thresholds": {"person": 2}}, "thresholds.person: must be 0..1"),
    ([1, 2], "command must be a non-empty JSON object"),
    ({}, "command must be a non-empty JSON object"),
])
def test_bad_commands_are_refused_and_change_nothing(detector: Model, message: Any,
                                                     error: str) -> None:
    pipeline = Pipeline(stream_config("/dev/video0", "detect", fps=2), detector, [], "test")
    before = json.dumps(pipeline.meta())
    reply = pipeline.command({**message, "threshold": 0.1} if message == {"fps": -2} else message)
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert "\n" not in reply["error"]
    assert json.dumps(pipeline.meta()) == before


def test_device_wide_command_applies_to_all_streams_or_none(classifier: Model,
                                                           detector: Model) -> None:
    """``person`` is a COCO label but not an ImageNet class: the classify stream refuses the
    command, so the detect stream must not take it either."""
    pipelines = {"det": Pipeline(stream_config("/dev/video0", "detect"), detector, [], "test"),
                 "cls": Pipeline(stream_config("/dev/video0", "classify"), classifier, [],
                                 "test")}
    reply = command_all(pipelines, {"thresholds": {"person": 0.9}})
    assert reply["ok"] is False
    assert reply["error"].startswith("cls: stream.thresholds: 'person' is not a label"), reply
    assert pipelines["det"].config.thresholds == {}
    reply = command_all(pipelines, {"threshold": 0.7})
    assert reply["ok"] is True and set(reply["streams"]) == {"det", "cls"}
    assert [p.config.threshold for p in pipelines.values()] == [0.7, 0.7]


def test_parse_command_values() -> None:
    assert parse_command({"fps": None}) == {"fps": None}  # null: no limit
    assert parse_command({"pause": False, "threshold": 1}) == {"pause": False, "threshold": 1.0}
    with pytest.raises(EdgedError):
        parse_command({"threshold": True})


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["threshold", "fps", "thresholds"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10, 2000),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                       st.dictionaries(st.sampled_from(["person", "car"]),
                                       st.floats(-1, 2), max_size=2)))
def test_commands_accept_exactly_what_the_file_accepts(key: str, value: Any) -> None:
    """A command is checked by the setting's own declaration: never a value the YAML refuses,
    never a refusal of a value the YAML takes."""
    try:
        from_file = parse_config({"stdout": True, "streams": [
            {"name": "s", "task": "detect", "source": "/dev/video0", key: value}]})
    except ConfigError:
        from_file = None
    try:
        command = parse_command({key: value})
    except EdgedError:
        command = None
    assert (from_file is None) == (command is None), (from_file, command)
    if command is not None:
        assert command[key] == getattr(from_file.streams[0], key)


def test_commands_setting_says_who_may_do_what(detector: Model, classifier: Model) -> None:
    only_pause = Pipeline(stream_config("/dev/video0", "detect", commands=["pause", "resume"]),
                          detector, [], "test")
    assert only_pause.command({"pause": True})["ok"] and only_pause.paused
    reply = only_pause.command({"fps": 2, "resume": True})
    assert reply == {"ok": False, "stream": "s",
                     "error": "fps: not allowed on this stream (commands: pause, resume)"}
    assert only_pause.paused and only_pause.config.fps is None  # nothing of it applied

    off = Pipeline(stream_config("/dev/video0", "classify", commands="off"), classifier, [],
                   "test")
    assert off.command({"pause": True})["error"] == \
        "pause: not allowed on this stream (commands: off)"
    # Device-wide: one stream refusing leaves every stream unchanged.
    reply = command_all({"det": only_pause, "cls": off}, {"pause": False})
    assert reply["ok"] is False and reply["error"].startswith("cls: pause: not allowed")
    assert only_pause.paused

    # A reload takes the new setting live.
    only_pause.reconfigure(stream_config("/dev/video0", "detect"))
    assert only_pause.command({"fps": 2})["ok"] and only_pause.config.fps == 2
