"""SSD detection in numpy: anchors, box decoding and per-class non-maximum suppression.

The anchors and the box coder are those of the SSD MobileNetV2 checkpoints (the TF Object
Detection API's multiple-grid anchor generator and Faster R-CNN box coder), so the raw
``box_encodings`` / ``class_logits`` of an edged detect model decode exactly as in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from edged.errors import EdgedError

# Boxes of different classes are shifted this far apart so one NMS pass never lets them suppress
# each other (decoded boxes stay well inside -1..2 of the input).
_CLASS_OFFSET = 4.0


@dataclass(frozen=True)
class SsdAnchorParams:
    """Parameters of the SSD anchor generator (the MobileNetV2 SSD configuration by default).

    ``feature_map_sizes`` are the square grids of the predictor layers, coarsest last; ``None``
    derives them from the input size (output strides 16 and 32, then halving, rounding up).
    """

    num_layers: int = 6
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True
    feature_map_sizes: tuple[int, ...] | None = None
    input_size: int = 300

    @classmethod
    def from_dict(cls, data: dict, input_size: int) -> SsdAnchorParams:
        """Build from ``edged.detect.anchors`` metadata (``{"generator": "ssd", ...}``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"generator"})
        if unknown:
            raise EdgedError(f"unknown anchor generator parameter(s): {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
                  if k != "generator"}
        values.setdefault("input_size", input_size)
        try:
            params = cls(**values)
        except TypeError as exc:
            raise EdgedError(f"bad anchor generator parameters: {exc}") from None
        # The scales are spread from min_scale to max_scale over the layers: two at least.
        if not isinstance(params.num_layers, int) or params.num_layers < 2:
            raise EdgedError(f"anchor generator: num_layers must be an integer >= 2, got "
                             f"{params.num_layers!r}")
        return params

    def grid_sizes(self) -> tuple[int, ...]:
        """The feature map sizes, given or derived from the input size."""
        if self.feature_map_sizes is not None:
            if len(self.feature_map_sizes) != self.num_layers:
                raise EdgedError(f"anchor generator: {len(self.feature_map_sizes)} feature map "
                                 f"sizes for {self.num_layers} layers")
            return self.feature_map_sizes
        sizes = [math.ceil(self.input_size / 16), math.ceil(self.input_size / 32)]
        while len(sizes) < self.num_layers:
            sizes.append(math.ceil(sizes[-1] / 2))
        return tuple(sizes[: self.num_layers])


def _box_specs(params: SsdAnchorParams) -> list[list[tuple[float, float]]]:
    """Per layer, the (scale, aspect ratio) of each anchor of a cell."""
    n = params.num_layers
    scales = [params.min_scale + (params.max_scale - params.min_scale) * i / (n - 1)
              for i in range(n)] + [1.0]
    specs = []
    for layer in range(n):
        scale, scale_next = scales[layer], scales[layer + 1]
        if layer == 0 and params.reduce_boxes_in_lowest_layer:
            specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
            continue
        layer_specs = [(scale, ratio) for ratio in params.aspect_ratios]
        if params.interpolated_scale_aspect_ratio > 0:
            layer_specs.append((math.sqrt(scale * scale_next),
                                params.interpolated_scale_aspect_ratio))
        specs.append(layer_specs)
    return specs


def generate_ssd_anchors(params: SsdAnchorParams) -> np.ndarray:
    """All anchors as float32 ``[A, 4]`` ``(yc, xc, h, w)``, normalized to the input.

    Order: layer, then grid row, grid column, then the cell's box specs, as the SSD heads emit
    their predictions.
    """
    layers = []
    for size, specs in zip(params.grid_sizes(), _box_specs(params), strict=True):
        scale, ratio = np.array(specs, dtype=np.float64).T
        heights = scale / np.sqrt(ratio)
        widths = scale * np.sqrt(ratio)
        centres = (np.arange(size) + 0.5) / size
        yc, xc, k = np.meshgrid(centres, centres, np.arange(len(specs)), indexing="ij")
        layers.append(np.stack([yc, xc, heights[k], widths[k]], axis=-1).reshape(-1, 4))
    return np.concatenate(layers).astype(np.float32)


def decode_boxes(encodings: np.ndarray, anchors: np.ndarray,
                 scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)) -> np.ndarray:
    """Faster R-CNN box coder: ``(ty, tx, th, tw)`` per anchor -> ``(ymin, xmin, ymax, xmax)``."""
    sy, sx, sh, sw = scales
    yca, xca, ha, wa = anchors.T
    yc = encodings[:, 0] / sy * ha + yca
    xc = encodings[:, 1] / sx * wa + xca
    half_h = 0.5 * np.exp(encodings[:, 2] / sh) * ha
    half_w = 0.5 * np.exp(encodings[:, 3] / sw) * wa
    return np.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_output: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; returns indices of the kept boxes, best first.

    ``boxes`` are ``(ymin, xmin, ymax, xmax)``; a box is dropped when its IoU with a kept,
    higher-scoring box exceeds ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    y0, x0, y1, x1 = boxes.T
    areas = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
    keep: list[int] = []
    limit = len(order) if max_output is None else max_output
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_h = np.clip(np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]), 0, None)
        inter_w = np.clip(np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]), 0, None)
        inter = inter_h * inter_w
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def score_to_logit(score: np.ndarray | float) -> np.ndarray:
    """The sigmoid's inverse, so a score threshold can be applied to logits before any exp.

    Scores of 0 and 1 map to -inf and +inf (everything passes / nothing passes).
    """
    p = np.asarray(score, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class RawDetections:
    """Detections in the model's input frame: boxes ``(ymin, xmin, ymax, xmax)`` normalized,
    sigmoid scores and class columns (background excluded), best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def detect(box_encodings: np.ndarray, class_logits: np.ndarray, anchors: np.ndarray,
           logit_thresholds: np.ndarray, *, scales: tuple[float, float, float, float],
           iou_threshold: float = 0.6, max_detections: int = 20,
           max_candidates: int = 300) -> RawDetections:
    """Decode SSD outputs into per-class NMS-filtered detections.

    ``logit_thresholds`` holds one logit per class column (see ``score_to_logit``; +inf for the
    background column and for labels not wanted), so most of the ``A x C`` scores are rejected
    with one comparison and only candidates are decoded and passed through the sigmoid.
    ``max_candidates`` keeps the best candidates before NMS to bound its cost.
    """
    logits = class_logits.reshape(anchors.shape[0], -1)
    # Compare in the logits' own dtype (no float64 upcast of A x C values); a flat index is
    # several times cheaper to find than 2-D nonzero.
    flat = np.flatnonzero(logits > np.asarray(logit_thresholds, dtype=logits.dtype))
    anchor_idx, class_idx = np.divmod(flat, logits.shape[1])
    cand_logits = logits.ravel()[flat]
    if cand_logits.size > max_candidates:
        best = np.argpartition(-cand_logits, max_candidates)[:max_candidates]
        anchor_idx, class_idx, cand_logits = anchor_idx[best], class_idx[best], cand_logits[best]
    boxes = decode_boxes(box_encodings.reshape(-1, 4)[anchor_idx], anchors[anchor_idx], scales)
    scores = 1.0 / (1.0 + np.exp(-cand_logits.astype(np.float64)))
    keep = nms(boxes + (class_idx * _CLASS_OFFSET)[:, None], scores, iou_threshold,
               max_detections)
    return RawDetections(boxes=boxes[keep], scores=scores[keep], classes=class_idx[keep])
