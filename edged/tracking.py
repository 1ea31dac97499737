"""Online multi-object tracking of a stream's detections, in numpy: ByteTrack's association
over a constant-velocity Kalman filter, and a scene-cut detector.

Why not a library: docs/tracking.md has the figures (norfair needs numpy < 2 and an sdist-only
filterpy; ``trackers`` and supervision bring opencv-python, scipy and matplotlib, 105-155 MB
of wheels on aarch64).

Per frame (``Tracker.update``):

1. every track's box is predicted to the frame's time (boxes in normalized frame coordinates,
   velocities per second, so a stream at 2 frames/s tracks as one at 25);
2. detections at or above ``high`` are matched to the tracks first, then the remaining
   confirmed tracks take detections between ``low`` and ``high`` (ByteTrack: a partly hidden
   object keeps its track through a low-score frame); matching is greedy on the distance-IoU
   of boxes of the same label, best pairs first;
3. unmatched high-score detections start tentative tracks, confirmed after ``min_hits``
   matches; a confirmed track unmatched for ``max_age`` seconds ends.

A scene cut (``SceneCut``: the frame's colour histogram barely overlaps the previous one's)
ends every track rather than letting tracks jump to whatever the new scene holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Kalman noise, as fractions of the box height (ByteTrack's weights, per second of motion).
_STD_POSITION = 1 / 20
_STD_VELOCITY = 1 / 10
_STD_MEASURE = 1 / 20

# State: centre x, centre y, width, height, and their velocities per second.
_H = np.eye(4, 8)


@dataclass
class Track:
    """One object followed over frames. Boxes are ``(x_min, y_min, x_max, y_max)`` normalized
    to the frame."""

    id: int
    label: str
    box: np.ndarray
    score: float
    first_seen: float  # wall-clock seconds
    last_seen: float
    best_score: float = 0.0
    best_box: np.ndarray | None = None
    hits: int = 1
    confirmed: bool = False
    matched: bool = True  # matched to a detection in the latest frame
    detection: int | None = None  # index of that detection in the frame's list
    mean: np.ndarray = field(default_factory=lambda: np.zeros(8))
    covariance: np.ndarray = field(default_factory=lambda: np.eye(8))


@dataclass(frozen=True)
class Observation:
    """A detection as the tracker sees it."""

    label: str
    score: float
    box: tuple[float, float, float, float]  # normalized


def _to_state(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _to_box(state: np.ndarray) -> np.ndarray:
    cx, cy, w, h = state[..., 0], state[..., 1], state[..., 2], state[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def distance_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance-IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4]: IoU less the
    squared centre distance over the squared diagonal of the enclosing box (-1..1; it stays
    informative for boxes that no longer overlap, as at low frame rates)."""
    a, b = a[:, None, :], b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / np.maximum(area_a + area_b - inter, 1e-12)
    centre = ((a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]) ** 2
              + (a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]) ** 2) / 4
    diagonal = ((np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])) ** 2
                + (np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])) ** 2)
    return iou - centre / np.maximum(diagonal, 1e-12)


def greedy_match(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, column) taken best first while both are free and above ``threshold``."""
    if similarity.size == 0:
        return []
    rows, cols = np.nonzero(similarity > threshold)
    order = np.argsort(-similarity[rows, cols], kind="stable")
    taken_rows: set[int] = set()
    taken_cols: set[int] = set()
    pairs = []
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if r not in taken_rows and c not in taken_cols:
            taken_rows.add(r)
            taken_cols.add(c)
            pairs.append((r, c))
    return pairs


class Tracker:
    """ByteTrack over one stream's detections. ``update(observations, now)`` returns the
    tracks that ended; ``tracks`` holds the live ones."""

    def __init__(self, *, high: float, low: float, max_age: float, min_hits: int = 2,
                 match_threshold: float = -0.3) -> None:
        self.high, self.low, self.max_age = high, low, max_age
        self.min_hits = min_hits
        self.match_threshold = match_threshold
        self.tracks: list[Track] = []
        self._next_id = 1
        self._time: float | None = None

    def update(self, observations: list[Observation], now: float) -> list[Track]:
        """Advance to ``now`` (seconds) with this frame's observations; returns the tracks that
        ended (unmatched for ``max_age``, or tentative and unmatched)."""
        dt = 0.0 if self._time is None else max(0.0, now - self._time)
        self._time = now
        self._predict(dt)
        for track in self.tracks:
            track.matched, track.detection = False, None
        boxes = np.array([o.box for o in observations], dtype=np.float64).reshape(-1, 4)
        scores = np.array([o.score for o in observations])
        high = [i for i in range(len(observations)) if scores[i] >= self.high]
        low = [i for i in range(len(observations)) if self.low <= scores[i] < self.high]
        free = self._associate(self.tracks, high, observations, boxes, now)
        self._associate([t for t in self.tracks if t.confirmed and not t.matched], low,
                        observations, boxes, now)
        ended = [t for t in self.tracks if not t.matched and (
            not t.confirmed or now - t.last_seen > self.max_age)]
        self.tracks = [t for t in self.tracks if t not in ended]
        for i in free:
            self.tracks.append(self._start(observations[i], boxes[i], i, now))
        return ended

    def end_all(self) -> list[Track]:
        """End every track (a scene cut, a stop); returns them."""
        ended, self.tracks = self.tracks, []
        return ended

    # -- internals --------------------------------------------------------------------------

    def _predict(self, dt: float) -> None:
        if not self.tracks or dt == 0:
            return
        motion = np.eye(8)
        motion[:4, 4:] = dt * np.eye(4)
        means = np.stack([t.mean for t in self.tracks])
        covariances = np.stack([t.covariance for t in self.tracks])
        heights = np.maximum(means[:, 3], 1e-3)
        std = np.concatenate([np.repeat(_STD_POSITION * heights[:, None], 4, 1),
                              np.repeat(_STD_VELOCITY * heights[:, None], 4, 1)], axis=1)
        noise = np.zeros_like(covariances)
        noise[:, np.arange(8), np.arange(8)] = (std ** 2) * dt
        means = means @ motion.T
        means[:, 2:4] = np.maximum(means[:, 2:4], 1e-4)  # a box never shrinks to nothing
        covariances = motion @ covariances @ motion.T + noise
        boxes = _to_box(means[:, :4])
        for track, mean, covariance, box in zip(self.tracks, means, covariances, boxes,
                                                strict=True):
            track.mean, track.covariance, track.box = mean, covariance, box

    def _associate(self, tracks: list[Track], candidates: list[int],
                   observations: list[Observation], boxes: np.ndarray, now: float) -> list[int]:
        """Match ``tracks`` to the observations ``candidates``; returns the unmatched ones."""
        if not tracks or not candidates:
            return list(candidates)
        track_boxes = np.stack([t.box for t in tracks])
        similarity = distance_iou(track_boxes, boxes[candidates])
        labels = np.array([t.label for t in tracks])[:, None] != np.array(
            [observations[i].label for i in candidates])[None, :]
        similarity[labels] = -np.inf  # a car never continues a person's track
        pairs = [(tracks[r], candidates[c]) for r, c in greedy_match(similarity,
                                                                     self.match_threshold)]
        self._correct(pairs, observations, boxes, now)
        matched = {index for _, index in pairs}
        return [i for i in candidates if i not in matched]

    def _correct(self, pairs: list[tuple[Track, int]], observations: list[Observation],
                 boxes: np.ndarray, now: float) -> None:
        """The Kalman update of every matched track at once."""
        if not pairs:
            return
        tracks = [t for t, _ in pairs]
        found = boxes[[i for _, i in pairs]]
        means = np.stack([t.mean for t in tracks])
        covariances = np.stack([t.covariance for t in tracks])
        heights = np.maximum(means[:, 3], 1e-3)
        projected = covariances[:, :4, :4].copy()
        projected[:, np.arange(4), np.arange(4)] += ((_STD_MEASURE * heights) ** 2)[:, None]
        gain = covariances[:, :, :4] @ np.linalg.inv(projected)  # P H^T S^-1
        innovation = _to_state(found) - means[:, :4]
        means = means + (gain @ innovation[:, :, None])[:, :, 0]
        covariances = covariances - gain @ projected @ gain.transpose(0, 2, 1)
        for track, (_, index), mean, covariance, box in zip(
                tracks, pairs, means, covariances, found, strict=True):
            observation = observations[index]
            track.mean, track.covariance, track.box = mean, covariance, box.copy()
            track.score, track.last_seen = observation.score, now
            track.hits += 1
            track.matched, track.detection = True, index
            track.confirmed = track.confirmed or track.hits >= self.min_hits
            if observation.score > track.best_score:
                track.best_score, track.best_box = observation.score, box.copy()

    def _start(self, observation: Observation, box: np.ndarray, index: int,
               now: float) -> Track:
        state = _to_state(box)
        height = max(state[3], 1e-3)
        std = np.concatenate([np.full(4, 2 * _STD_POSITION * height),
                              np.full(4, 10 * _STD_VELOCITY * height)])
        track = Track(id=self._next_id, label=observation.label, box=box.copy(),
                      score=observation.score, first_seen=now, last_seen=now,
                      best_score=observation.score, best_box=box.copy(), detection=index,
                      confirmed=self.min_hits <= 1,
                      mean=np.concatenate([state, np.zeros(4)]), covariance=np.diag(std ** 2))
        self._next_id += 1
        return track


# Histogram overlap (0..1) below which two frames are of different scenes: on bikes.mp4 its
# five cuts measure at most 0.60 and motion within a shot at least 0.66, 1 to 12 frames apart.
CUT_SIMILARITY = 0.63


class SceneCut:
    """Says whether a frame starts a new scene: the overlap of its hue-saturation histogram
    with the previous frame's (a cut changes the colours; motion within a shot hardly does).
    About 0.05 ms a frame (a sample of every n-th pixel, about 64 across)."""

    def __init__(self, threshold: float = CUT_SIMILARITY) -> None:
        self.threshold = threshold
        self._previous: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> bool:
        step = max(1, image.shape[1] // 64)  # a sparse sample: colours, not detail, matter
        small = np.ascontiguousarray(image[::step, ::step])
        hist = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_BGR2HSV)], [0, 1], None, [16, 8],
                            [0, 180, 0, 256]).ravel()
        hist /= max(float(hist.sum()), 1.0)
        previous, self._previous = self._previous, hist
        return previous is not None and float(np.minimum(previous, hist).sum()) < self.threshold
