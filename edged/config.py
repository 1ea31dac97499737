"""What a deployment is configured to do: the typed model of the YAML file.

These dataclasses are the one description of configuration that every part of the daemon reads.
``load_config`` / ``parse_config`` (below) build them from YAML and report every problem with its
exact path (``streams[1].source: ...``); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edged.errors import EdgedError

Task = Literal["classify", "detect", "segment"]
PublishPolicy = Literal["every", "change", "rate"]
# ONNX Runtime memory: "auto" runs planned models (edged plan --budget) lean, "lean" every
# model, "default" none (docs/memory.md).
MemoryMode = Literal["auto", "lean", "default"]
TASKS: tuple[str, ...] = typing.get_args(Task)


@dataclass
class SourceConfig:
    """Where frames come from: a V4L2 device, an RTSP / HTTP(S) MJPEG URL, a video file,
    a still image or a folder of images."""

    uri: str
    width: int | None = None  # V4L2: requested capture size
    height: int | None = None
    fps: float | None = None  # V4L2: requested frame rate
    fourcc: str | None = None  # V4L2: pixel format, e.g. "MJPG" or "YUYV"
    open_timeout: float = 5.0  # seconds, network sources
    read_timeout: float = 5.0  # seconds, network sources
    realtime: bool = True  # files: pace at the file's frame rate (False: as fast as possible)
    loop: bool = False  # files / folders: start again at the end
    reconnect_max: float = 30.0  # cap of the reopen backoff, seconds


@dataclass
class RegionConfig:
    """Region of interest in normalized coordinates (0..1) of the source frame."""

    x: float = 0.0
    y: float = 0.0
    width: float = 1.0
    height: float = 1.0


@dataclass
class PublishConfig:
    """When results are published: every frame, only when they change, or at most ``rate``/s."""

    policy: PublishPolicy = "every"
    rate: float = 1.0  # results per second, for policy "rate"
    snapshot: bool = False  # detect: also publish an annotated JPEG
    snapshot_interval: float = 5.0  # detect: at least this many seconds between snapshots
    class_map: Literal["none", "png", "rle"] = "none"  # segment: include the class map
    class_map_size: int = 128  # segment: longest side of the published class map


@dataclass
class StreamConfig:
    """One camera stream and what to run on it."""

    name: str
    source: SourceConfig
    task: Task
    model: str | None = None  # ONNX file path or catalog name; None: the task's default
    fps: float | None = None  # process at most this many frames per second
    threshold: float = 0.5  # default minimum score
    thresholds: dict[str, float] = field(default_factory=dict)  # per-label minimum score
    labels: list[str] | None = None  # allow-list; None: all labels
    top_k: int = 5  # classify: how many classes to report
    region: RegionConfig | None = None
    publish: PublishConfig = field(default_factory=PublishConfig)
    threads: int | None = None  # ONNX Runtime intra-op threads; None: number of cores
    memory: MemoryMode | None = None  # None: the global memory setting
    # Seconds without a frame while the source claims to stream (a hung driver, a server that
    # keeps the connection open and sends nothing) before the stream counts as stalled and the
    # systemd watchdog pings stop. Longer than source.read_timeout, after which the reader
    # reconnects by itself.
    stall_timeout: float = 20.0


@dataclass
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip host name verification (self-signed test brokers)


@dataclass
class MqttConfig:
    """The broker connection and the topic contract's prefix."""

    host: str = "localhost"
    port: int = 1883
    client_id: str | None = None
    username: str | None = None
    # Resolved from password_env / password_file; never logged, never read from the YAML itself.
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    password_file: str | None = None
    tls: TLSConfig | None = None
    topic_prefix: str = "edged"
    qos: int = 1
    keepalive: int = 30
    outbox_dir: str | None = None  # None: <state dir>/outbox
    outbox_max: int = 10000  # messages kept on disk while the broker is away


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class Config:
    """A whole deployment."""

    device: str  # YAML default: the host name
    streams: list[StreamConfig]
    mqtt: MqttConfig | None = None  # None: no broker, results only on stdout if enabled
    stdout: bool = False  # JSON-lines sink on standard output
    state_dir: str = field(default_factory=lambda: default_state_dir())
    model_dir: str | None = None  # where catalog models are cached; None: default cache
    stats_interval: float = 10.0  # seconds between stats messages
    memory: MemoryMode = "auto"  # ONNX Runtime memory for every stream without its own
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def redacted(self) -> dict[str, Any]:
        """The configuration as plain data with secrets masked: safe to log or print."""
        data = dataclasses.asdict(self)
        if data["mqtt"] and data["mqtt"]["password"] is not None:
            data["mqtt"]["password"] = "***"
        return data

    def stream(self, name: str) -> StreamConfig:
        """The stream called ``name`` (``KeyError`` if none)."""
        for stream in self.streams:
            if stream.name == name:
                return stream
        raise KeyError(name)


def default_state_dir() -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/edged when writable, else
    ~/.local/state/edged (a user running ``edged run`` by hand)."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    system = Path("/var/lib/edged")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return str(system)
    return str(Path.home() / ".local" / "state" / "edged")


class ConfigError(EdgedError):
    """Every problem found in one configuration, one ``origin: path: problem`` line each."""

    def __init__(self, origin: str, problems: list[str]):
        self.origin = origin
        self.problems = problems
        super().__init__("\n".join(f"{origin}: {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Field constraints beyond the type: (dataclass, field) -> check returning a problem or None.

Check = Callable[[Any], "str | None"]


def _between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be {low}..{high}"

    return check


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


# MQTT topic levels must not hold wildcards or separators; keep names to a portable alphabet.
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _topic_safe(value: Any) -> str | None:
    if _TOPIC_SAFE.match(value):
        return None
    return f"{value!r} is not topic-safe (use letters, digits, '_', '-', '.')"


def _topic_prefix(value: Any) -> str | None:
    if value and all(_TOPIC_SAFE.match(level) for level in value.split("/")):
        return None
    return f"{value!r} is not a valid topic prefix (levels of letters, digits, '_', '-', '.')"


def _fourcc(value: Any) -> str | None:
    return None if len(value) == 4 else "must be 4 characters, e.g. MJPG"


CHECKS: dict[tuple[type, str], Check] = {
    (SourceConfig, "width"): _positive,
    (SourceConfig, "height"): _positive,
    (SourceConfig, "fps"): _positive,
    (SourceConfig, "fourcc"): _fourcc,
    (SourceConfig, "open_timeout"): _positive,
    (SourceConfig, "read_timeout"): _positive,
    (SourceConfig, "reconnect_max"): _positive,
    (RegionConfig, "x"): _between(0, 1),
    (RegionConfig, "y"): _between(0, 1),
    (RegionConfig, "width"): _between(0.01, 1),
    (RegionConfig, "height"): _between(0.01, 1),
    (PublishConfig, "rate"): _positive,
    (PublishConfig, "snapshot_interval"): _not_negative,
    (PublishConfig, "class_map_size"): _between(8, 4096),
    (StreamConfig, "name"): _topic_safe,
    (StreamConfig, "fps"): _positive,
    (StreamConfig, "threshold"): _between(0, 1),
    (StreamConfig, "top_k"): _between(1, 100),
    (StreamConfig, "threads"): _between(1, 256),
    (StreamConfig, "stall_timeout"): _positive,
    (MqttConfig, "port"): _between(1, 65535),
    (MqttConfig, "topic_prefix"): _topic_prefix,
    (MqttConfig, "qos"): _between(0, 2),
    (MqttConfig, "keepalive"): _between(5, 3600),
    (MqttConfig, "outbox_max"): _positive,
    (Config, "device"): _topic_safe,
    (Config, "stats_interval"): _positive,
}

# Keys accepted in place of a mapping: ``source: /dev/video0`` means ``source: {uri: ...}``.
SHORTHAND: dict[type, str] = {SourceConfig: "uri"}

URI_SCHEMES = ("rtsp", "rtsps", "http", "https")


# ---------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping: plain YAML keeps the last
    silently, so a second ``streams:`` would drop every stream of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML configuration file; raises one ``ConfigError`` listing every
    problem (YAML syntax errors with line and column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgedError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgedError(f"{path}: cannot read configuration: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise EdgedError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise EdgedError(f"{path}: YAML error: {exc}") from None
    # Relative paths inside the file are relative to the file, not to the working directory.
    return parse_config(data, str(path), base_dir=path.parent)


def parse_config(
    data: Any, origin: str = "<config>", base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Validate plain data (as parsed from YAML) into a ``Config``.

    ``origin`` names the source in messages; ``base_dir`` anchors relative file paths (default:
    the working directory). Every problem is collected; one ``ConfigError`` lists them all.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if isinstance(data, Mapping) and "device" not in data:
        data = {**data, "device": _default_device()}
    config = _build(Config, data, "", problems, Path(base_dir or "."))
    if problems:
        raise ConfigError(origin, problems)
    assert config is not None
    return config


def _default_device() -> str:
    """The host name made topic-safe: a sensible device id when the file names none."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "edged"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, problems: list[str], base: Path) -> Any:
    """Build dataclass ``cls`` from ``data``, adding a problem line for each bad field."""
    if cls in SHORTHAND and isinstance(data, str):
        data = {SHORTHAND[cls]: data}
    if not isinstance(data, Mapping):
        expected = f"a {SHORTHAND[cls]} or a mapping" if cls in SHORTHAND else "a mapping"
        problems.append(f"{path or '<top>'}: must be {expected}, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # Bad fields become None and building goes on, so that every problem is reported at once
    # (validators below tolerate None); parse_config raises if any problem was found.
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = _join(path, str(key))
        if cls is MqttConfig and key == "password":
            problems.append(f"{key_path}: not allowed in the file; use password_env or "
                            "password_file")
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key_path}: unknown key{hint}")
            continue
        before = len(problems)
        converted = _convert(hints[key], value, key_path, problems, base)
        if len(problems) == before and converted is not None and (cls, key) in CHECKS:
            problem = CHECKS[cls, key](converted)
            if problem:
                problems.append(f"{key_path}: {problem}")
                converted = None
        kwargs[key] = converted
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        ):
            problems.append(f"{_join(path, name)}: required")
            kwargs[name] = None
    obj = cls(**kwargs)
    if cls in VALIDATORS:
        VALIDATORS[cls](obj, path, base, problems)
    return obj


def _convert(hint: Any, value: Any, path: str, problems: list[str], base: Path) -> Any:
    """Check ``value`` against type ``hint`` (converting where YAML is loose: int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, problems, base)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{path}: must be one of {', '.join(map(str, args))}{hint_text}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list, got {_kind(value)}")
            return None
        return [_convert(args[0], v, f"{path}[{i}]", problems, base) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: must be a mapping, got {_kind(value)}")
            return None
        return {
            str(k): _convert(args[1], v, f"{path}.{k}", problems, base) for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems, base)
    return _scalar(hint, value, path, problems)


def _scalar(hint: type, value: Any, path: str, problems: list[str]) -> Any:
    # bool is an int subclass in Python: never let `port: true` pass as 1.
    if hint is bool:
        good = isinstance(value, bool)
    elif hint is int:
        good = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        good = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if good else value
    elif hint is str:
        good = isinstance(value, str) and value != ""
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise TypeError(f"unsupported config field type {hint!r}")
    if not good:
        problems.append(f"{path}: must be {_TYPE_NAMES[hint]}, got {_kind(value)}")
        return None
    return value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string" if value == "" else f"text {value!r}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Checks across fields and against the file system, run on each object once its fields are valid.
# Relative paths are made absolute against ``base`` (the configuration file's folder).


def _check_config(config: Config, path: str, base: Path, problems: list[str]) -> None:
    if config.streams == []:
        problems.append("streams: at least one stream is needed")
    seen: dict[str, int] = {}
    for i, stream in enumerate(config.streams or []):
        if stream is None or stream.name is None:
            continue
        if stream.name in seen:
            problems.append(f"streams[{i}].name: {stream.name!r} is already used by "
                            f"streams[{seen[stream.name]}]")
        seen.setdefault(stream.name, i)
    if config.model_dir is not None:
        config.model_dir = str(base / Path(config.model_dir).expanduser())
    if config.state_dir is not None:
        config.state_dir = str(base / Path(config.state_dir).expanduser())
    if not config.stdout and config.mqtt is None:
        problems.append("mqtt: no broker and stdout is false: results would go nowhere "
                        "(add an mqtt section or stdout: true)")


def _check_stream(stream: StreamConfig, path: str, base: Path, problems: list[str]) -> None:
    if stream.model is not None and ("/" in stream.model or stream.model.endswith(".onnx")):
        # A catalog name is resolved at start; a file must exist now.
        file = base / Path(stream.model).expanduser()
        if not file.is_file():
            problems.append(f"{path}.model: no such model file: {file}")
        stream.model = str(file)
    for label, value in (stream.thresholds or {}).items():
        if value is not None and not 0 <= value <= 1:
            problems.append(f"{path}.thresholds.{label}: must be 0..1")
    region = stream.region
    corners = region and None not in (region.x, region.y, region.width, region.height)
    if corners and (region.x + region.width > 1.0001 or region.y + region.height > 1.0001):
        problems.append(f"{path}.region: must lie inside the frame (x + width <= 1, "
                        "y + height <= 1)")


def _check_source(source: SourceConfig, path: str, base: Path, problems: list[str]) -> None:
    uri = source.uri
    if uri is None:
        return
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    if scheme:
        if scheme.group(1).lower() not in URI_SCHEMES:
            problems.append(f"{path}.uri: unknown URI scheme {scheme.group(1)!r} "
                            f"(use {', '.join(URI_SCHEMES)}, a device or a file)")
    elif not (uri.isdigit() or uri.startswith("/dev/")):  # a camera may be plugged in later
        file = base / Path(uri).expanduser()
        if not file.exists():
            problems.append(f"{path}.uri: no such file or folder: {file}")
        source.uri = str(file)


def _check_mqtt(mqtt: MqttConfig, path: str, base: Path, problems: list[str]) -> None:
    if mqtt.password_env and mqtt.password_file:
        problems.append(f"{path}: give password_env or password_file, not both")
    elif mqtt.password_env:
        mqtt.password = os.environ.get(mqtt.password_env)
        if mqtt.password is None:
            problems.append(f"{path}.password_env: environment variable {mqtt.password_env} "
                            "is not set")
    elif mqtt.password_file:
        file = base / Path(mqtt.password_file).expanduser()
        try:
            # One line, like a credentials file; the trailing newline is not part of it.
            mqtt.password = file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            problems.append(f"{path}.password_file: cannot read {file}: {exc.strerror}")
    if mqtt.password is not None and not mqtt.username:
        problems.append(f"{path}.username: required when a password is given")
    if mqtt.outbox_dir is not None:
        mqtt.outbox_dir = str(base / Path(mqtt.outbox_dir).expanduser())


def _check_tls(tls: TLSConfig, path: str, base: Path, problems: list[str]) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, name)
        if value is not None:
            file = base / Path(value).expanduser()
            if not file.is_file():
                problems.append(f"{path}.{name}: no such file: {file}")
            setattr(tls, name, str(file))
    if (tls.cert_file is None) != (tls.key_file is None):
        problems.append(f"{path}: cert_file and key_file go together")


VALIDATORS: dict[type, Callable[[Any, str, Path, list[str]], None]] = {
    Config: _check_config,
    StreamConfig: _check_stream,
    SourceConfig: _check_source,
    MqttConfig: _check_mqtt,
    TLSConfig: _check_tls,
}


# ---------------------------------------------------------------------------------------------
# One stream from command-line flags (``edged run --task ... --source ...``)

# Where a flag's value lands in the configuration: problems are reported under the flag's name.
FLAG_PATHS = {
    "streams[0].source.uri": "--source", "streams[0].source": "--source",
    "streams[0].model": "--model", "streams[0].task": "--task", "streams[0].fps": "--fps",
    "streams[0].threshold": "--threshold", "streams[0].name": "--name", "device": "--device",
    "mqtt.host": "--mqtt", "mqtt.port": "--mqtt", "state_dir": "--state-dir",
}


def single_stream_config(
    task: str, source: str, *, model: str | None = None, mqtt: str | None = None,
    device: str | None = None, stdout: bool = False, fps: float | None = None,
    threshold: float | None = None, name: str = "main", realtime: bool = True,
    state_dir: str | None = None,
) -> Config:
    """The ``Config`` for one stream given on the command line. Without a broker the stdout
    sink is on. Problems name the flag they came from (``--source: no such file ...``)."""
    stream: dict[str, Any] = {"name": name, "task": task,
                              "source": {"uri": source, "realtime": realtime}}
    for key, value in (("model", model), ("fps", fps), ("threshold", threshold)):
        if value is not None:
            stream[key] = value
    data: dict[str, Any] = {"streams": [stream], "stdout": stdout or mqtt is None}
    if device is not None:
        data["device"] = device
    if state_dir is not None:
        data["state_dir"] = state_dir
    problems: list[str] = []
    if mqtt is not None:
        host, _, port = mqtt.rpartition(":") if ":" in mqtt else (mqtt, "", "")
        data["mqtt"] = {"host": host or mqtt}
        if port:
            if port.isdigit():
                data["mqtt"]["port"] = int(port)
            else:
                problems.append(f"--mqtt: port {port!r} is not a number (HOST[:PORT])")
    try:
        config = parse_config(data, "edged run")
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError("edged run", [_flag_problem(p) for p in problems])
    return config


def _flag_problem(problem: str) -> str:
    path, _, message = problem.partition(": ")
    return f"{FLAG_PATHS[path]}: {message}" if path in FLAG_PATHS else problem
