"""What a deployment is configured to do: every setting of the YAML file, declared once.

Each field below carries its type, bounds, default, meaning and reload behaviour; validation
(``edged.validation``), the JSON Schema (``edged config schema``), the reference tables of
docs/config.md and the checks of MQTT commands all derive from these declarations.

Declared vs resolved (as uvicorn's ``Config.load()``): ``validate_config`` checks plain data
and has no side effects; ``resolve_config`` makes relative paths absolute against the YAML
file, checks that files exist and reads the MQTT password, returning a new ``Config``. The
configuration is immutable: the daemon replaces it, it never changes it in place.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import msgspec
import yaml
from msgspec import Meta

from edged.domain import TOPIC_PREFIX, TOPIC_SAFE, TOPIC_SAFE_HINT, SourceKind, source_kind
from edged.errors import EdgedError
from edged.validation import Problems, Section, build, json_schema, setting, settings_table

Task = Literal["classify", "detect", "segment"]
PublishPolicy = Literal["every", "change", "rate"]
# What MQTT commands may do to a stream (docs/mqtt.md "Commands").
Command = Literal["pause", "resume", "threshold", "thresholds", "fps", "reset_lines"]
# ONNX Runtime memory: "auto" runs planned models (edged plan --budget) lean, "lean" every
# model, "default" none (docs/memory.md).
MemoryMode = Literal["auto", "lean", "default"]
TASKS: tuple[str, ...] = get_args(Task)

# Every number is finite and bounded where it is declared: a rate of 1e-300 per second or an
# infinite timeout would overflow the waits that use them.
Rate = Annotated[float, Meta(ge=0.001, le=1000)]  # per second
Seconds = Annotated[float, Meta(gt=0, le=86400)]
Timeout = Annotated[float, Meta(gt=0, le=3600)]
Score = Annotated[float, Meta(ge=0, le=1)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Pixels = Annotated[int, Meta(ge=1, le=16384)]
Text = Annotated[str, Meta(min_length=1, max_length=4096)]
Name = Annotated[str, Meta(pattern=TOPIC_SAFE, max_length=128),
                 Meta(extra={"error": f"is not topic-safe ({TOPIC_SAFE_HINT})"})]
FourCC = Annotated[str, Meta(pattern=r"^.{4}$"),
                   Meta(extra={"error": "must be 4 characters, e.g. MJPG"})]

Point = Annotated[list[Fraction], Meta(min_length=2, max_length=2),
                  Meta(extra={"error": "a point is [x, y], both 0..1"})]
Polygon = Annotated[list[Point], Meta(min_length=3, max_length=64),
                    Meta(extra={"error": "a polygon is 3 to 64 points [x, y]"})]
Seconds0 = Annotated[float, Meta(ge=0, le=86400)]

MAX_FILE_BYTES = 1 << 20  # a configuration file larger than this is refused


class SourceConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where frames come from: a V4L2 device, an RTSP / HTTP(S) MJPEG URL, a video file,
    a still image or a folder of images."""

    shorthand: ClassVar[str] = "uri"

    uri: Annotated[Text, setting(
        "`/dev/videoN` or `N` (V4L2), `rtsp://`, `rtsps://`, `http(s)://` (MJPEG), a video "
        "file, an image, a folder of images")]
    width: Annotated[Pixels | None, setting("V4L2: requested capture width")] = None
    height: Annotated[Pixels | None, setting("V4L2: requested capture height")] = None
    fps: Annotated[Rate | None, setting("V4L2: requested frame rate")] = None
    fourcc: Annotated[FourCC | None, setting("V4L2: pixel format, e.g. `MJPG` or `YUYV`")] = None
    open_timeout: Annotated[Timeout, setting("seconds to open a network source")] = 5.0
    read_timeout: Annotated[Timeout, setting(
        "seconds without a usable frame before a network source counts as lost")] = 5.0
    realtime: Annotated[bool, setting(
        "files: pace at the file's frame rate; `false`: every frame, as fast as inference "
        "goes")] = True
    loop: Annotated[bool, setting("files and folders: start again at the end")] = False
    reconnect_max: Annotated[Timeout, setting(
        "cap of the reopen backoff (seconds) for cameras and streams")] = 30.0

    def rules(self) -> Iterable[tuple[str, str]]:
        try:
            source_kind(self.uri)
        except EdgedError as exc:
            yield "uri", str(exc)

    @property
    def kind(self) -> SourceKind:
        """What the URI names (a valid configuration's URI always has a kind)."""
        return source_kind(self.uri)


class RegionConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Region of interest in normalized coordinates (0..1) of the source frame."""

    x: Annotated[Fraction, setting("left edge")] = 0.0
    y: Annotated[Fraction, setting("top edge")] = 0.0
    width: Annotated[Annotated[float, Meta(ge=0.01, le=1)], setting("width")] = 1.0
    height: Annotated[Annotated[float, Meta(ge=0.01, le=1)], setting("height")] = 1.0

    def rules(self) -> Iterable[tuple[str, str]]:
        if self.x + self.width > 1.0001 or self.y + self.height > 1.0001:
            yield "", "must lie inside the frame (x + width <= 1, y + height <= 1)"


class PublishConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When results are published: every frame, only when they change, or at most ``rate``/s."""

    policy: Annotated[PublishPolicy, setting(
        "`every` frame; `change`: classify top-1 label, detect set of labels or their counts, "
        "segment a class fraction moving by more than 1 %; `rate`: at most `rate` per second",
        "live")] = "every"
    rate: Annotated[Rate, setting("results per second for `rate`", "live")] = 1.0
    snapshot: Annotated[bool, setting(
        "detect: also publish an annotated JPEG on `<stream>/snapshot`", "live")] = False
    snapshot_interval: Annotated[Annotated[float, Meta(ge=0, le=86400)], setting(
        "seconds between snapshots at least", "live")] = 5.0
    class_map: Annotated[Literal["none", "png", "rle"], setting(
        "segment: include the class map as `png` (base64) or `rle`", "live")] = "none"
    class_map_size: Annotated[Annotated[int, Meta(ge=8, le=4096)], setting(
        "segment: longest side of that class map", "live")] = 128


class TrackConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tracking of a detect stream's objects (docs/tracking.md)."""

    low: Annotated[Score, setting(
        "detections from this score up keep an existing track alive (ByteTrack's second "
        "pass); new tracks need the stream's `threshold`")] = 0.3
    max_age: Annotated[Annotated[float, Meta(ge=0.1, le=3600)], setting(
        "seconds a track lives on without a detection before it ends")] = 2.0
    min_hits: Annotated[Annotated[int, Meta(ge=1, le=10)], setting(
        "detections a track needs before it counts (its `new` event)")] = 2
    stationary_after: Annotated[Seconds, setting(
        "seconds an object must stay put to be stationary (no more updates; its zones "
        "held)")] = 10.0
    stationary_distance: Annotated[Annotated[float, Meta(ge=0, le=2)], setting(
        "how far an object may move and still be put, in its box heights")] = 0.25
    update_interval: Annotated[Seconds0, setting(
        "seconds between two `update` events of one track at least")] = 5.0
    snapshot: Annotated[bool, setting(
        "publish the best frame of each track as an annotated JPEG when it ends")] = False


class ZoneConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named area of the frame whose occupancy is counted."""

    polygon: Annotated[Polygon, setting("the area: 3 or more points `[x, y]`, 0..1")]
    labels: Annotated[list[str] | None, setting("labels counted; none: all")] = None
    anchor: Annotated[Literal["bottom_center", "center", "top_center"], setting(
        "the point of the box that must lie inside")] = "bottom_center"
    inertia: Annotated[Annotated[int, Meta(ge=1, le=100)], setting(
        "frames in a row inside (outside) before an object enters (leaves)")] = 2
    loiter_after: Annotated[Seconds | None, setting(
        "seconds in the zone after which a `loiter` event goes out; none: never")] = None


def _in_out() -> list[str]:
    """`[in, out]`"""
    return ["in", "out"]


class LineConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named line whose crossings are counted per label and direction."""

    points: Annotated[Annotated[list[Point], Meta(min_length=2, max_length=2)], setting(
        "the line's two points `[[x, y], [x, y]]`, 0..1")]
    directions: Annotated[Annotated[list[Name], Meta(min_length=2, max_length=2)], setting(
        "names of the two directions: crossing from the left of the first point -> second "
        "point to its right, and back")] = msgspec.field(default_factory=_in_out)
    labels: Annotated[list[str] | None, setting("labels counted; none: all")] = None
    margin: Annotated[Annotated[float, Meta(ge=0, le=0.5)], setting(
        "how far past the line (fraction of the frame) an object must get to count: a box "
        "jittering on the line counts once")] = 0.02


class StreamConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One camera stream and what to run on it."""

    name: Annotated[Name, setting("the stream's topic level")]
    task: Annotated[Task, setting("`classify`, `detect` or `segment`")]
    source: Annotated[SourceConfig, setting("a URI, or a mapping (below)")]
    model: Annotated[Text | None, setting(
        "catalog name (`edged models list`) or an ONNX file; none: the task's catalog "
        "default")] = None
    fps: Annotated[Rate | None, setting(
        "process at most this many frames per second; none: no limit", "live")] = None
    threshold: Annotated[Score, setting(
        "minimum score (detect) / probability (classify)", "live")] = 0.5
    thresholds: Annotated[dict[str, Score], setting(
        "per-label minimum scores, e.g. `{person: 0.6}`", "live")] = {}
    labels: Annotated[list[str] | None, setting("only report these labels; none: all",
                                                "live")] = None
    top_k: Annotated[Annotated[int, Meta(ge=1, le=100)], setting(
        "classify: classes per result", "live")] = 5
    region: Annotated[RegionConfig | None, setting(
        "`{x, y, width, height}` normalized 0..1: run on this part of the frame only")] = None
    publish: Annotated[PublishConfig, setting("when results go out (below)", "live")] = \
        PublishConfig()
    threads: Annotated[Annotated[int, Meta(ge=1, le=256)] | None, setting(
        "ONNX Runtime threads; none: the usable cores (streams sharing a model file share one "
        "session, with the most threads any of them asks for)")] = None
    memory: Annotated[MemoryMode | None, setting(
        "ONNX Runtime memory for this stream's model; none: the top-level `memory`")] = None
    track: Annotated[TrackConfig | None, setting(
        "detect: follow objects over frames and publish their events (below); zones and "
        "lines turn it on with the defaults")] = None
    zones: Annotated[dict[Name, ZoneConfig], setting(
        "detect: named areas whose occupancy is counted (below)")] = {}
    lines: Annotated[dict[Name, LineConfig], setting(
        "detect: named lines whose crossings are counted (below)")] = {}
    masks: Annotated[list[Polygon], setting(
        "detect: areas where detections are ignored (their box's bottom centre inside)")] = []
    min_area: Annotated[dict[str, Fraction], setting(
        "detect: per label, the smallest box kept, as a fraction of the frame")] = {}
    max_area: Annotated[dict[str, Fraction], setting(
        "detect: per label, the largest box kept, as a fraction of the frame")] = {}
    commands: Annotated[Literal["all", "off"] | list[Command], setting(
        "which MQTT commands this stream obeys: `all`, `off`, or a list of names from "
        "`pause`, `resume`, `threshold`, `thresholds`, `fps`, `reset_lines`", "live")] = "all"
    stall_timeout: Annotated[Seconds, setting(
        "seconds without frames while the source claims to stream before the stream counts "
        "as stalled (watchdog pings stop); keep it above `source.read_timeout`", "live")] = 20.0

    def rules(self) -> Iterable[tuple[str, str]]:
        if self.task != "detect":
            for name in ("track", "zones", "lines", "masks", "min_area", "max_area"):
                if getattr(self, name):
                    yield name, "only detect streams track objects"

    @property
    def tracking(self) -> TrackConfig | None:
        """The tracking this stream runs: its ``track``, or the defaults when it has zones or
        lines; None when it tracks nothing."""
        if self.track is not None:
            return self.track
        return TrackConfig() if self.zones or self.lines else None


def standalone_stream(task: Task, **settings: Any) -> StreamConfig:
    """A stream's settings outside a deployment (conversion checks, tests): ``settings``
    checked as a file's would be, the source a placeholder. Raises ``ConfigError``."""
    problems = Problems()
    stream = build(StreamConfig, {"name": task, "task": task, "source": "0", **settings}, "",
                   problems)
    if problems:
        raise ConfigError("settings", problems)
    return stream  # type: ignore[return-value]


class TLSConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TLS to the broker, with a client certificate for mutual TLS."""

    ca_file: Annotated[Text | None, setting("CA certificates (PEM); none: the system's",
                                            "daemon")] = None
    cert_file: Annotated[Text | None, setting("client certificate (PEM)", "daemon")] = None
    key_file: Annotated[Text | None, setting("client key (PEM)", "daemon")] = None
    insecure: Annotated[bool, setting(
        "skip host name verification (self-signed test brokers)", "daemon")] = False

    def rules(self) -> Iterable[tuple[str, str]]:
        if (self.cert_file is None) != (self.key_file is None):
            yield "", "cert_file and key_file go together"


class MqttConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The broker connection and the topic contract's prefix."""

    refused: ClassVar[Mapping[str, str]] = {
        "password": "not allowed in the file; use password_env or password_file"}
    resolved: ClassVar[frozenset[str]] = frozenset({"password"})

    host: Annotated[Text, setting("broker host name or address", "daemon")] = "localhost"
    port: Annotated[Annotated[int, Meta(ge=1, le=65535)], setting("broker port",
                                                                  "daemon")] = 1883
    client_id: Annotated[Text | None, setting("MQTT client id; none: `edged-<device>`",
                                              "daemon")] = None
    username: Annotated[Text | None, setting("user name", "daemon")] = None
    password_env: Annotated[Text | None, setting(
        "environment variable holding the password", "daemon")] = None
    password_file: Annotated[Text | None, setting(
        "file whose first line is the password", "daemon")] = None
    tls: Annotated[TLSConfig | None, setting("TLS (below); none: plain TCP", "daemon")] = None
    topic_prefix: Annotated[
        Annotated[str, Meta(pattern=TOPIC_PREFIX, max_length=256)],
        setting("first topic level(s)", "daemon",
                error="is not a valid topic prefix (levels of letters, digits, '_', '-', "
                      "'.')")] = "edged"
    protocol: Annotated[Literal["3.1.1", "5"], setting(
        "MQTT version; with `5` a retained command is recognised whenever it arrives "
        "(docs/mqtt.md)", "daemon")] = "3.1.1"
    qos: Annotated[Annotated[int, Meta(ge=0, le=2)], setting("results' QoS", "daemon")] = 1
    keepalive: Annotated[Annotated[int, Meta(ge=5, le=3600)], setting(
        "seconds between pings to the broker", "daemon")] = 30
    outbox_dir: Annotated[Text | None, setting(
        "results waiting for the broker (survive restarts); none: `<state_dir>/outbox`",
        "daemon")] = None
    # A night's outage at 5 results/s is 216,000 results of about 1 KB: the defaults hold it
    # on a small SD card.
    outbox_max: Annotated[Annotated[int, Meta(ge=1, le=10_000_000)], setting(
        "results kept on disk at most", "daemon")] = 250_000
    outbox_max_mb: Annotated[Annotated[int, Meta(ge=1, le=1_000_000)], setting(
        "megabytes of results kept on disk at most", "daemon")] = 256
    outbox_max_age: Annotated[Annotated[float, Meta(ge=60, le=30 * 86400)], setting(
        "seconds a result may wait for the broker; older ones are dropped and counted",
        "daemon")] = 2 * 86400
    outbox_full: Annotated[Literal["drop_oldest", "drop_newest"], setting(
        "when a bound is reached: drop the oldest results to make room, or refuse new ones "
        "(both counted)", "daemon")] = "drop_oldest"
    # Read from password_env / password_file by resolve_config; never logged or printed.
    password: str | None = None

    def rules(self) -> Iterable[tuple[str, str]]:
        if self.password_env and self.password_file:
            yield "", "give password_env or password_file, not both"
        elif (self.password_env or self.password_file) and not self.username:
            yield "username", "required when a password is given"

    def __repr__(self) -> str:
        shown = msgspec.structs.replace(self, password=None if self.password is None else "***")
        return "Mqtt" + repr(msgspec.to_builtins(shown))


LOOPBACK = ("127.", "::1", "localhost")


class HttpConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The web view, health check and metrics (docs/web.md)."""

    resolved: ClassVar[frozenset[str]] = frozenset({"token"})
    refused: ClassVar[Mapping[str, str]] = {
        "token": "not allowed in the file; use token_env or token_file"}

    address: Annotated[Text, setting(
        "address to listen on; anything but loopback needs a token", "daemon")] = "127.0.0.1"
    port: Annotated[Annotated[int, Meta(ge=1, le=65535)], setting("port", "daemon")] = 8080
    token_env: Annotated[Text | None, setting(
        "environment variable holding the access token (bearer, or basic auth's password)",
        "daemon")] = None
    token_file: Annotated[Text | None, setting(
        "file whose first line is the access token", "daemon")] = None
    preview_fps: Annotated[Annotated[float, Meta(ge=0.1, le=30)], setting(
        "frames per second at most in a live preview", "daemon")] = 5.0
    # Read from token_env / token_file by resolve_config; never logged or printed.
    token: str | None = None

    def rules(self) -> Iterable[tuple[str, str]]:
        if self.token_env and self.token_file:
            yield "", "give token_env or token_file, not both"
        elif not self.address.startswith(LOOPBACK) and not (self.token_env or self.token_file):
            yield "address", (f"{self.address!r} is reachable from other machines: give "
                              "token_env or token_file")

    def __repr__(self) -> str:
        shown = msgspec.structs.replace(self, token=None if self.token is None else "***")
        return "Http" + repr(msgspec.to_builtins(shown))


class HomeAssistantConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Home Assistant MQTT discovery: edged's device, streams, zones and lines appear in Home
    Assistant by themselves (docs/homeassistant.md)."""

    prefix: Annotated[
        Annotated[str, Meta(pattern=TOPIC_PREFIX, max_length=256)],
        setting("Home Assistant's discovery prefix", "live",
                error="is not a valid topic prefix")] = "homeassistant"


class LoggingConfig(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the daemon logs."""

    level: Annotated[Literal["debug", "info", "warning", "error"], setting(
        "`debug`, `info`, `warning`, `error`", "live")] = "info"


def default_device() -> str:
    """the host name"""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:128] or "edged"


def default_state_dir() -> str:
    """`$STATE_DIRECTORY`, `/var/lib/edged` or `~/.local/state/edged`"""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    system = Path("/var/lib/edged")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return str(system)
    return str(Path.home() / ".local" / "state" / "edged")


class Config(Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole deployment of edged: the device, its streams and where results go."""

    device: Annotated[Name, setting(
        "device id, the second level of every MQTT topic", "daemon")] = \
        msgspec.field(default_factory=default_device)
    streams: Annotated[list[StreamConfig], setting(
        "the streams (below); names unique and topic-safe", "live")]
    mqtt: Annotated[MqttConfig | None, setting(
        "the broker (below); without it `stdout: true` is needed", "daemon")] = None
    stdout: Annotated[bool, setting("also write every message as one JSON line on stdout",
                                    "daemon")] = False
    http: Annotated[HttpConfig | None, setting(
        "the web view, health check and metrics (below); none: off", "daemon")] = None
    home_assistant: Annotated[HomeAssistantConfig | None, setting(
        "Home Assistant MQTT discovery (below); none: off", "live")] = None
    state_dir: Annotated[Text, setting("outbox and state", "daemon")] = \
        msgspec.field(default_factory=default_state_dir)
    model_dir: Annotated[Text | None, setting(
        "where catalog models are converted to; none: `$EDGED_CACHE` or "
        "`~/.cache/edged`")] = None
    stats_interval: Annotated[Annotated[float, Meta(ge=1, le=86400)], setting(
        "seconds between `stats` messages", "live")] = 10.0
    memory: Annotated[MemoryMode, setting(
        "ONNX Runtime memory for every stream without its own: `auto` runs planned models "
        "lean, `lean` every model, `default` none (docs/memory.md)")] = "auto"
    logging: Annotated[LoggingConfig, setting("logging (below)", "live")] = LoggingConfig()

    def rules(self) -> Iterable[tuple[str, str]]:
        if not self.stdout and self.mqtt is None:
            yield "mqtt", ("no broker and stdout is false: results would go nowhere "
                           "(add an mqtt section or stdout: true)")
        if self.streams == []:
            yield "streams", "at least one stream is needed"
        if self.home_assistant is not None and self.mqtt is None:
            yield "home_assistant", "needs an mqtt section: discovery goes through the broker"
        seen: dict[str, int] = {}
        for i, stream in enumerate(self.streams):
            if stream.name in seen:
                yield (f"streams[{i}].name",
                       f"{stream.name!r} is already used by streams[{seen[stream.name]}]")
            seen.setdefault(stream.name, i)

    def redacted(self) -> dict[str, Any]:
        """The configuration as plain data with secrets masked: safe to log or print."""
        data = msgspec.to_builtins(self)
        for section, secret in (("mqtt", "password"), ("http", "token")):
            if data.get(section) and data[section][secret] is not None:
                data[section][secret] = "***"
        return data

    def stream(self, name: str) -> StreamConfig:
        """The stream called ``name`` (``KeyError`` if none)."""
        for stream in self.streams:
            if stream.name == name:
                return stream
        raise KeyError(name)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a deployment file (``edged config schema``)."""
    return json_schema(Config, "edged deployment")


# The reference sections of docs/config.md, in the order they appear there.
REFERENCE = (("Top level", Config), ("`streams[]`", StreamConfig),
             ("`streams[].source`", SourceConfig), ("`streams[].region`", RegionConfig),
             ("`streams[].publish`", PublishConfig), ("`streams[].track`", TrackConfig),
             ("`streams[].zones.<name>`", ZoneConfig), ("`streams[].lines.<name>`", LineConfig),
             ("`mqtt`", MqttConfig),
             ("`mqtt.tls`", TLSConfig), ("`http`", HttpConfig),
             ("`home_assistant`", HomeAssistantConfig),
             ("`logging`", LoggingConfig))


def config_reference() -> str:
    """The settings reference of docs/config.md (``edged config docs``): one table per
    section, generated from the declarations above."""
    return "\n\n".join(f"### {title}\n\n{settings_table(cls)}" for title, cls in REFERENCE)


class ConfigError(EdgedError):
    """Every problem found in one configuration, one ``origin: path: problem`` line each."""

    def __init__(self, origin: str, problems: list[str]):
        self.origin = origin
        self.problems = problems
        super().__init__("\n".join(f"{origin}: {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Validate (pure), resolve (paths, files, secrets), load (YAML)


def validate_config(data: Any, problems: Problems) -> Config | None:
    """``data`` (as parsed from YAML) checked against the declarations, every problem added to
    ``problems``; no file is looked at and nothing is read. None when the top is unusable."""
    return build(Config, {} if data is None else data, "", problems)  # type: ignore[return-value]


def resolve_config(config: Config, base_dir: Path, problems: Problems,
                   environ: Mapping[str, str] = os.environ) -> Config:
    """``config`` with relative paths made absolute against ``base_dir``, files checked and
    the MQTT password read; problems are added to ``problems``. Tolerates fields left None by
    validation problems, so that one run reports both kinds."""

    def path(value: str) -> str:
        return str(base_dir / Path(value).expanduser())

    streams = []
    for i, stream in enumerate(config.streams or []):
        if stream is None:
            streams.append(stream)
            continue
        where = f"streams[{i}]"
        model, source = stream.model, stream.source
        if model is not None and ("/" in model or model.endswith(".onnx")):
            model = path(model)  # a catalog name is resolved at start; a file must exist now
            if not Path(model).is_file():
                problems.add(f"{where}.model", f"no such model file: {model}")
        if source is not None and source.uri is not None and _is_file_uri(source.uri):
            source = msgspec.structs.replace(source, uri=path(source.uri))
            if not Path(source.uri).exists():
                problems.add(f"{where}.source.uri", f"no such file or folder: {source.uri}")
        streams.append(msgspec.structs.replace(stream, model=model, source=source))
    mqtt = config.mqtt and _resolve_mqtt(config.mqtt, path, problems, environ)
    http = config.http and msgspec.structs.replace(config.http, token=_read_secret(
        "http.token", config.http.token_env, config.http.token_file, path, problems, environ))
    return msgspec.structs.replace(
        config, streams=streams, mqtt=mqtt, http=http,
        state_dir=config.state_dir and path(config.state_dir),
        model_dir=config.model_dir and path(config.model_dir))


def _is_file_uri(uri: str) -> bool:
    try:
        return source_kind(uri) is SourceKind.FILE
    except EdgedError:
        return False  # reported by validation


def _read_secret(where: str, env: str | None, file: str | None, path: Any, problems: Problems,
                 environ: Mapping[str, str]) -> str | None:
    """A secret from an environment variable or the first line of a file (both given is a
    rule's problem, reported by validation)."""
    if env and not file:
        secret = environ.get(env)
        if secret is None:
            problems.add(f"{where}_env", f"environment variable {env} is not set")
        return secret
    if file and not env:
        name = path(file)
        try:
            # One line, like a credentials file; the trailing newline is not part of it.
            return Path(name).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            problems.add(f"{where}_file",
                         f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}")
    return None


def _resolve_mqtt(mqtt: MqttConfig, path: Any, problems: Problems,
                  environ: Mapping[str, str]) -> MqttConfig:
    password = _read_secret("mqtt.password", mqtt.password_env, mqtt.password_file, path,
                            problems, environ)
    tls = mqtt.tls
    if tls is not None:
        files = {}
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(tls, name)
            if value is not None:
                files[name] = path(value)
                if not Path(files[name]).is_file():
                    problems.add(f"mqtt.tls.{name}", f"no such file: {files[name]}")
        tls = msgspec.structs.replace(tls, **files)
    return msgspec.structs.replace(
        mqtt, password=password, tls=tls,
        outbox_dir=mqtt.outbox_dir and path(mqtt.outbox_dir))


def parse_config(data: Any, origin: str = "<config>",
                 base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate and resolve plain data (as parsed from YAML) into a ``Config``.

    ``origin`` names the source in messages; ``base_dir`` anchors relative file paths (default:
    the working directory). Every problem is collected; one ``ConfigError`` lists them all.
    """
    problems = Problems()
    config = validate_config(data, problems)
    if config is not None:
        config = resolve_config(config, Path(base_dir or "."), problems)
    if problems:
        raise ConfigError(origin, problems)
    assert config is not None
    return config


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


def read_yaml(path: Path) -> Any:
    """A YAML file's data; one ``EdgedError`` line for a file that is missing, not a regular
    file, larger than 1 MB, not UTF-8, not YAML (with line and column) or nested absurdly."""
    try:
        info = path.stat()
        if not path.is_file():
            raise EdgedError(f"{path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise EdgedError(f"{path}: {info.st_size} bytes: a configuration is at most "
                             f"{MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgedError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgedError(f"{path}: cannot read configuration: {exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(exc.problem or exc.context).split())
        raise EdgedError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise EdgedError(f"{path}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise EdgedError(f"{path}: nested too deeply to be a configuration") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a YAML configuration file; raises one ``ConfigError``
    listing every problem (YAML syntax errors with line and column)."""
    path = Path(path)
    # Relative paths inside the file are relative to the file, not to the working directory.
    return parse_config(read_yaml(path), str(path), base_dir=path.parent)


# ---------------------------------------------------------------------------------------------
# One stream from command-line flags (``edged run --task ... --source ...``)

# Where a flag's value lands in the configuration: problems are reported under the flag's name.
FLAG_PATHS = {
    "streams[0].source.uri": "--source", "streams[0].source": "--source",
    "streams[0].model": "--model", "streams[0].task": "--task", "streams[0].fps": "--fps",
    "streams[0].threshold": "--threshold", "streams[0].name": "--name", "device": "--device",
    "mqtt.host": "--mqtt", "mqtt.port": "--mqtt", "state_dir": "--state-dir",
}


def split_host_port(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` with IPv6 addresses bare (``::1``) or in brackets (``[::1]:1883``);
    raises ``EdgedError`` for a port that is not a number."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise EdgedError(f"{text!r} is not HOST[:PORT] ([IPv6]:PORT)")
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:  # a host name, an IPv4 address or a bare IPv6 address
        host, port = text, ""
    if not port:
        return host, None
    if not port.isdigit():
        raise EdgedError(f"port {port!r} is not a number (HOST[:PORT])")
    return host, int(port)


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
        try:
            host, port = split_host_port(mqtt)
            data["mqtt"] = {"host": host} if port is None else {"host": host, "port": port}
        except EdgedError as exc:
            problems.append(f"--mqtt: {exc}")
            data["mqtt"] = {}  # a broker was asked for: no "results would go nowhere" line
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

