"""Configuration loading: every problem reported at once, each with its exact path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config import (
    ConfigError,
    SourceConfig,
    load_config,
    parse_config,
    single_stream_config,
)
from edged.errors import EdgedError

REPO = Path(__file__).resolve().parent.parent


def stream(**overrides):
    return {"name": "cam", "task": "detect", "source": "/dev/video0", **overrides}


def problems(data, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_deployments_load(path: Path, monkeypatch: pytest.MonkeyPatch,
                                  bikes_clip: Path) -> None:
    monkeypatch.setenv("EDGED_MQTT_PASSWORD", "example")
    config = load_config(path)
    assert config.streams and all(s.name for s in config.streams)
    if path.name == "segment-file.yaml":  # relative to the file: the shared sample clip
        assert Path(config.streams[0].source.uri).resolve() == bikes_clip.resolve()


def test_minimal_config_and_defaults() -> None:
    config = parse_config({"device": "pi", "streams": [stream()], "stdout": True})
    cam = config.streams[0]
    assert cam.source == SourceConfig(uri="/dev/video0")  # the short form of a source
    assert (cam.threshold, cam.publish.policy, cam.model, config.mqtt) == (0.5, "every", None,
                                                                          None)
    assert config.stream("cam") is cam


def test_device_defaults_to_a_topic_safe_host_name() -> None:
    config = parse_config({"streams": [stream()], "stdout": True})
    assert config.device and "/" not in config.device and " " not in config.device


def test_every_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    found = problems({
        "device": "pi",
        "streams": [
            stream(),
            stream(name="cam", source={"uri": str(tmp_path / "missing.mp4"), "fsp": 3}),
            stream(name="bad name", task="detekt", threshold=1.5, top_k=True),
        ],
        "mqtt": {"host": "broker", "port": 70000, "qos": 3},
        "stdot": True,
    })
    # Validation's problems first, then those of files and secrets (the resolve step).
    assert found == [
        "streams[1].source.fsp: unknown key (did you mean 'fps'?)",
        "streams[2].name: 'bad name' is not topic-safe (use letters, digits, '_', '-', '.')",
        "streams[2].task: must be one of classify, detect, segment (did you mean 'detect'?)",
        "streams[2].threshold: must be 0..1",
        "streams[2].top_k: must be an integer, got true",
        "mqtt.port: must be 1..65535",
        "mqtt.qos: must be 0..2",
        "stdot: unknown key (did you mean 'stdout'?)",
        "streams[1].name: 'cam' is already used by streams[0]",
        f"streams[1].source.uri: no such file or folder: {tmp_path / 'missing.mp4'}",
    ]


def test_error_message_is_one_line_per_problem_with_the_origin() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"streams": [stream(fps=0)], "mqtt": {"port": 0}}, "site.yaml")
    assert str(info.value).splitlines() == ["site.yaml: streams[0].fps: must be 0.001..1000",
                                            "site.yaml: mqtt.port: must be 1..65535"]
    assert isinstance(info.value, EdgedError)


@pytest.mark.parametrize(("data", "expected"), [
    ({"streams": []}, "streams: at least one stream is needed"),
    ({"streams": [stream()]}, "mqtt: no broker and stdout is false"),
    ({"streams": [{"source": "/dev/video0"}], "stdout": True}, "streams[0].name: required"),
    ({"streams": [stream(source=5)], "stdout": True},
     "streams[0].source: must be a uri or a mapping, got 5"),
    ({"streams": "cam", "stdout": True}, "streams: must be a list, got text 'cam'"),
    ({"streams": [stream(source="ftp://cam/x")], "stdout": True},
     "streams[0].source.uri: unknown URI scheme 'ftp'"),
    ({"streams": [stream(model="models/none.onnx")], "stdout": True},
     "streams[0].model: no such model file"),
    ({"streams": [stream(thresholds={"person": 2})], "stdout": True},
     "streams[0].thresholds.person: must be 0..1"),
    ({"streams": [stream(region={"x": 0.5, "width": 0.8})], "stdout": True},
     "streams[0].region: must lie inside the frame"),
    ({"streams": [stream(publish={"policy": "sometimes"})], "stdout": True},
     "streams[0].publish.policy: must be one of every, change, rate"),
    ({"streams": [stream()], "mqtt": {"topic_prefix": "a/+/b"}},
     "mqtt.topic_prefix: 'a/+/b' is not a valid topic prefix"),
    ({"streams": [stream()], "mqtt": {"password": "hunter2", "username": "u"}},
     "mqtt.password: not allowed in the file; use password_env or password_file"),
    ({"streams": [stream()], "mqtt": {"password_env": "EDGED_TEST_UNSET_VARIABLE"}},
     "mqtt.password_env: environment variable EDGED_TEST_UNSET_VARIABLE is not set"),
    ({"streams": [stream()], "mqtt": {"tls": {"ca_file": "/nonexistent/ca.pem"}}},
     "mqtt.tls.ca_file: no such file: /nonexistent/ca.pem"),
    ({"streams": [stream()], "mqtt": {"tls": {"cert_file": "/etc/hostname"}}},
     "mqtt.tls: cert_file and key_file go together"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_single_problems(data: dict, expected: str) -> None:
    found = problems(data, base_dir=REPO)
    assert any(p.startswith(expected) for p in found), found


def test_password_from_environment_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_TEST_PW", "hunter2")
    config = parse_config({"streams": [stream()],
                           "mqtt": {"username": "edged", "password_env": "EDGED_TEST_PW"}})
    assert config.mqtt.password == "hunter2"
    assert "hunter2" not in repr(config)
    assert config.redacted()["mqtt"]["password"] == "***"
    assert "hunter2" not in str(config.redacted())


def test_password_from_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "edged.yaml").write_text(
        "streams: [{name: cam, task: detect, source: /dev/video0}]\n"
        "mqtt: {username: edged, password_file: pw}\n")
    config = load_config(tmp_path / "edged.yaml")
    assert config.mqtt.password == "s3cret"
    (tmp_path / "pw").unlink()
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read .*pw"):
        load_config(tmp_path / "edged.yaml")


def test_relative_source_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"")
    path = tmp_path / "edged.yaml"
    path.write_text("stdout: true\nstreams:\n  - {name: a, task: detect, source: clips/a.mp4}\n")
    assert load_config(path).streams[0].source.uri == str(tmp_path / "clips" / "a.mp4")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("device: pi\nstreams:\n  - name: cam\n    task: [detect\n")
    with pytest.raises(EdgedError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:1: YAML syntax error:"), message
    assert "\n" not in message


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    """YAML would keep the second ``streams`` silently, dropping the first one's streams."""
    path = tmp_path / "twice.yaml"
    path.write_text("stdout: true\nstreams:\n  - {name: cam, task: detect, source: /dev/video0}"
                    "\nstreams: []\n")
    with pytest.raises(EdgedError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:4:1: YAML syntax error: duplicate key 'streams'"
    path.write_text("stdout: true\nstreams:\n  - {name: cam, task: detect, name: gate, "
                    "source: /dev/video0}\n")
    with pytest.raises(EdgedError, match=r":3:31: YAML syntax error: duplicate key 'name'$"):
        load_config(path)


def test_missing_file_and_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(EdgedError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"<top>: must be a mapping, got a list"):
        load_config(tmp_path / "list.yaml")


def test_command_line_problems_name_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        single_stream_config("detect", str(tmp_path / "none.mp4"), mqtt="broker:abc",
                             threshold=2.0, fps=-1)
    assert info.value.problems == [
        "--mqtt: port 'abc' is not a number (HOST[:PORT])",
        "--fps: must be 0.001..1000",
        "--threshold: must be 0..1",
        f"--source: no such file or folder: {tmp_path / 'none.mp4'}",
    ]


def test_command_line_defaults() -> None:
    config = single_stream_config("classify", "/dev/video0")
    assert config.stdout and config.mqtt is None  # no broker: results on stdout
    config = single_stream_config("classify", "/dev/video0", mqtt="10.0.0.2:1884")
    assert (config.mqtt.host, config.mqtt.port, config.stdout) == ("10.0.0.2", 1884, False)
