"""Configuration loading: every problem reported at once, each with its exact path."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from edged.cli import main
from edged.config import (
    ConfigError,
    SourceConfig,
    config_reference,
    config_schema,
    load_config,
    parse_config,
    resolve_config,
    single_stream_config,
    validate_config,
)
from edged.errors import EdgedError
from edged.validation import Problems

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
    ({"streams": [stream(source={"uri": "/dev/video0", "fourcc": "MJPEG"})], "stdout": True},
     "streams[0].source.fourcc: 'MJPEG' must be 4 characters, e.g. MJPG"),
    ({"streams": [stream(source="")], "stdout": True},
     "streams[0].source.uri: must be a string, got an empty string"),
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


def test_schema_file_is_what_edged_config_schema_prints(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == config_schema()
    assert json.loads((REPO / "config" / "edged.schema.json").read_text()) == printed, \
        "config/edged.schema.json is stale: edged config schema > config/edged.schema.json"


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_deployments_carry_and_match_the_schema(path: Path) -> None:
    text = path.read_text()
    assert "# yaml-language-server: $schema=edged.schema.json\n" in text
    jsonschema.validate(yaml.safe_load(text), config_schema())


@pytest.mark.parametrize(("data", "where"), [
    ({"streams": [stream(fps=0)]}, ["streams", 0, "fps"]),
    ({"streams": [stream(source={"uri": "/dev/video0", "fourcc": "MJPEG"})]},
     ["streams", 0, "source", "fourcc"]),
    ({"streams": [stream()], "mqtt": {"password": "x"}}, ["mqtt"]),
    ({"streams": [stream(name="a b")]}, ["streams", 0, "name"]),
    ({"streams": [stream()], "stdot": True}, []),
])
def test_schema_refuses_what_the_loader_refuses(data: dict, where: list) -> None:
    """Editors flag the same mistakes ``edged run`` does (a sample of them)."""
    assert problems({"stdout": True, **data})
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate({"stdout": True, **data}, config_schema())
    assert list(info.value.absolute_path)[:len(where)] == where


def test_reference_tables_in_the_docs_are_generated() -> None:
    docs = (REPO / "docs" / "config.md").read_text()
    assert config_reference() in docs, "docs/config.md: paste the output of `edged config docs`"


def test_config_file_that_is_not_a_regular_file_or_too_large(tmp_path: Path) -> None:
    with pytest.raises(EdgedError, match=r"^/dev/zero: not a regular file$"):
        load_config("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(EdgedError, match=r"big.yaml: 1048579 bytes: a configuration is at most"):
        load_config(big)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(
    " " * i + "a:\n" for i in range(1, 2000))])
def test_absurdly_nested_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(EdgedError) as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


@pytest.mark.parametrize(("flag", "host", "port"), [
    ("[::1]:1884", "::1", 1884), ("::1", "::1", 1883), ("[fe80::1]", "fe80::1", 1883),
    ("broker.local:1885", "broker.local", 1885), ("10.0.0.2", "10.0.0.2", 1883)])
def test_mqtt_flag_takes_ipv6_hosts(flag: str, host: str, port: int) -> None:
    config = single_stream_config("classify", "/dev/video0", mqtt=flag)
    assert (config.mqtt.host, config.mqtt.port) == (host, port)


def test_validation_has_no_side_effects(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Declared vs resolved: validating reads no environment and no file; resolving does."""
    monkeypatch.setenv("EDGED_TEST_PW", "hunter2")
    data = {"streams": [stream(source="clips/a.mp4")], "mqtt": {
        "username": "u", "password_env": "EDGED_TEST_PW"}}
    found = Problems()
    declared = validate_config(data, found)
    assert not found
    assert declared.mqtt.password is None and declared.streams[0].source.uri == "clips/a.mp4"
    resolved = resolve_config(declared, tmp_path, found)
    assert resolved.mqtt.password == "hunter2" and declared.mqtt.password is None
    assert found == [f"streams[0].source.uri: no such file or folder: {tmp_path}/clips/a.mp4"]
