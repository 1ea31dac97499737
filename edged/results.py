"""The result JSON: one message per processed frame (schema in docs/results.md).

``ResultBuilder`` belongs to one stream and numbers its results (``seq``); ``Timings`` carries
the per-stage durations measured by the caller with ``time.monotonic()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edged.frame import Frame
from edged.postprocess import TaskResult

SCHEMA_VERSION = 1


def iso_time(epoch: float) -> str:
    """``2026-11-27T18:47:35.123Z``: UTC with milliseconds."""
    stamp = datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@dataclass(frozen=True)
class Timings:
    """Monotonic times (seconds) around one frame's processing.

    ``start`` is when processing began (preprocess start), ``preprocessed``, ``inferred`` and
    ``done`` the end of each stage.
    """

    start: float
    preprocessed: float
    inferred: float
    done: float

    def latency(self, frame: Frame) -> dict[str, float]:
        """``latency_ms``: the frame's age when processing began, each stage, and the total from
        capture to result."""
        return {
            "frame_age": _ms(self.start - frame.mono_time),
            "preprocess": _ms(self.preprocessed - self.start),
            "inference": _ms(self.inferred - self.preprocessed),
            "postprocess": _ms(self.done - self.inferred),
            "total": _ms(self.done - frame.mono_time),
        }


class ResultBuilder:
    """Builds the result messages of one stream, numbering them from 1."""

    def __init__(self, device: str, stream: str, task: str, model: str) -> None:
        self.device = device
        self.stream = stream
        self.task = task
        self.model = model
        self.seq = 0

    def build(self, frame: Frame, latency: dict[str, float],
              result: TaskResult) -> dict[str, Any]:
        """The JSON-ready message for one processed frame; ``latency`` is
        ``Timings.latency(frame)``."""
        self.seq += 1
        return {
            "schema": SCHEMA_VERSION,
            "device": self.device,
            "stream": self.stream,
            "task": self.task,
            "model": self.model,
            "seq": self.seq,
            "frame": {
                "index": frame.index,
                "time": iso_time(frame.wall_time),
                "epoch": round(frame.wall_time, 3),
                "monotonic": round(frame.mono_time, 3),
                "width": frame.image.shape[1],
                "height": frame.image.shape[0],
            },
            "latency_ms": latency,
            **result.as_dict(),
        }

