"""Raw network outputs -> typed results in source-frame terms, per task.

- classify: softmax, then the top-k classes (of the allowed labels).
- detect: SSD decoding + per-class NMS (``edged.detection``), per-label thresholds, allow-list,
  boxes in source pixels and normalized to the source frame.
- segment: per-class pixel fractions and bounding regions, optionally the class map itself
  (nearest-downscaled, as PNG base64 or run-length encoded): segmentation as data.

Every result has ``as_dict()``, the task's payload in the result JSON (docs/results.md).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from edged.config import StreamConfig
from edged.detection import detect, score_to_logit
from edged.errors import EdgedError
from edged.model import ModelInfo
from edged.preprocess import Roi

# Labels that name no class (gaps in the COCO ids): never reported.
_NO_CLASS = frozenset({"n/a", "N/A", "???"})


def _floats(box: np.ndarray) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in box)


def _box_dict(pixels: np.ndarray, normalized: np.ndarray) -> dict[str, list]:
    """``box`` in whole source pixels and ``box_norm`` in 0..1 of the source frame, both
    ``[x_min, y_min, x_max, y_max]``."""
    return {"box": [round(float(v)) for v in pixels],
            "box_norm": [round(float(v), 4) for v in normalized]}


@dataclass(frozen=True)
class ClassScore:
    """One class of a classification."""

    label: str
    index: int
    probability: float

    def as_dict(self) -> dict[str, Any]:
        """``{"label", "index", "probability"}``."""
        return {"label": self.label, "index": self.index,
                "probability": round(self.probability, 4)}


@dataclass(frozen=True)
class Classification:
    """The top-k classes, most probable first."""

    classes: list[ClassScore]

    def as_dict(self) -> dict[str, Any]:
        """The ``classes`` payload."""
        return {"classes": [c.as_dict() for c in self.classes]}


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` in source pixels, ``box_norm`` normalized to the source,
    both ``(x_min, y_min, x_max, y_max)``."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]
    box_norm: tuple[float, float, float, float]
    track: int | None = None  # the track it belongs to, when the stream tracks objects

    def as_dict(self) -> dict[str, Any]:
        """``{"label", "index", "score", "box", "box_norm"}`` and ``"track"`` if tracked."""
        data = {"label": self.label, "index": self.index, "score": round(self.score, 4),
                **_box_dict(np.asarray(self.box), np.asarray(self.box_norm))}
        if self.track is not None:
            data["track"] = self.track
        return data


@dataclass(frozen=True)
class Detections:
    """The objects found, best first (empty: nothing found)."""

    detections: list[Detection]

    def as_dict(self) -> dict[str, Any]:
        """The ``detections`` payload."""
        return {"detections": [d.as_dict() for d in self.detections]}


@dataclass(frozen=True)
class SegmentClass:
    """One class present in a segmentation: its share of the ROI, its estimated source pixel
    count and the box bounding all its pixels."""

    label: str
    index: int
    fraction: float
    pixels: int
    box: tuple[float, float, float, float]
    box_norm: tuple[float, float, float, float]

    def as_dict(self) -> dict[str, Any]:
        """``{"label", "index", "fraction", "pixels", "box", "box_norm"}``."""
        return {"label": self.label, "index": self.index, "fraction": round(self.fraction, 4),
                "pixels": self.pixels,
                **_box_dict(np.asarray(self.box), np.asarray(self.box_norm))}


@dataclass(frozen=True)
class Segmentation:
    """Per-class statistics, the full-resolution ``class_map`` (model grid, for overlays) with the
    ``roi`` it covers, and the encoded class map when one was requested."""

    classes: list[SegmentClass]
    class_map: np.ndarray
    roi: Roi
    encoded_map: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The ``segmentation`` payload (the raw class map stays out of it)."""
        roi = self.roi
        payload: dict[str, Any] = {
            "region": {"box": [roi.x, roi.y, roi.x + roi.width, roi.y + roi.height]},
            "classes": [c.as_dict() for c in self.classes],
        }
        if self.encoded_map is not None:
            payload["class_map"] = self.encoded_map
        return {"segmentation": payload}


TaskResult = Classification | Detections | Segmentation


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def rle_encode(class_map: np.ndarray) -> list[int]:
    """Row-major runs of a 2-D map as ``[value, length, value, length, ...]``."""
    flat = np.asarray(class_map).ravel()
    if flat.size == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.append(starts, flat.size))
    return np.stack([flat[starts], lengths], axis=1).ravel().tolist()


def rle_decode(runs: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of ``rle_encode``: the ``height x width`` int64 map."""
    pairs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if pairs[:, 1].sum() != height * width:
        raise EdgedError(f"class map runs cover {pairs[:, 1].sum()} pixels, expected "
                         f"{height}x{width}")
    return np.repeat(pairs[:, 0], pairs[:, 1]).reshape(height, width)


def encode_class_map(class_map: np.ndarray, roi: Roi, fmt: Literal["png", "rle"],
                     longest_side: int) -> dict[str, Any]:
    """Nearest-downscale the class map to the ROI's aspect with ``longest_side`` (never beyond
    the ROI's own size) and encode it as PNG (base64) or RLE."""
    scale = min(longest_side, max(roi.width, roi.height)) / max(roi.width, roi.height)
    width, height = max(1, round(roi.width * scale)), max(1, round(roi.height * scale))
    dtype = np.uint8 if class_map.max(initial=0) < 256 else np.uint16
    small = cv2.resize(class_map.astype(dtype), (width, height), interpolation=cv2.INTER_NEAREST)
    if fmt == "png":
        ok, png = cv2.imencode(".png", small)
        if not ok:
            raise EdgedError("could not encode the class map as PNG")
        data: Any = base64.b64encode(png.tobytes()).decode("ascii")
    else:
        data = rle_encode(small)
    return {"format": fmt, "width": width, "height": height, "data": data}


class Postprocessor:
    """Turns one model's outputs into a ``TaskResult`` as a stream's settings ask (top_k,
    threshold(s), labels, publish.class_map); checks them against the model's labels once, at
    construction (``where`` names the configuration they came from)."""

    def __init__(self, info: ModelInfo, stream: StreamConfig, where: str = "stream") -> None:
        self.info = info
        self.stream = stream
        known = set(info.labels)
        for key, names in (("labels", stream.labels or []), ("thresholds", stream.thresholds)):
            for name in names:
                if name not in known or name in _NO_CLASS:
                    raise EdgedError(f"{where}.{key}: {name!r} is not a label of model "
                                     f"{info.name!r}")
        allowed = set(stream.labels) if stream.labels else known
        self._allowed = np.array([label in allowed and label not in _NO_CLASS
                                  for label in info.labels])
        if info.task == "detect":
            self._allowed[info.detect.background] = False
            scores = np.array([stream.thresholds.get(label, stream.threshold)
                               for label in info.labels])
            if stream.tracking is not None:  # the tracker also takes low-score detections
                scores = np.minimum(scores, stream.tracking.low)
            self._logit_thresholds = np.where(self._allowed, score_to_logit(scores), np.inf)

    def __call__(self, outputs: dict[str, np.ndarray], roi: Roi) -> TaskResult:
        """Outputs of ``Model.run`` for a frame preprocessed from ``roi`` -> the task's result."""
        task = self.info.task
        if task == "classify":
            return self._classify(outputs["logits"])
        if task == "detect":
            return self._detect(outputs["box_encodings"], outputs["class_logits"], roi)
        return self._segment(outputs["labels"], roi)

    def _classify(self, logits: np.ndarray) -> Classification:
        probs = np.where(self._allowed, softmax(logits.reshape(-1)), -1.0)
        k = min(self.stream.top_k, int(self._allowed.sum()))
        top = np.argpartition(-probs, k - 1)[:k]
        top = top[np.argsort(-probs[top], kind="stable")]
        return Classification([ClassScore(self.info.labels[i], int(i), float(probs[i]))
                               for i in top])

    def _detect(self, box_encodings: np.ndarray, class_logits: np.ndarray,
                roi: Roi) -> Detections:
        params = self.info.detect
        raw = detect(box_encodings, class_logits, params.anchors, self._logit_thresholds,
                     scales=params.box_scales, iou_threshold=params.nms_iou,
                     max_detections=params.max_detections)
        pixels, normalized = roi.to_source(raw.boxes[:, [1, 0, 3, 2]])
        return Detections([
            Detection(self.info.labels[c], int(c), float(s), _floats(p), _floats(n))
            for c, s, p, n in zip(raw.classes, raw.scores, pixels, normalized, strict=True)
        ])

    def _segment(self, labels: np.ndarray, roi: Roi) -> Segmentation:
        class_map = labels.reshape(labels.shape[-2:])
        height, width = class_map.shape
        n = len(self.info.labels)
        counts = np.bincount(class_map.ravel(), minlength=n)
        if counts.size > n:
            raise EdgedError(f"model {self.info.name!r} output class {counts.size - 1}, but it "
                             f"has only {n} labels")
        present = np.flatnonzero((counts > 0) & self._allowed)
        present = present[np.argsort(-counts[present], kind="stable")]
        boxes = []
        for c in present:  # a few classes per frame: one mask each beats per-pixel bookkeeping
            mask = class_map == c
            xs, ys = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
            boxes.append([xs[0] / width, ys[0] / height, (xs[-1] + 1) / width,
                          (ys[-1] + 1) / height])
        pixels, normalized = roi.to_source(np.array(boxes).reshape(-1, 4))
        fractions = counts / class_map.size
        roi_area = roi.width * roi.height
        classes = [
            SegmentClass(self.info.labels[c], int(c), float(fractions[c]),
                         round(fractions[c] * roi_area), _floats(p), _floats(nb))
            for c, p, nb in zip(present, pixels, normalized, strict=True)
        ]
        encoded = None
        publish = self.stream.publish
        if publish.class_map != "none":
            encoded = encode_class_map(class_map, roi, publish.class_map, publish.class_map_size)
        return Segmentation(classes, class_map, roi, encoded)
