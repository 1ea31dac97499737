"""The tracker on synthetic scenes with known ground truth, scored with motmetrics (MOTA, IDF1,
ID switches), at the low frame rates edged runs at on a board."""

from __future__ import annotations

from dataclasses import dataclass

import motmetrics as mm
import numpy as np
import pytest

from edged.tracking import Observation, SceneCut, Tracker, distance_iou, greedy_match

FPS = 5.0


@dataclass
class Walker:
    """A ground-truth object moving at constant velocity (normalized units per second)."""

    id: int
    label: str
    start: tuple[float, float]
    velocity: tuple[float, float]
    size: tuple[float, float] = (0.08, 0.2)

    def box(self, t: float) -> tuple[float, float, float, float]:
        cx = self.start[0] + self.velocity[0] * t
        cy = self.start[1] + self.velocity[1] * t
        w, h = self.size
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def score(walkers: list[Walker], seconds: float, *, hidden=lambda walker, frame: False,
          jitter: float = 0.0, seed: int = 0) -> tuple[dict[str, float], Tracker]:
    """Run the tracker over the walkers' detections and score it against their ids."""
    rng = np.random.default_rng(seed)
    tracker = Tracker(high=0.5, low=0.1, max_age=2.0, min_hits=2)
    accumulator = mm.MOTAccumulator(auto_id=True)
    for frame in range(int(seconds * FPS)):
        t = frame / FPS
        visible = [w for w in walkers if not hidden(w, frame)]
        observations = []
        for w in visible:
            box = np.array(w.box(t)) + rng.normal(0, jitter, 4)
            observations.append(Observation(w.label, 0.8, tuple(box)))
        tracker.update(observations, t)
        tracks = [tr for tr in tracker.tracks if tr.confirmed and tr.matched]
        truth = [w.box(t) for w in walkers]
        distances = iou_distances(truth, [tr.box for tr in tracks])
        accumulator.update([w.id for w in walkers], [tr.id for tr in tracks], distances)
    summary = mm.metrics.create().compute(accumulator, metrics=["mota", "idf1", "num_switches"])
    return {k: float(v) for k, v in summary.iloc[0].items()}, tracker


def iou_distances(truth: list, hypotheses: list) -> np.ndarray:
    """1 - IoU, and NaN (no match) below an IoU of 0.5: MOT's usual distance. (motmetrics 1.4's
    own ``iou_matrix`` calls a function numpy 2 removed.)"""
    if not truth or not hypotheses:
        return np.empty((len(truth), len(hypotheses)))
    a, b = np.array(truth)[:, None, :], np.array(hypotheses, dtype=float)[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
             + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
    distance = 1 - inter / union
    distance[distance > 0.5] = np.nan
    return distance


def test_two_objects_crossing_through_an_occlusion_keep_their_ids() -> None:
    """Two people walk past each other; the one behind is not detected for 3 frames."""
    a = Walker(1, "person", (0.1, 0.5), (0.16, 0.0))
    b = Walker(2, "person", (0.9, 0.52), (-0.16, 0.0))
    crossing = range(12, 15)  # they meet at t = 2.5 s, frame 12.5
    metrics, _ = score([a, b], 5.0, hidden=lambda w, f: w.id == 2 and f in crossing)
    assert metrics["num_switches"] == 0, metrics
    assert metrics["idf1"] > 0.9, metrics


def test_thirty_percent_missed_detections() -> None:
    rng = np.random.default_rng(7)
    walkers = [Walker(i, "car", (0.1 + 0.15 * i, 0.2 + 0.12 * i), (0.02 * (-1) ** i, 0.01))
               for i in range(5)]
    missed = {(w.id, f) for w in walkers for f in range(60) if rng.random() < 0.3}
    metrics, _ = score(walkers, 12.0, hidden=lambda w, f: (w.id, f) in missed, jitter=0.004)
    # Tracks report only frames with a detection, so 70 % recall bounds MOTA at about 0.7:
    # what the tracker adds is no identity lost across the gaps.
    assert metrics["num_switches"] == 0, metrics
    assert metrics["mota"] > 0.65 and metrics["idf1"] > 0.8, metrics


def test_a_standing_object_keeps_one_track_through_jitter() -> None:
    parked = Walker(1, "car", (0.5, 0.6), (0.0, 0.0), size=(0.2, 0.12))
    metrics, tracker = score([parked], 20.0, jitter=0.01)
    assert metrics["num_switches"] == 0 and metrics["mota"] > 0.9, metrics
    assert [t.id for t in tracker.tracks] == [1]


def test_labels_never_share_a_track() -> None:
    tracker = Tracker(high=0.5, low=0.1, max_age=1.0, min_hits=1)
    box = (0.4, 0.4, 0.5, 0.6)
    tracker.update([Observation("person", 0.9, box)], 0.0)
    tracker.update([Observation("dog", 0.9, box)], 0.2)
    assert sorted(t.label for t in tracker.tracks) == ["dog", "person"]


def test_low_score_detections_keep_a_track_but_start_none() -> None:
    """ByteTrack's second pass: a half-hidden object's 0.3 keeps its track; a lone 0.3 is not
    a new object."""
    tracker = Tracker(high=0.5, low=0.1, max_age=0.3, min_hits=1)
    tracker.update([Observation("person", 0.9, (0.1, 0.1, 0.2, 0.4))], 0.0)
    for i in range(1, 6):
        tracker.update([Observation("person", 0.3, (0.1 + 0.01 * i, 0.1, 0.2 + 0.01 * i, 0.4)),
                        Observation("person", 0.3, (0.7, 0.1, 0.8, 0.4))], 0.2 * i)
    assert [t.id for t in tracker.tracks] == [1]
    ended = tracker.update([], 2.0)  # no detection for longer than max_age
    assert [t.id for t in ended] == [1] and tracker.tracks == []


def test_scene_cut_detector_on_a_cut_and_on_motion() -> None:
    rng = np.random.default_rng(3)
    street = np.zeros((120, 160, 3), np.uint8)
    street[:, :, 1] = 120
    street[60:, :, 2] = 200
    moved = np.roll(street, 20, axis=1)  # the same scene, panned
    other = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)  # a dark other scene
    cut = SceneCut()
    assert cut(street) is False  # the first frame is no cut
    assert cut(moved) is False
    assert cut(other) is True


def test_matching_helpers() -> None:
    a = np.array([[0, 0, 1, 1], [2, 2, 3, 3]], dtype=float)
    similarity = distance_iou(a, a[::-1])
    assert similarity[0, 1] == pytest.approx(1.0) and similarity[0, 0] < 0
    assert greedy_match(similarity, 0.5) == [(0, 1), (1, 0)]
    assert greedy_match(np.zeros((0, 3)), 0.5) == []
