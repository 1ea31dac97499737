"""Raw outputs -> results (edged.postprocess) on the real converted models and scikit-image's
sample photos, the segmentation statistics and class-map encodings, and the result JSON
(edged.results)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from helpers import stream_settings

from edged.catalog import InputSpec
from edged.config import RegionConfig
from edged.errors import EdgedError
from edged.frame import Frame
from edged.model import Model, ModelInfo, load_model
from edged.postprocess import (
    Postprocessor,
    Segmentation,
    TaskResult,
    rle_decode,
    rle_encode,
    softmax,
)
from edged.preprocess import Preprocessor, Roi
from edged.results import SCHEMA_VERSION, ResultBuilder, Timings, iso_time


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as a BGR frame."""
    return cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR)


def infer(model: Model, image: np.ndarray, region: RegionConfig | None = None,
          **options: object) -> TaskResult:
    """One frame through preprocess, the session and postprocess."""
    tensor, roi = Preprocessor(model.info.input, region)(image)
    post = Postprocessor(model.info, stream_settings(**options))
    return post(model.run(tensor), roi)


@pytest.fixture(scope="module")
def classifier(converted_model: Callable[..., Path]) -> Model:
    return load_model(converted_model("mobilenet_v2_imagenet"))


@pytest.fixture(scope="module")
def detector(converted_model: Callable[..., Path]) -> Model:
    return load_model(converted_model("ssd_mobilenet_v2_coco"))


@pytest.fixture(scope="module")
def segmenter(converted_model: Callable[..., Path]) -> Model:
    return load_model(converted_model("deeplabv3_mnv2_voc"))


# -- classify ---------------------------------------------------------------------------------

def test_softmax_is_stable_and_normalized() -> None:
    logits = np.array([[1000.0, 999.0, -1000.0]])
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(), 1.0)
    np.testing.assert_allclose(probs[0, :2], np.exp([0, -1]) / np.exp([0, -1]).sum())


def test_classify_chelsea_is_a_cat(classifier: Model) -> None:
    result = infer(classifier, photo("chelsea"), top_k=3)
    labels = [c.label for c in result.classes]
    assert labels[0] == "Egyptian cat" and result.classes[0].probability > 0.5
    assert all("cat" in label for label in labels)
    probs = [c.probability for c in result.classes]
    assert probs == sorted(probs, reverse=True) and len(probs) == 3
    assert classifier.info.labels[result.classes[0].index] == labels[0]
    payload = result.as_dict()
    assert payload["classes"][0] == {"label": "Egyptian cat", "index": result.classes[0].index,
                                     "probability": round(probs[0], 4)}


def test_classify_allow_list(classifier: Model) -> None:
    result = infer(classifier, photo("chelsea"), labels=["espresso", "tiger cat"], top_k=5)
    assert [c.label for c in result.classes] == ["tiger cat", "espresso"]


def test_unknown_labels_are_config_errors(classifier: Model, detector: Model) -> None:
    with pytest.raises(EdgedError, match=r"streams\[0\]\.labels: 'kitten' is not a label of "
                                         "model 'mobilenet_v2_imagenet'"):
        Postprocessor(classifier.info, stream_settings(labels=["kitten"]), "streams[0]")
    with pytest.raises(EdgedError, match=r"thresholds: 'n/a' is not a label"):
        Postprocessor(detector.info, stream_settings(thresholds={"n/a": 0.2}))


# -- detect -----------------------------------------------------------------------------------

def test_detect_astronaut_person(detector: Model) -> None:
    image = photo("astronaut")
    result = infer(detector, image, threshold=0.5)
    best = result.detections[0]
    assert best.label == "person" and best.score > 0.6
    x0, y0, x1, y1 = best.box_norm
    assert x0 < 0.1 and y0 < 0.1 and 0.6 < x1 < 0.85 and y1 > 0.9  # the astronaut, left part
    height, width = image.shape[:2]
    np.testing.assert_allclose(best.box, np.multiply(best.box_norm, [width, height] * 2))
    assert all(d.score >= 0.5 for d in result.detections)
    json.dumps(result.as_dict())


def test_detect_per_label_thresholds_and_allow_list(detector: Model) -> None:
    coffee = photo("coffee")
    everything = infer(detector, coffee, threshold=0.3)
    assert {"cup", "dining table"} <= {d.label for d in everything.detections}
    cups = infer(detector, coffee, threshold=0.3, labels=["cup"])
    assert [d.label for d in cups.detections] == ["cup"]
    strict = infer(detector, coffee, threshold=0.3, thresholds={"cup": 0.99})
    assert "cup" not in {d.label for d in strict.detections}
    assert "dining table" in {d.label for d in strict.detections}


def test_detect_region_maps_to_source_pixels(detector: Model) -> None:
    """Detecting in a region gives the crop's detections shifted to where the crop lies."""
    image = photo("astronaut")
    region = RegionConfig(x=0.0, y=0.25, width=0.8, height=0.75)
    in_region = infer(detector, image, region, threshold=0.4)
    roi = Roi.from_region(region, image.shape[1], image.shape[0])
    crop = np.ascontiguousarray(image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width])
    on_crop = infer(detector, crop, threshold=0.4)
    assert in_region.detections and [d.label for d in in_region.detections] == \
        [d.label for d in on_crop.detections]
    for a, b in zip(in_region.detections, on_crop.detections, strict=True):
        np.testing.assert_allclose(a.box, np.add(b.box, [roi.x, roi.y] * 2), atol=1e-6)
        np.testing.assert_allclose(a.box_norm, np.divide(a.box, [512, 512] * 2))
        assert roi.y <= a.box[1] and a.box[3] <= roi.y + roi.height


# -- segment ----------------------------------------------------------------------------------

def test_segment_chelsea_is_mostly_cat(segmenter: Model) -> None:
    image = photo("chelsea")
    result = infer(segmenter, image, class_map="png", class_map_size=128)
    fractions = {c.label: c.fraction for c in result.classes}
    assert fractions["cat"] > 0.8
    assert sum(fractions.values()) == pytest.approx(1.0)
    cat = next(c for c in result.classes if c.label == "cat")
    assert cat.pixels == round(cat.fraction * image.shape[0] * image.shape[1])
    encoded = result.encoded_map
    assert (encoded["width"], encoded["height"]) == (128, 85)  # chelsea is 451 x 300
    png = cv2.imdecode(np.frombuffer(base64.b64decode(encoded["data"]), np.uint8),
                       cv2.IMREAD_UNCHANGED)
    expected = cv2.resize(result.class_map.astype(np.uint8), (128, 85),
                          interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(png, expected)
    payload = result.as_dict()["segmentation"]
    assert payload["class_map"]["format"] == "png" and payload["region"]["box"] == [0, 0, 451, 300]
    json.dumps(payload)


def test_segment_rle_map_round_trips(segmenter: Model) -> None:
    result = infer(segmenter, photo("astronaut"), class_map="rle", class_map_size=64)
    encoded = result.encoded_map
    decoded = rle_decode(encoded["data"], encoded["height"], encoded["width"])
    expected = cv2.resize(result.class_map.astype(np.uint8), (64, 64),
                          interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(decoded, expected)
    assert {c.label for c in result.classes} >= {"person", "background"}


SEG_INFO = ModelInfo(path=Path("synthetic.onnx"), task="segment", name="synthetic",
                     labels=("background", "cat", "dog", "person"),
                     input=InputSpec(40, 30, (128.0,) * 3, (128.0,) * 3))


def test_segment_statistics_on_a_known_map() -> None:
    rng = np.random.default_rng(5)
    class_map = np.zeros((30, 40), np.int64)
    class_map[5:12, 10:30] = 1
    class_map[20:, :8] = 3
    class_map[rng.integers(0, 30, 10), rng.integers(0, 40, 10)] = 3  # scattered pixels
    roi = Roi.from_region(RegionConfig(x=0.5, y=0.0, width=0.5, height=0.5), 400, 200)
    result = Postprocessor(SEG_INFO, stream_settings())({"labels": class_map[None]}, roi)
    assert isinstance(result, Segmentation)
    assert [c.label for c in result.classes] == sorted(
        ["background", "cat", "person"], key=lambda lb: -(class_map == SEG_INFO.labels.index(lb))
        .sum())
    for item in result.classes:
        mask = class_map == item.index
        assert item.fraction == pytest.approx(mask.mean())
        assert item.pixels == round(mask.mean() * 200 * 100)
        ys, xs = np.nonzero(mask)
        grid = np.array([xs.min() / 40, ys.min() / 30, (xs.max() + 1) / 40, (ys.max() + 1) / 30])
        np.testing.assert_allclose(item.box, grid * [200, 100, 200, 100] + [200, 0, 200, 0])
        np.testing.assert_allclose(item.box_norm, np.divide(item.box, [400, 200, 400, 200]))
    only = Postprocessor(SEG_INFO, stream_settings(labels=["cat"]))({"labels": class_map},
                                                                      roi)
    assert [c.label for c in only.classes] == ["cat"]


def test_segment_class_beyond_the_labels_is_an_error() -> None:
    with pytest.raises(EdgedError, match="model 'synthetic' output class 7, but it has only 4"):
        Postprocessor(SEG_INFO, stream_settings("segment"))(
            {"labels": np.full((1, 30, 40), 7)}, Roi.full(40, 30))


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (9, 13), (64, 48)])
def test_rle_round_trip(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    # Blocky maps (runs longer than one) as well as noise.
    blocky = np.repeat(rng.integers(0, 4, (shape[0], max(1, shape[1] // 4))), 4, axis=1)
    for class_map in (rng.integers(0, 21, shape), blocky[:, : shape[1]]):
        runs = rle_encode(class_map)
        assert runs[1::2] and min(runs[1::2]) >= 1 and sum(runs[1::2]) == class_map.size
        assert all(a != b for a, b in zip(runs[0:-2:2], runs[2::2], strict=True))
        np.testing.assert_array_equal(rle_decode(runs, *class_map.shape), class_map)


def test_rle_decode_rejects_wrong_size() -> None:
    with pytest.raises(EdgedError, match="runs cover 5 pixels, expected 2x3"):
        rle_decode([1, 2, 0, 3], 2, 3)


# -- result JSON ------------------------------------------------------------------------------

def test_result_message(classifier: Model) -> None:
    wall, mono = time.time(), time.monotonic()
    frame = Frame(photo("chelsea"), index=41, wall_time=wall, mono_time=mono)
    result = infer(classifier, frame.image, top_k=2)
    builder = ResultBuilder("pi-kitchen", "door", "classify", classifier.info.name)
    timings = Timings(start=mono + 0.010, preprocessed=mono + 0.0115, inferred=mono + 0.0235,
                      done=mono + 0.0240)
    first = builder.build(frame, timings.latency(frame), result)
    second = json.loads(json.dumps(builder.build(frame, timings.latency(frame), result)))
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["schema"] == SCHEMA_VERSION
    assert (first["device"], first["stream"], first["task"], first["model"]) == \
        ("pi-kitchen", "door", "classify", "mobilenet_v2_imagenet")
    assert first["frame"]["index"] == 41 and first["frame"]["epoch"] == round(wall, 3)
    assert (first["frame"]["width"], first["frame"]["height"]) == (451, 300)
    parsed = datetime.fromisoformat(first["frame"]["time"])
    assert abs(parsed.timestamp() - wall) < 0.001 and first["frame"]["time"].endswith("Z")
    assert first["latency_ms"] == pytest.approx(
        {"frame_age": 10.0, "preprocess": 1.5, "inference": 12.0, "postprocess": 0.5,
         "total": 24.0}, abs=0.011)
    assert first["classes"] == result.as_dict()["classes"]


def test_iso_time_is_utc_milliseconds() -> None:
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1.5) == "1970-01-01T00:00:01.500Z"
