"""One captured image with the times it was taken."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """A frame as it leaves a source.

    ``image`` is H x W x 3 uint8 in OpenCV's BGR order; the two capture times let results report
    wall-clock time for people and monotonic time for latency arithmetic.
    """

    image: np.ndarray
    index: int
    wall_time: float
    mono_time: float
