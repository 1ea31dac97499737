"""Pictures of results: detection snapshots and segmentation overlays, as JPEG bytes.

``draw_*`` return a new BGR image (the frame is never modified: sources may reuse it);
``annotate_*`` encode that image as JPEG for publishing.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edged.config import StreamConfig
from edged.errors import EdgedError
from edged.postprocess import Detections, Segmentation

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def palette(n: int) -> np.ndarray:
    """``n`` distinct BGR uint8 colours: the PASCAL VOC colour map (class 0 black), so the same
    class always gets the same colour."""
    value = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for bit in range(7, -1, -1):  # each 3 bits of the index spread over the channels' MSBs
        for channel in range(3):
            rgb[:, channel] |= ((value >> channel) & 1) << bit
        value = value >> 3
    return rgb[:, ::-1].astype(np.uint8)


def _text_colour(colour: np.ndarray) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``colour`` (BGR)."""
    luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _label(image: np.ndarray, text: str, x: int, y: int, colour: np.ndarray, scale: float,
           taken: list[tuple[int, int, int, int]] | None = None) -> None:
    """A filled tag with ``text`` whose bottom-left corner is at (x, y), kept inside the image.

    ``taken`` lists the tags drawn so far; a tag that would cover one moves down below it (two
    classes on one box stay readable) and is added to the list.
    """
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    tag_h = h + base + 2
    x = min(max(x, 0), max(image.shape[1] - w - 4, 0))
    y = min(max(y, tag_h), image.shape[0])
    for tx, ty, tw, th in taken or ():
        if x < tx + tw and tx < x + w + 4 and y - tag_h < ty and ty - th < y:
            y = ty + tag_h
    cv2.rectangle(image, (x, y - tag_h), (x + w + 4, y), colour.tolist(), cv2.FILLED)
    cv2.putText(image, text, (x + 2, y - base), _FONT, scale, _text_colour(colour), 1,
                cv2.LINE_AA)
    if taken is not None:
        taken.append((x, y, w + 4, tag_h))


def draw_detections(image: np.ndarray, result: Detections) -> np.ndarray:
    """Boxes with ``label score`` tags, coloured per class."""
    out = image.copy()
    detections = result.detections
    thickness = max(1, round(max(out.shape[:2]) / 320))
    scale = max(0.4, max(out.shape[:2]) / 1200)
    colours = palette(max((d.index for d in detections), default=0) + 1)
    taken: list[tuple[int, int, int, int]] = []
    for det in detections:
        colour = colours[det.index]  # detect classes start at 1: never the map's black
        x0, y0, x1, y1 = (round(v) for v in det.box)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour.tolist(), thickness)
        track = f" #{det.track}" if det.track is not None else ""
        _label(out, f"{det.label}{track} {det.score:.2f}", x0, y0, colour, scale, taken)
    return out


# Colours of what a deployment draws on its frames (BGR).
ZONE_COLOUR = np.array([0, 200, 255], np.uint8)
LINE_COLOUR = np.array([255, 120, 0], np.uint8)
MASK_COLOUR = np.array([90, 90, 90], np.uint8)


def draw_scene(image: np.ndarray, stream: StreamConfig) -> np.ndarray:
    """A stream's zones (outlined, named), lines (with an arrow for the first direction) and
    masks (greyed out), drawn on a copy of ``image``."""
    out = image.copy()
    height, width = out.shape[:2]
    size = np.array([width, height], dtype=np.float64)
    thickness = max(1, round(max(height, width) / 400))
    scale = max(0.4, max(height, width) / 1200)
    for mask in stream.masks:
        points = np.round(np.asarray(mask) * size).astype(np.int32)
        shade = out.copy()
        cv2.fillPoly(shade, [points], MASK_COLOUR.tolist())
        out = cv2.addWeighted(out, 0.5, shade, 0.5, 0.0)
    for name, zone in stream.zones.items():
        points = np.round(np.asarray(zone.polygon) * size).astype(np.int32)
        cv2.polylines(out, [points], True, ZONE_COLOUR.tolist(), thickness, cv2.LINE_AA)
        x, y = points.min(axis=0)
        _label(out, name, int(x), int(y) + 20, ZONE_COLOUR, scale)
    for name, line in stream.lines.items():
        (ax, ay), (bx, by) = (np.asarray(p) * size for p in line.points)
        a, b = (round(ax), round(ay)), (round(bx), round(by))
        cv2.line(out, a, b, LINE_COLOUR.tolist(), thickness + 1, cv2.LINE_AA)
        # The first direction crosses from the left of a -> b to its right: draw that way.
        mid = np.array([(ax + bx) / 2, (ay + by) / 2])
        normal = np.array([-(by - ay), bx - ax])
        normal = normal / max(float(np.hypot(*normal)), 1e-9) * 0.05 * max(height, width)
        tail, head = np.round(mid - normal).astype(int), np.round(mid + normal).astype(int)
        cv2.arrowedLine(out, tuple(tail.tolist()), tuple(head.tolist()), LINE_COLOUR.tolist(),
                        thickness, cv2.LINE_AA, tipLength=0.3)
        _label(out, f"{name}: {line.directions[0]}", int(head[0]), int(head[1]), LINE_COLOUR,
               scale)
    return out


def track_snapshot(image: np.ndarray, box_norm: Sequence[float], text: str,
                   longest_side: int = 640, quality: int = 80) -> bytes:
    """A frame with one track's box and tag, at most ``longest_side`` pixels, as JPEG."""
    height, width = image.shape[:2]
    factor = min(1.0, longest_side / max(height, width))
    small = cv2.resize(image, (round(width * factor), round(height * factor)),
                       interpolation=cv2.INTER_AREA) if factor < 1 else image.copy()
    h, w = small.shape[:2]
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(box_norm, (w, h, w, h), strict=True))
    colour = LINE_COLOUR
    cv2.rectangle(small, (x0, y0), (x1, y1), colour.tolist(), 2)
    _label(small, text, x0, y0, colour, 0.5)
    return to_jpeg(small, quality)


def draw_segmentation(image: np.ndarray, segmentation: Segmentation,
                      alpha: float = 0.6) -> np.ndarray:
    """Class colours blended over the region the model saw, and a legend of the classes present
    with their share of that region. Background (class 0) is left unpainted."""
    out = image.copy()
    roi = segmentation.roi
    colours = palette(256)
    # uint8 wraps classes beyond 255 onto shared colours: only the picture suffers.
    class_map = cv2.resize(segmentation.class_map.astype(np.uint8), (roi.width, roi.height),
                           interpolation=cv2.INTER_NEAREST)
    region = out[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]
    # A lookup table and a masked copy: many times faster than fancy and boolean indexing.
    painted = cv2.LUT(cv2.merge([class_map] * 3), colours.reshape(256, 1, 3))
    blended = cv2.addWeighted(region, 1.0 - alpha, painted, alpha, 0.0)
    cv2.copyTo(blended, (class_map > 0).view(np.uint8), region)  # writes through the view
    scale = max(0.4, max(out.shape[:2]) / 1200)
    line = cv2.getTextSize("Ag", _FONT, scale, 1)[0][1] + 10
    for row, item in enumerate(c for c in segmentation.classes if c.index > 0):
        _label(out, f"{item.label} {item.fraction * 100:.0f}%", 4, 4 + line * (row + 1),
               colours[item.index], scale)
    return out


def to_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """Encode a BGR image as JPEG."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise EdgedError(f"could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def annotate_detections(image: np.ndarray, result: Detections, quality: int = 85,
                        stream: StreamConfig | None = None) -> bytes:
    """The annotated detection snapshot as JPEG bytes, with the stream's zones, lines and
    masks when it has any."""
    if stream is not None and (stream.zones or stream.lines or stream.masks):
        image = draw_scene(image, stream)
    return to_jpeg(draw_detections(image, result), quality)


def annotate_segmentation(image: np.ndarray, result: Segmentation, alpha: float = 0.6,
                          quality: int = 85) -> bytes:
    """The segmentation overlay as JPEG bytes."""
    return to_jpeg(draw_segmentation(image, result, alpha), quality)
