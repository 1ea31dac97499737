"""Frame -> input tensor (edged.preprocess) on real video frames, and the region-of-interest
mapping back to source pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edged.catalog import InputSpec
from edged.config import RegionConfig
from edged.errors import EdgedError
from edged.preprocess import Preprocessor, Roi

SPEC = InputSpec(300, 300, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))


@pytest.fixture(scope="module")
def frames(bikes_clip: Path) -> list[np.ndarray]:
    """Three real 640x272 frames from the bikes clip."""
    capture = cv2.VideoCapture(str(bikes_clip))
    images = []
    for _ in range(30):
        ok, image = capture.read()
        assert ok, f"could not read {bikes_clip}"
        images.append(image)
    capture.release()
    return images[::10]


def _reference(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The same preprocessing spelled out step by step."""
    resized = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR_EXACT)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32)
    normalized = (rgb - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return normalized.transpose(2, 0, 1)[None]


def test_matches_the_step_by_step_reference(frames: list[np.ndarray]) -> None:
    pre = Preprocessor(SPEC)
    for image in frames:
        tensor, roi = pre(image)
        assert tensor.shape == (1, 3, 300, 300) and tensor.dtype == np.float32
        assert tensor.flags.c_contiguous
        np.testing.assert_allclose(tensor, _reference(image, SPEC), atol=1e-6)
        assert roi == Roi.full(640, 272)


def test_per_channel_mean_and_std_in_rgb_order(frames: list[np.ndarray]) -> None:
    spec = InputSpec(224, 160, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
    tensor, _ = Preprocessor(spec)(frames[0])
    assert tensor.shape == (1, 3, 160, 224)
    np.testing.assert_allclose(tensor, _reference(frames[0], spec), atol=1e-5)


def test_buffer_is_reused_every_frame(frames: list[np.ndarray]) -> None:
    pre = Preprocessor(SPEC)
    first, _ = pre(frames[0])
    kept = first.copy()
    second, _ = pre(frames[1])
    assert second is first
    assert not np.array_equal(kept, second)


def test_region_crops_before_resizing(frames: list[np.ndarray]) -> None:
    region = RegionConfig(x=0.25, y=0.5, width=0.5, height=0.5)
    tensor, roi = Preprocessor(SPEC, region)(frames[0])
    assert (roi.x, roi.y, roi.width, roi.height) == (160, 136, 320, 136)
    crop = frames[0][136:272, 160:480]
    np.testing.assert_allclose(tensor, _reference(crop, SPEC), atol=1e-6)


def test_roi_maps_boxes_back_to_source_pixels() -> None:
    roi = Roi.from_region(RegionConfig(x=0.25, y=0.5, width=0.5, height=0.5), 640, 272)
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.5, 0.25, 0.75, 0.5], [-0.2, 0.1, 1.3, 0.9]])
    pixels, normalized = roi.to_source(boxes)
    np.testing.assert_allclose(pixels[0], [160, 136, 480, 272])
    np.testing.assert_allclose(pixels[1], [160 + 160, 136 + 34, 160 + 240, 136 + 68])
    np.testing.assert_allclose(pixels[2], [160, 136 + 13.6, 480, 136 + 122.4])  # clipped to ROI
    np.testing.assert_allclose(normalized, pixels / [640, 272, 640, 272])
    full_pixels, full_norm = Roi.full(640, 272).to_source(boxes[:2])
    np.testing.assert_allclose(full_norm, boxes[:2])
    np.testing.assert_allclose(full_pixels, boxes[:2] * [640, 272, 640, 272])


def test_region_is_clamped_to_the_frame() -> None:
    roi = Roi.from_region(RegionConfig(x=0.9, y=0.0, width=0.5, height=1.0), 100, 50)
    assert (roi.x, roi.y, roi.width, roi.height) == (90, 0, 10, 50)


def test_bad_frames_and_regions_are_one_line_errors(frames: list[np.ndarray]) -> None:
    pre = Preprocessor(SPEC)
    with pytest.raises(EdgedError, match=r"frame must be H x W x 3 uint8, got \(272, 640\)"):
        pre(cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY))
    with pytest.raises(EdgedError, match="float32"):
        pre(frames[0].astype(np.float32))
    with pytest.raises(EdgedError, match="covers no pixel of a 640x272 frame"):
        Preprocessor(SPEC, RegionConfig(x=0.5, y=0.5, width=0.0, height=0.5))(frames[0])
