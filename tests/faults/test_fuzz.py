"""Property-based fuzzing of what users and the network hand edged: configuration documents,
YAML text and MQTT commands. Whatever comes in: no traceback, no hang, only one-line problems,
and nothing accepted that the daemon cannot run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.config import (
    TASKS,
    Config,
    ConfigError,
    MqttConfig,
    PublishConfig,
    SourceConfig,
    StreamConfig,
    load_config,
    parse_config,
)
from edged.errors import EdgedError
from edged.model import Model, load_model
from edged.pipeline import Pipeline

FIELDS = sorted({f.name for cls in (Config, StreamConfig, SourceConfig, PublishConfig,
                                    MqttConfig) for f in msgspec.structs.fields(cls)})
SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["/dev/video0", "rtsp://cam/x", "ftp://x", "every", "png", "lean",
                              "all", "off", "detect", "0", ""]))
KEYS = st.sampled_from([*FIELDS, "password", "x"]) | st.text(max_size=6)
VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(KEYS, children, max_size=4), max_leaves=16)
STREAMS = st.fixed_dictionaries(
    {"name": st.sampled_from(["cam", "gate", "a b"]), "task": st.sampled_from(TASKS),
     "source": st.just("/dev/video0") | VALUES},
    optional={name: VALUES for name in ("fps", "threshold", "thresholds", "labels", "top_k",
                                         "region", "publish", "threads", "memory", "commands",
                                         "stall_timeout", "model")})
DOCUMENTS = st.fixed_dictionaries(
    {"stdout": st.booleans(), "streams": st.lists(STREAMS | VALUES, max_size=2)},
    optional={name: VALUES for name in ("device", "mqtt", "state_dir", "stats_interval",
                                        "memory", "logging", "typo")})


def runnable_numbers(data: Any) -> bool:
    """Every number in an accepted configuration is finite and of a size a wait, a join or a
    division can take."""
    if isinstance(data, dict):
        return all(runnable_numbers(v) for v in data.values())
    if isinstance(data, list):
        return all(runnable_numbers(v) for v in data)
    if isinstance(data, float):
        return math.isfinite(data) and abs(data) <= 1e7
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS | VALUES)
def test_any_document_is_a_config_or_one_line_problems(document: Any) -> None:
    try:
        config = parse_config(document, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all("\n" not in p for p in exc.problems)
        assert all(line.startswith("fuzz.yaml: ") for line in str(exc).splitlines())
        return
    data = msgspec.to_builtins(config)
    assert runnable_numbers(data), data
    fps = [s.fps for s in config.streams if s.fps]
    assert all(1.0 / f < 1e4 for f in fps)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300) | st.sampled_from(
    ["[" * 3000, "{a: " * 2000, "a: &x [*x]", "!!python/object:os.system {}", "\x00", "- - -",
     "streams: [{name: cam, task: detect, source: /dev/video0, fps: .inf}]\nstdout: true"]))
def test_any_yaml_text_is_a_config_or_one_line(tmp_path_factory: pytest.TempPathFactory,
                                               text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "edged.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text \
        else path.write_bytes(text.encode("utf-8", "replace"))
    try:
        load_config(path)
    except EdgedError as exc:
        lines = str(exc).splitlines()
        assert lines and all(line.startswith(str(path)) for line in lines)


@pytest.fixture(scope="module")
def classifier(converted_model) -> Model:
    return load_model(converted_model("mobilenet_v2_imagenet"))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(st.sampled_from(["pause", "resume", "threshold",
                                                       "thresholds", "fps", "x"])
                                      | st.text(max_size=5), children, max_size=4),
                    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(message=JSON)
def test_any_command_gets_a_reply_and_leaves_a_runnable_stream(classifier: Model,
                                                                message: Any) -> None:
    config = parse_config({"stdout": True, "streams": [
        {"name": "s", "task": "classify", "source": "/dev/video0", "fps": 2}]}).streams[0]
    pipeline = Pipeline(config, classifier, [], "fuzz")
    reply = pipeline.command(message)
    assert isinstance(reply["ok"], bool)
    json.dumps(reply, allow_nan=False)  # the reply is valid JSON
    if not reply["ok"]:
        assert "\n" not in reply["error"]
    assert runnable_numbers(msgspec.to_builtins(pipeline.config))


def test_fuzzing_strategies_reach_acceptance(tmp_path: Path) -> None:
    """The document strategy can produce valid configurations, so the acceptance half of the
    property above is exercised (a strategy that only made garbage would prove nothing)."""
    config = parse_config({"stdout": True, "streams": [
        {"name": "cam", "task": "detect", "source": "/dev/video0", "fps": 2.5}]})
    assert config.streams[0].fps == 2.5
