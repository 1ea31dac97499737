"""Annotated pictures (edged.annotate) of real detections and segmentations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from helpers import stream_settings

from edged.annotate import (
    annotate_detections,
    annotate_segmentation,
    draw_detections,
    draw_segmentation,
    palette,
)
from edged.config import RegionConfig
from edged.model import load_model
from edged.postprocess import Detections, Postprocessor, Segmentation
from edged.preprocess import Preprocessor


def _run(model_path: Path, image: np.ndarray, region: RegionConfig | None = None):
    model = load_model(model_path)
    tensor, roi = Preprocessor(model.info.input, region)(image)
    return Postprocessor(model.info, stream_settings(threshold=0.3))(model.run(tensor), roi)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


def _decode(jpeg: bytes) -> np.ndarray:
    assert jpeg[:2] == b"\xff\xd8"
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def test_palette_is_distinct_with_black_background() -> None:
    colours = palette(21)
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colours.tolist()}) == 21
    assert colours[15].tolist() == [128, 128, 192]  # VOC "person", BGR


def test_detection_snapshot(converted_model: Callable[..., Path],
                            astronaut: np.ndarray) -> None:
    result = _run(converted_model("ssd_mobilenet_v2_coco"), astronaut)
    assert isinstance(result, Detections) and result.detections
    before = astronaut.copy()
    drawn = draw_detections(astronaut, result)
    np.testing.assert_array_equal(astronaut, before)  # the frame itself is untouched
    person = next(d for d in result.detections if d.label == "person")
    x0, y0, x1, y1 = (round(v) for v in person.box)
    colour = palette(person.index + 1)[person.index].tolist()
    # The box's right and bottom edges carry the class colour (the tag sits on the top edge).
    assert drawn[(y0 + y1) // 2, x1].tolist() == colour
    assert drawn[y1 - 1 if y1 >= drawn.shape[0] else y1, (x0 + x1) // 2].tolist() == colour
    assert not np.array_equal(drawn[y0:y0 + 10, x0:x0 + 60], astronaut[y0:y0 + 10, x0:x0 + 60])
    decoded = _decode(annotate_detections(astronaut, result))
    assert decoded.shape == astronaut.shape
    # The JPEG shows the drawn picture: close to it, closer than to the plain frame.
    assert cv2.PSNR(decoded, drawn) > max(30.0, cv2.PSNR(decoded, astronaut))
    empty = draw_detections(astronaut, Detections([]))
    np.testing.assert_array_equal(empty, astronaut)


def test_segmentation_overlay(converted_model: Callable[..., Path]) -> None:
    chelsea = cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR)
    region = RegionConfig(x=0.0, y=0.0, width=1.0, height=0.8)  # the overlay follows the ROI
    result = _run(converted_model("deeplabv3_mnv2_voc"), chelsea, region)
    assert isinstance(result, Segmentation)
    drawn = draw_segmentation(chelsea, result, alpha=0.6)
    roi = result.roi
    class_map = cv2.resize(result.class_map.astype(np.uint8), (roi.width, roi.height),
                           interpolation=cv2.INTER_NEAREST)
    cat = palette(21)[8].astype(np.float64)
    ys, xs = np.nonzero(class_map == 8)
    pick = slice(None, None, 97)
    expected = 0.4 * chelsea[ys[pick], xs[pick]] + 0.6 * cat
    legend_rows = ys[pick] > 40  # the legend tags sit in the top-left corner
    assert legend_rows.sum() > 100
    np.testing.assert_allclose(drawn[ys[pick], xs[pick]][legend_rows], expected[legend_rows],
                               atol=1.0)
    bg_y, bg_x = np.nonzero(class_map == 0)
    assert bg_y.size > 100
    np.testing.assert_array_equal(drawn[bg_y, bg_x], chelsea[bg_y, bg_x])
    np.testing.assert_array_equal(drawn[roi.height:], chelsea[roi.height:])  # outside the ROI
    decoded = _decode(annotate_segmentation(chelsea, result))
    assert decoded.shape == chelsea.shape
