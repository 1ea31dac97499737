"""What a deployment is configured to do: the typed model of the YAML file.

These dataclasses are the one description of configuration that every part of the daemon reads.
``load_config`` / ``parse_config`` (below) build them from YAML and report every problem with its
exact path (``streams[1].source: ...``); unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Task = Literal["classify", "detect", "segment"]
PublishPolicy = Literal["every", "change", "rate"]


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
    password: str | None = None  # resolved from password_env / password_file; never logged
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

    device: str
    streams: list[StreamConfig]
    mqtt: MqttConfig | None = None  # None: no broker, results only on stdout if enabled
    stdout: bool = False  # JSON-lines sink on standard output
    state_dir: str = "/var/lib/edged"
    model_dir: str | None = None  # where catalog models are cached; None: default cache
    logging: LoggingConfig = field(default_factory=LoggingConfig)
