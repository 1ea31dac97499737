"""Frame -> model input: one resize, one fused colour swap + normalize into a reused buffer.

The whole frame (or its region of interest) is stretched to the model's ``W x H`` without
letterboxing, as the checkpoints were trained. ``Roi`` remembers where that region sits in the
source so results can be mapped back to source pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edged.catalog import InputSpec
from edged.config import RegionConfig
from edged.errors import EdgedError


@dataclass(frozen=True)
class Roi:
    """The pixel rectangle of the source frame the model saw (the whole frame without a region).

    ``x, y, width, height`` are source pixels; ``frame_width``/``frame_height`` the source size.
    """

    x: int
    y: int
    width: int
    height: int
    frame_width: int
    frame_height: int

    @classmethod
    def full(cls, width: int, height: int) -> Roi:
        """The whole frame."""
        return cls(0, 0, width, height, width, height)

    @classmethod
    def from_region(cls, region: RegionConfig | None, width: int, height: int) -> Roi:
        """Normalized ``region`` -> pixels of a ``width x height`` frame, at least one pixel."""
        if region is None:
            return cls.full(width, height)
        x0 = min(max(round(region.x * width), 0), width - 1)
        y0 = min(max(round(region.y * height), 0), height - 1)
        x1 = min(round((region.x + region.width) * width), width)
        y1 = min(round((region.y + region.height) * height), height)
        if x1 <= x0 or y1 <= y0:
            raise EdgedError(f"region (x={region.x}, y={region.y}, width={region.width}, "
                             f"height={region.height}) covers no pixel of a {width}x{height} frame")
        return cls(x0, y0, x1 - x0, y1 - y0, width, height)

    def to_source(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(x0, y0, x1, y1)`` normalized to the ROI -> (source pixels, normalized to the
        source frame), both clipped to the ROI."""
        boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
        pixels = boxes * [self.width, self.height, self.width, self.height]
        pixels += [self.x, self.y, self.x, self.y]
        normalized = pixels / [self.frame_width, self.frame_height, self.frame_width,
                               self.frame_height]
        return pixels, normalized


class Preprocessor:
    """Turns BGR uint8 frames of any size into the model's normalized NCHW tensor.

    The returned tensor is the same preallocated buffer every call: feed it to the model before
    the next call.
    """

    def __init__(self, spec: InputSpec, region: RegionConfig | None = None) -> None:
        self.spec = spec
        self.region = region
        self._resized = np.empty((spec.height, spec.width, 3), dtype=np.uint8)
        self._tensor = np.empty((1, 3, spec.height, spec.width), dtype=np.float32)
        # Per RGB channel, broadcast over H x W.
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32)).reshape(3, 1, 1)

    def roi(self, image: np.ndarray) -> Roi:
        """Where the region of interest lies in this frame."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise EdgedError(f"frame must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        return Roi.from_region(self.region, width, height)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Roi]:
        """Preprocess one frame; returns the input tensor and the ROI it was taken from."""
        roi = self.roi(image)
        crop = image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]
        # Shrinking: INTER_AREA would be smoother but is 3-4x slower; the checkpoints were
        # trained on bilinear resizes. The _EXACT variant gives the same pixels on x86 and ARM
        # (plain INTER_LINEAR differs by one level in ~17 % of values at 224x224).
        cv2.resize(crop, (self.spec.width, self.spec.height), dst=self._resized,
                   interpolation=cv2.INTER_LINEAR_EXACT)
        # HWC BGR view as CHW RGB; the subtraction reads it once into the float buffer.
        chw_rgb = self._resized.transpose(2, 0, 1)[::-1]
        np.subtract(chw_rgb, self._mean, out=self._tensor[0])
        np.multiply(self._tensor[0], self._inv_std, out=self._tensor[0])
        return self._tensor, roi


def verification_photo(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, str]:
    """A real photo as RGB uint8 and its name, for checking a converted or rewritten model:
    ``path``, else scikit-image's astronaut."""
    if path is None:
        try:
            from skimage import data
        except ImportError:
            raise EdgedError("verification needs a real photo: install scikit-image (part of the "
                             "convert extra) or pass --verify-image FILE") from None
        return data.astronaut(), "skimage.data.astronaut"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EdgedError(f"{path}: not a readable image (--verify-image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), Path(path).name
