"""Pictures of results: detection snapshots and segmentation overlays, as JPEG bytes.

``draw_*`` return a new BGR image (the frame is never modified: sources may reuse it);
``annotate_*`` encode that image as JPEG for publishing.
"""

from __future__ import annotations

import cv2
import numpy as np

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
        _label(out, f"{det.label} {det.score:.2f}", x0, y0, colour, scale, taken)
    return out


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


def annotate_detections(image: np.ndarray, result: Detections, quality: int = 85) -> bytes:
    """The annotated detection snapshot as JPEG bytes."""
    return to_jpeg(draw_detections(image, result), quality)


def annotate_segmentation(image: np.ndarray, result: Segmentation, alpha: float = 0.6,
                          quality: int = 85) -> bytes:
    """The segmentation overlay as JPEG bytes."""
    return to_jpeg(draw_segmentation(image, result, alpha), quality)
