"""The rules of edged's world that several modules apply: kinds of source URI, the states a
source goes through, the names allowed in MQTT topics, and the cores a session may use.

Each rule is written here once; configuration, capture backends, the pipeline and the daemon
read it from here.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from edged.errors import EdgedError

# MQTT topic levels must not hold wildcards or separators; names keep to a portable alphabet.
TOPIC_SAFE = r"^[A-Za-z0-9_.-]+$"
TOPIC_PREFIX = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
TOPIC_SAFE_HINT = "use letters, digits, '_', '-', '.'"

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
    ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".sr", ".ras", ".jp2", ".hdr", ".pic", ".avif",
})
NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class SourceKind(enum.Enum):
    """What a source URI names."""

    CAMERA = "camera"  # /dev/videoN, /dev/v4l/by-id/..., or N
    NETWORK = "network"  # rtsp://, rtsps://, http(s):// (MJPEG)
    FILE = "file"  # a video file, a still image or a folder of images


def source_kind(uri: str) -> SourceKind:
    """The kind of source ``uri`` names; raises ``EdgedError`` for a URI no backend reads
    (an unknown scheme, a URL without a host). Files are not looked at here."""
    scheme = _SCHEME.match(uri)
    if scheme:
        name = scheme.group(1).lower()
        if name not in NETWORK_SCHEMES:
            raise EdgedError(f"unknown URI scheme {name!r} (use {', '.join(NETWORK_SCHEMES)}, "
                             "a device or a file)")
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 (parsing the port is the check)
        except ValueError as exc:
            raise EdgedError(f"bad URL ({exc})") from None
        if not parts.hostname:
            raise EdgedError("the URL has no host")
        return SourceKind.NETWORK
    if uri.isdigit() or uri.startswith("/dev/"):
        return SourceKind.CAMERA
    return SourceKind.FILE


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a still image (by its suffix), not a video."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


class SourceState(enum.StrEnum):
    """A source's state, as published on ``<stream>/status``."""

    OPENING = "opening"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    ENDED = "ended"  # a finite source (file, folder) reached its end
    FAILED = "failed"  # the reader itself broke: the daemon exits non-zero
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        """No more frames will come in this state."""
        return self in (SourceState.ENDED, SourceState.FAILED, SourceState.STOPPED)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and systemd's
    ``CPUAffinity=`` narrow), the default thread count of an inference session."""
    return len(os.sched_getaffinity(0))
