"""A stream's latest frame as people look at it: annotated and encoded only on demand.

The pipeline hands over each processed frame and its result with ``offer`` (a reference kept,
nothing copied, drawn or encoded: a stream nobody watches pays nothing). A viewer asks for the
next JPEG with ``next_jpeg``; the frame is drawn and encoded on the viewer's thread, once per
frame however many viewers there are, and a slow viewer skips to the newest frame instead of
holding the pipeline back.
"""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np

from edged import annotate
from edged.config import StreamConfig
from edged.postprocess import Classification, Detections, Segmentation, TaskResult


def draw(image: np.ndarray, result: TaskResult | None, stream: StreamConfig) -> np.ndarray:
    """``image`` with ``result`` drawn as its task shows it: boxes with labels, scores and
    track ids over the zones, lines and masks; a colour overlay; the top classes as text."""
    if isinstance(result, Detections):
        return annotate.draw_detections(annotate.draw_scene(image, stream), result)
    if isinstance(result, Segmentation):
        return annotate.draw_segmentation(image, result)
    out = image.copy()
    if isinstance(result, Classification):
        for row, item in enumerate(result.classes[:3]):
            text = f"{item.label.split(',')[0]} {item.probability:.2f}"
            cv2.putText(out, text, (8, 24 + 24 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(out, text, (8, 24 + 24 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (255, 255, 255), 1, cv2.LINE_AA)
    return out


class Preview:
    """The latest processed frame of one stream, for viewers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: tuple[int, np.ndarray, TaskResult | None, StreamConfig] | None = None
        self._encoded: tuple[int, bytes] | None = None
        self._encoding = threading.Lock()
        self.viewers = 0

    def offer(self, image: np.ndarray, result: TaskResult | None, stream: StreamConfig) -> None:
        """The pipeline's newest frame (called for every processed frame: keep it cheap)."""
        with self._cond:
            seq = self._latest[0] + 1 if self._latest else 1
            self._latest = (seq, image, result, stream)
            if self.viewers:
                self._cond.notify_all()

    def jpeg(self) -> tuple[int, bytes] | None:
        """(frame number, annotated JPEG) of the newest frame, None before the first."""
        with self._cond:
            latest = self._latest
        if latest is None:
            return None
        with self._encoding:  # one encode per frame, shared by every viewer
            if self._encoded is None or self._encoded[0] != latest[0]:
                seq, image, result, stream = latest
                self._encoded = (seq, annotate.to_jpeg(draw(image, result, stream), 80))
            return self._encoded

    def next_jpeg(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The first frame newer than ``after`` (waiting up to ``timeout``), or None."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None and self._latest[0] > after,
                                timeout)
        found = self.jpeg()
        return found if found is not None and found[0] > after else None

    def __enter__(self) -> Preview:
        with self._cond:
            self.viewers += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self.viewers -= 1
