"""Reload applies every setting: live to the running stream, by restarting the stream with
everything rebuilt that depends on it, or not at all with one line saying edged must restart.
One case per declared field; a field added without a case fails ``test_every_field_has_a_case``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
import pytest
import skimage.data
from helpers.daemon import write_config

from edged.config import Config, PublishConfig, SourceConfig, StreamConfig, load_config
from edged.server import Server
from edged.validation import reload_of

Running = Any  # the server's running stream (server.streams[name])
TABBY = "tabby, tabby cat"  # an ImageNet label


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, converted_model) -> dict[str, Path]:
    """Two folders of images and two model files (the same network at two paths)."""
    root = tmp_path_factory.mktemp("reload")
    for name, image in (("a", skimage.data.astronaut()), ("b", skimage.data.chelsea())):
        (root / name).mkdir()
        cv2.imwrite(str(root / name / "frame.png"), np.ascontiguousarray(image[..., ::-1]))
    model = converted_model("mobilenet_v2_imagenet")
    shutil.copy(model, root / "copy.onnx")
    return {"a": root / "a", "b": root / "b", "model": model, "model2": root / "copy.onnx",
            "detector": converted_model("ssd_mobilenet_v2_coco")}


def base(scene: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    return {
        "device": "rl", "stdout": True, "state_dir": str(tmp_path / "state"),
        "stats_interval": 5,
        "streams": [{"name": "cam", "task": "classify", "model": str(scene["model"]),
                     "fps": 5, "source": {"uri": str(scene["a"]), "loop": True}}],
    }


def threads_of(running: Running) -> int:
    return running.pipeline.model.session.get_session_options().intra_op_num_threads


def arena_of(running: Running) -> bool:
    return running.pipeline.model.session.get_session_options().enable_cpu_mem_arena


# field -> (change to the deployment data, what the running daemon shows after the reload).
Change = Callable[[dict[str, Any], dict[str, Path]], None]
Shows = Callable[[Server, dict[str, Path]], bool]


def stream_change(key: str, value: Any) -> Change:
    def change(data: dict[str, Any], scene: dict[str, Path]) -> None:
        data["streams"][0][key] = value(scene) if callable(value) else value
    return change


def nested_change(section: str, key: str, value: Any) -> Change:
    def change(data: dict[str, Any], scene: dict[str, Path]) -> None:
        stream = data["streams"][0]
        stream[section] = {**stream.get(section, {}), key: value}
    return change


def top_change(key: str, value: Any) -> Change:
    def change(data: dict[str, Any], scene: dict[str, Path]) -> None:
        data[key] = value(scene) if callable(value) else value
    return change


def cam(server: Server) -> Running:
    return server.streams["cam"]


def swap_task(data: dict[str, Any], scene: dict[str, Path]) -> None:
    data["streams"][0].update(task="detect", model=str(scene["detector"]))


def detect_with(key: str, value: Any) -> Change:
    """A detect-only setting: the stream becomes a detector with it."""
    def change(data: dict[str, Any], scene: dict[str, Path]) -> None:
        swap_task(data, scene)
        data["streams"][0][key] = value
    return change


def rename(data: dict[str, Any], scene: dict[str, Path]) -> None:
    data["streams"][0]["name"] = "gate"


STREAM_CASES: dict[str, tuple[Change, Shows]] = {
    "name": (rename, lambda s, _: set(s.streams) == {"gate"}),
    "task": (swap_task, lambda s, _: cam(s).pipeline.model.info.task == "detect"),
    "source": (stream_change("source", lambda sc: str(sc["b"])),
               lambda s, sc: cam(s).pipeline.reader.config.uri == str(sc["b"])),
    "model": (stream_change("model", lambda sc: str(sc["model2"])),
              lambda s, sc: cam(s).pipeline.model.info.path == sc["model2"]),
    "fps": (stream_change("fps", 2.5), lambda s, _: cam(s).pipeline.config.fps == 2.5),
    "threshold": (stream_change("threshold", 0.25),
                  lambda s, _: cam(s).pipeline.meta()["threshold"] == 0.25),
    "thresholds": (stream_change("thresholds", {TABBY: 0.9}),
                   lambda s, _: cam(s).pipeline._post.stream.thresholds == {TABBY: 0.9}),
    "labels": (stream_change("labels", [TABBY, "tiger cat"]),
               lambda s, _: int(cam(s).pipeline._post._allowed.sum()) == 2),
    "top_k": (stream_change("top_k", 2), lambda s, _: cam(s).pipeline._post.stream.top_k == 2),
    "region": (stream_change("region", {"x": 0.5, "width": 0.5}),
               lambda s, _: getattr(cam(s).pipeline.preprocess.region, "x", None) == 0.5),
    "publish": (nested_change("publish", "policy", "change"),
                lambda s, _: cam(s).pipeline._post.stream.publish.policy == "change"),
    "threads": (stream_change("threads", 1), lambda s, _: threads_of(cam(s)) == 1),
    "memory": (stream_change("memory", "lean"), lambda s, _: not arena_of(cam(s))),
    "track": (detect_with("track", {"max_age": 7}),
              lambda s, _: getattr(cam(s).pipeline.scene, "tracker", None) is not None
              and cam(s).pipeline.scene.tracker.max_age == 7),
    "zones": (detect_with("zones", {"z": {"polygon": [[0, 0], [1, 0], [1, 1]]}}),
              lambda s, _: "z" in getattr(cam(s).pipeline.scene, "zones", {})),
    "lines": (detect_with("lines", {"gate": {"points": [[0, 0.5], [1, 0.5]]}}),
              lambda s, _: "gate" in getattr(cam(s).pipeline.scene, "lines", {})),
    "masks": (detect_with("masks", [[[0, 0], [1, 0], [1, 1]]]),
              lambda s, _: len(cam(s).pipeline.filter.masks) == 1),
    "min_area": (detect_with("min_area", {"person": 0.01}),
                 lambda s, _: cam(s).pipeline.filter.min_area == {"person": 0.01}),
    "max_area": (detect_with("max_area", {"person": 0.5}),
                 lambda s, _: cam(s).pipeline.filter.max_area == {"person": 0.5}),
    "commands": (stream_change("commands", ["pause"]),
                 lambda s, _: not cam(s).pipeline.command({"fps": 1})["ok"]),
    "stall_timeout": (stream_change("stall_timeout", 7),
                      lambda s, _: not cam(s).pipeline.stalled(cam(s).pipeline._progress + 6)
                      and cam(s).pipeline.stalled(cam(s).pipeline._progress + 8)),
}

SOURCE_VALUES: dict[str, Any] = {
    "uri": None, "width": 640, "height": 480, "fps": 15, "fourcc": "MJPG", "open_timeout": 3,
    "read_timeout": 4, "realtime": False, "loop": False, "reconnect_max": 10}
SOURCE_CASES: dict[str, tuple[Change, Shows]] = {
    key: (nested_change("source", key, value),
          lambda s, _, key=key, value=value: getattr(cam(s).pipeline.reader.config, key) == value)
    for key, value in SOURCE_VALUES.items() if key != "uri"
}
SOURCE_CASES["uri"] = STREAM_CASES["source"]

PUBLISH_VALUES: dict[str, Any] = {
    "policy": "rate", "rate": 0.5, "snapshot": True, "snapshot_interval": 9,
    "class_map": "rle", "class_map_size": 64}
PUBLISH_CASES: dict[str, tuple[Change, Shows]] = {
    key: (nested_change("publish", key, value),
          lambda s, _, key=key, value=value: getattr(cam(s).pipeline._post.stream.publish, key)
          == value)
    for key, value in PUBLISH_VALUES.items()
}


def kept(key: str, value: Any) -> tuple[Change, Shows]:
    """A daemon setting: the reload keeps the running value (and logs an error line)."""
    return top_change(key, value), lambda s, _: getattr(s.config, key) == value


def add_stream(data: dict[str, Any], scene: dict[str, Path]) -> None:
    data["streams"].append({**data["streams"][0], "name": "gate"})


TOP_CASES: dict[str, tuple[Change, Shows]] = {
    "device": kept("device", "other"),
    "streams": (add_stream, lambda s, _: set(s.streams) == {"cam", "gate"}),
    "mqtt": (top_change("mqtt", {"host": "127.0.0.1"}),
             lambda s, _: getattr(s.config.mqtt, "host", None) == "127.0.0.1"),
    "http": (top_change("http", {"port": 18089}), lambda s, _: s.config.http is not None),
    # Without stdout a broker is needed: the reload finds both changed and keeps both.
    "stdout": (lambda data, _: data.update(stdout=False, mqtt={"host": "127.0.0.1"}),
               lambda s, _: s.config.stdout is False),
    "state_dir": kept("state_dir", "/tmp/elsewhere"),
    # Discovery needs a broker: the file gains one too (a broker takes a restart, discovery
    # settings do not).
    "home_assistant": (lambda data, _: data.update(home_assistant={"prefix": "ha"},
                                                   mqtt={"host": "127.0.0.1"}),
                       lambda s, _: getattr(s.config.home_assistant, "prefix", None) == "ha"),
    "model_dir": (top_change("model_dir", lambda sc: str(sc["a"])),
                  lambda s, sc: s.config.model_dir == str(sc["a"])),
    "stats_interval": (top_change("stats_interval", 3), lambda s, _: s.config.stats_interval == 3),
    "memory": (top_change("memory", "lean"), lambda s, _: not arena_of(cam(s))),
    "logging": (top_change("logging", {"level": "debug"}),
                lambda s, _: logging.getLogger().level == logging.DEBUG),
}

CASES = [(StreamConfig, name, case) for name, case in STREAM_CASES.items()] + \
    [(SourceConfig, name, case) for name, case in SOURCE_CASES.items()] + \
    [(PublishConfig, name, case) for name, case in PUBLISH_CASES.items()] + \
    [(Config, name, case) for name, case in TOP_CASES.items()]


def test_every_field_has_a_case() -> None:
    for cls, cases in ((StreamConfig, STREAM_CASES), (SourceConfig, SOURCE_CASES),
                       (PublishConfig, PUBLISH_CASES), (Config, TOP_CASES)):
        assert {f.name for f in msgspec.structs.fields(cls)} == set(cases), cls.__name__


@pytest.mark.parametrize(("cls", "name", "case"), CASES,
                         ids=[f"{cls.__name__}.{name}" for cls, name, _ in CASES])
def test_reload_applies_the_field(cls: type, name: str, case: tuple[Change, Shows],
                                  scene: dict[str, Path], tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    change, shows = case
    # The section's own field decides how a nested field's change applies.
    kind = reload_of(Config if cls is Config else StreamConfig,
                     {SourceConfig: "source", PublishConfig: "publish"}.get(cls, name))
    data = base(scene, tmp_path)
    path = write_config(tmp_path, data)
    server = Server(load_config(path), path)
    level = logging.getLogger().level
    try:
        server.start()
        before = cam(server)
        assert not shows(server, scene), "the case's new value is already in effect"
        change(data, scene)
        write_config(tmp_path, data)
        with caplog.at_level(logging.INFO):
            assert server.reload()
            shown = shows(server, scene)
        if kind == "daemon":
            assert not shown, f"{name}: changed by a reload"
            assert f"reload: {name} changed: it takes effect when edged restarts" in caplog.text
            return
        assert shown, f"{cls.__name__}.{name}: the new value took no effect"
        if "cam" in server.streams and cls is not Config:
            restarted = cam(server).pipeline is not before.pipeline
            assert restarted == (kind != "live"), f"{name}: {kind} but restarted={restarted}"
    finally:
        server.stop()
        logging.getLogger().setLevel(level)
