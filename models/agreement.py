"""How far an int8 model strays from its fp32 original, measured on real frames.

The report decodes both models' outputs the way the daemon does (``edged.preprocess``,
``edged.postprocess``) and compares the results a user sees:

- classify: top-1 agreement and the largest change of any class probability; agreement is also
  counted apart on the frames where fp32 itself is decided (its top two classes at least
  ``TIE_MARGIN`` apart), since int8's rounding may swap a near tie either way;
- detect: fp32 detections matched by an int8 one of the same class with IoU >= 0.5, and the
  largest score change of a matched pair;
- segment: the share of pixels given the same class (mean and worst frame).

Frames are BGR uint8 (OpenCV order), as the daemon's sources deliver them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edged.config import standalone_stream
from edged.errors import EdgedError
from edged.model import Model, load_model
from edged.postprocess import Detection, Postprocessor, softmax

Frame = tuple[str, np.ndarray]  # (name, BGR uint8 image)

DETECT_THRESHOLD = 0.3  # compare detections down to here: a loss near it shows as a miss
MATCH_IOU = 0.5
TIE_MARGIN = 0.02  # fp32's top two closer than this: a near tie, not a decided class
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
BIKES_FRAMES = tuple(range(9, 235, 25))  # 9, 34, ..., 234: the held-out clip frames
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MAX_FRAMES = 64  # frames taken from a clip or folder, evenly spread


def photo_frames() -> list[Frame]:
    """scikit-image's sample photos (chelsea, astronaut, coffee, rocket) as BGR frames."""
    try:
        from skimage import data
    except ImportError:
        raise EdgedError("the agreement report needs scikit-image's sample photos: install "
                         "scikit-image (part of the convert extra)") from None
    return [(name, cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)) for name in PHOTOS]


def clip_frames(path: str | os.PathLike[str], indices: Sequence[int] | None = None,
                limit: int = MAX_FRAMES) -> list[Frame]:
    """Frames ``indices`` of a video clip (default: ``limit`` frames evenly spread)."""
    path = Path(path)
    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not capture.isOpened() or count <= 0:
            raise EdgedError(f"{path}: not a readable video clip")
        if indices is None:
            indices = sorted(set(np.linspace(0, count - 1, min(limit, count)).astype(int)))
        wanted, frames, index = set(indices), [], 0
        while index <= max(wanted):
            ok, image = capture.read()
            if not ok:
                raise EdgedError(f"{path}: clip ends at frame {index}, frame {max(wanted)} "
                                 "wanted")
            if index in wanted:
                frames.append((f"{path.name}#{index}", image))
            index += 1
        return frames
    finally:
        capture.release()


def folder_frames(path: str | os.PathLike[str], limit: int = MAX_FRAMES) -> list[Frame]:
    """The images of a folder (sorted by name; ``limit`` of them evenly spread)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EdgedError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder")
    picks = np.linspace(0, len(files) - 1, min(limit, len(files))).astype(int)
    frames = []
    for file in (files[i] for i in sorted(set(picks))):
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise EdgedError(f"{file}: not a readable image")
        frames.append((file.name, image))
    return frames


def load_frames(source: str | os.PathLike[str], limit: int = MAX_FRAMES) -> list[Frame]:
    """Frames from a clip or a folder of images (``--calibration CLIP|DIR``)."""
    path = Path(source)
    if path.is_dir():
        return folder_frames(path, limit)
    if path.is_file():
        return clip_frames(path, limit=limit)
    raise EdgedError(f"{path}: no such clip or folder of images")


def held_out_frames(bikes: str | os.PathLike[str]) -> list[Frame]:
    """The 14 frames the int8 targets are stated on: the four photos and bikes.mp4 frames
    9, 34, ..., 234."""
    return photo_frames() + clip_frames(bikes, BIKES_FRAMES)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``(x_min, y_min, x_max, y_max)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(want: Sequence[Detection], got: Sequence[Detection]
                     ) -> list[tuple[Detection, Detection]]:
    """Pairs (fp32, int8) of the same class with IoU >= ``MATCH_IOU``, greedily best score
    first, each detection used once."""
    free = list(got)
    pairs = []
    for d in sorted(want, key=lambda d: -d.score):
        best = max((g for g in free if g.index == d.index), default=None,
                   key=lambda g: _iou(d.box_norm, g.box_norm))
        if best is not None and _iou(d.box_norm, best.box_norm) >= MATCH_IOU:
            pairs.append((d, best))
            free.remove(best)
    return pairs


def _outputs(model: Model, frames: Sequence[Frame]) -> list[tuple[dict[str, np.ndarray], Any]]:
    from edged.preprocess import Preprocessor

    pre = Preprocessor(model.info.input)
    results = []
    for _, image in frames:
        tensor, roi = pre(image)
        results.append((model.run(tensor), roi))
    return results


def agreement_report(fp32: str | os.PathLike[str], int8: str | os.PathLike[str],
                     frames: Sequence[Frame], threads: int | None = None) -> dict[str, Any]:
    """Compare model ``int8`` with ``fp32`` on ``frames``; a JSON-ready report with a one-line
    ``summary``."""
    return compare_models(load_model(fp32, threads), load_model(int8, threads), frames)


def compare_models(reference: Model, candidate: Model, frames: Sequence[Frame],
                   reference_name: str = "fp32") -> dict[str, Any]:
    """``agreement_report`` of two loaded models: ``candidate`` measured against
    ``reference``, called ``reference_name`` in the report's lines."""
    if not frames:
        raise EdgedError("the agreement report needs at least one frame")
    info = reference.info
    if candidate.info.task != info.task or candidate.info.labels != info.labels:
        raise EdgedError(f"{candidate.info.path}: not the same task and labels as {info.path}")
    names = [name for name, _ in frames]
    pairs = zip(_outputs(reference, frames), _outputs(candidate, frames), strict=True)
    report: dict[str, Any] = {"task": info.task, "frames": len(frames)}
    if info.task == "classify":
        agree = decided = decided_agree = 0
        changes, flips, squares = [], [], []
        for name, ((a, _), (b, _)) in zip(names, pairs, strict=True):
            squares.append(float(np.mean((a["logits"] - b["logits"]) ** 2)))
            pa, pb = softmax(a["logits"].reshape(-1)), softmax(b["logits"].reshape(-1))
            first, second = np.argsort(pa)[::-1][:2]
            same = int(first) == int(np.argmax(pb))
            clear = float(pa[first] - pa[second]) >= TIE_MARGIN
            agree += same
            decided += clear
            decided_agree += same and clear
            changes.append(float(np.abs(pa - pb).max()))
            if not same:
                flips.append(f"{name}: {info.labels[first]} -> {info.labels[int(np.argmax(pb))]} "
                             f"({reference_name} top two {pa[first]:.3f} / {pa[second]:.3f})")
        report.update(top1_agree=agree, decided_frames=decided, decided_agree=decided_agree,
                      max_probability_change=round(max(changes), 4),
                      rms_logit_change=round(float(np.sqrt(np.mean(squares))), 4),
                      disagreements=flips)
        report["summary"] = (f"top-1 agreement {agree}/{len(frames)} ({decided_agree}/{decided} "
                             f"where {reference_name}'s top two are >= {TIE_MARGIN} apart), max "
                             f"probability change {max(changes):.3f}")
    elif info.task == "detect":
        settings = standalone_stream("detect", threshold=DETECT_THRESHOLD)
        post_a = Postprocessor(info, settings)
        post_b = Postprocessor(candidate.info, settings)
        total = matched = 0
        changes, missed = [0.0], []
        for name, ((a, roi), (b, _)) in zip(names, pairs, strict=True):
            want = post_a(a, roi).detections
            got = post_b(b, roi).detections
            found = match_detections(want, got)
            total += len(want)
            matched += len(found)
            changes += [abs(d.score - g.score) for d, g in found]
            hit = {id(d) for d, _ in found}
            missed += [f"{name}: {d.label} {d.score:.3f}" for d in want if id(d) not in hit]
        report.update(detections=total, matched=matched, max_score_change=round(max(changes), 4),
                      missed=missed, threshold=DETECT_THRESHOLD, iou=MATCH_IOU)
        report["summary"] = (f"{matched}/{total} detections matched (same class, IoU >= "
                             f"{MATCH_IOU}), max score change {max(changes):.3f}")
    else:
        shares = [float(np.mean(a["labels"] == b["labels"])) for (a, _), (b, _) in pairs]
        report.update(pixel_agreement=round(float(np.mean(shares)), 4),
                      worst_pixel_agreement=round(min(shares), 4))
        report["summary"] = (f"pixel agreement {np.mean(shares):.1%} mean, {min(shares):.1%} "
                             "worst frame")
    report["summary"] += f" on {len(frames)} frames"
    return report
