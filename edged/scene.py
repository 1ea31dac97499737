"""What a detect stream's objects do: tracks and their events, zone occupancy, line counts.

``DetectionFilter`` drops what a deployment never wants to see (detections in masks, boxes
too small or too large for their label). ``Scene`` follows the rest with ``edged.tracking``
and turns the tracks into what subscribers act on:

- events (``<stream>/events``): ``new`` once a track is confirmed, ``update`` (at most every
  ``update_interval`` s, and only when its zones, its stationary flag or its best score
  changed), ``enter`` / ``leave`` / ``loiter`` for zones, ``end``;
- zone occupancy per label (retained ``<stream>/zones/<zone>``), with inertia: an object is in
  a zone after ``inertia`` frames in a row inside, out after as many outside; a stationary
  object's zones are held;
- line counts per label and direction (retained ``<stream>/lines/<line>``), with hysteresis:
  a crossing counts when the object gets ``margin`` past the line, once per track and
  direction; the counts are kept in the state directory and survive a restart.

Coordinates are normalized to the frame (0..1), as in the configuration, so zones and lines
survive a change of resolution.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.config import LineConfig, StreamConfig
from edged.errors import EdgedError, did_you_mean
from edged.frame import Frame
from edged.postprocess import Detection, Detections
from edged.results import SCHEMA_VERSION, iso_time
from edged.tracking import Observation, SceneCut, Track, Tracker

log = logging.getLogger(__name__)

BETTER_SCORE = 0.05  # a best score this much higher is worth an update event


def inside(polygon: Sequence[Sequence[float]], x: float, y: float) -> bool:
    """Whether (x, y) lies inside ``polygon`` (even-odd ray casting; plain Python: for a few
    vertices it is many times faster than numpy's per-call overhead)."""
    result = False
    xj, yj = polygon[-1]
    for xi, yi in polygon:
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            result = not result
        xj, yj = xi, yi
    return result


def anchor_point(box: Sequence[float], anchor: str = "bottom_center") -> tuple[float, float]:
    """The point of a box ``(x0, y0, x1, y1)`` that decides where an object is."""
    x0, y0, x1, y1 = box
    y = {"bottom_center": y1, "center": (y0 + y1) / 2, "top_center": y0}[anchor]
    return (x0 + x1) / 2, y


class DetectionFilter:
    """Drops detections whose bottom centre lies in a mask, or whose box is smaller than
    ``min_area`` / larger than ``max_area`` (fractions of the frame) for its label."""

    def __init__(self, stream: StreamConfig) -> None:
        self.masks = stream.masks
        self.min_area, self.max_area = stream.min_area, stream.max_area

    @property
    def active(self) -> bool:
        """Whether this filter can drop anything."""
        return bool(self.masks or self.min_area or self.max_area)

    def __call__(self, result: Detections) -> Detections:
        return Detections([d for d in result.detections if self._keeps(d)])

    def _keeps(self, det: Detection) -> bool:
        x0, y0, x1, y1 = det.box_norm
        area = (x1 - x0) * (y1 - y0)
        if area < self.min_area.get(det.label, 0.0) or area > self.max_area.get(det.label, 1.0):
            return False
        x, y = anchor_point(det.box_norm)
        return not any(inside(mask, x, y) for mask in self.masks)


@dataclass
class _Membership:
    """One track's standing in one zone."""

    inside: bool = False
    streak: int = 0  # frames in a row on the other side of ``inside``
    since: float = 0.0  # wall time of entering
    loitered: bool = False


@dataclass
class _Follow:
    """What the scene knows of one track beyond the tracker."""

    announced: bool = False
    zones: dict[str, _Membership] = field(default_factory=dict)
    sides: dict[str, int] = field(default_factory=dict)  # line -> -1 / +1 (left / right)
    counted: set[tuple[str, int]] = field(default_factory=set)
    stationary: bool = False
    still_at: tuple[float, float] | None = None
    still_since: float = 0.0
    last_update: float = 0.0
    reported: tuple[frozenset[str], bool, float] | None = None
    best_jpeg: bytes | None = None


@dataclass
class SceneUpdate:
    """One frame's outcome: the result's detections (with track ids), events, and the zones and
    lines whose figures changed."""

    detections: Detections
    events: list[dict[str, Any]]
    zones: dict[str, dict[str, Any]]
    lines: dict[str, dict[str, Any]]
    snapshots: dict[int, bytes]  # track id -> its best frame (JPEG), for tracks that ended


class Scene:
    """Tracks, zones and lines of one detect stream. ``labels`` are the model's (every label
    a zone, line or area bound names must be one); ``counts_file`` keeps the line counts."""

    def __init__(self, stream: StreamConfig, labels: Sequence[str], device: str,
                 counts_file: Path | None = None, where: str = "stream",
                 draw: Any = None) -> None:
        tracking = stream.tracking
        assert tracking is not None, "a scene needs tracking"
        self.stream, self.tracking, self.device = stream, tracking, device
        _check_labels(stream, labels, where)
        self.tracker = Tracker(high=stream.threshold, low=min(tracking.low, stream.threshold),
                               max_age=tracking.max_age, min_hits=tracking.min_hits)
        self.cut = SceneCut()
        self.zones = stream.zones
        self.lines = stream.lines
        self.counts_file = counts_file
        self.counts = _load_counts(counts_file, stream.lines)
        self.follows: dict[int, _Follow] = {}
        self._wall_offset = 0.0  # wall-clock minus monotonic time: tracks keep monotonic times
        self.draw = draw  # (image, track box) -> JPEG bytes, for tracks' best frames

    def retune(self, stream: StreamConfig) -> None:
        """Take a stream's live settings (thresholds, after a command or a reload)."""
        self.stream = stream
        self.tracker.high = stream.threshold
        self.tracker.low = min(self.tracking.low, stream.threshold)

    # -- figures ----------------------------------------------------------------------------

    def zone_state(self, name: str, now: float) -> dict[str, Any]:
        """The retained occupancy message of zone ``name``."""
        occupancy: dict[str, int] = {}
        for track in self.tracker.tracks:
            member = self.follows.get(track.id)
            if member is not None and member.zones.get(name, _Membership()).inside:
                occupancy[track.label] = occupancy.get(track.label, 0) + 1
        return {"zone": name, "occupancy": occupancy, "total": sum(occupancy.values()),
                "time": iso_time(now)}

    def line_state(self, name: str, now: float) -> dict[str, Any]:
        """The retained counts message of line ``name``."""
        counts = self.counts.get(name, {})
        directions = self.lines[name].directions
        totals = {d: sum(per.get(d, 0) for per in counts.values()) for d in directions}
        return {"line": name, "counts": counts, "total": totals, "time": iso_time(now)}

    def reset_lines(self, names: Iterable[str], now: float) -> dict[str, dict[str, Any]]:
        """Zero the counts of ``names``; returns their new messages."""
        for name in names:
            self.counts[name] = {}
        self._save_counts()
        return {name: self.line_state(name, now) for name in names}

    # -- per frame --------------------------------------------------------------------------

    def update(self, frame: Frame, result: Detections) -> SceneUpdate:
        """Follow ``result`` (every detection from ``track.low`` up) into this frame."""
        now, wall = frame.mono_time, frame.wall_time
        self._wall_offset = wall - now
        height, width = frame.image.shape[:2]
        events: list[dict[str, Any]] = []
        zones_changed: set[str] = set()
        lines_changed: set[str] = set()
        snapshots: dict[int, bytes] = {}
        if self.cut(frame.image):
            ended = self.tracker.end_all()
            self._end(ended, "scene_cut", wall, (width, height), events, zones_changed, snapshots)
        observations = [Observation(d.label, d.score, d.box_norm) for d in result.detections]
        ended = self.tracker.update(observations, now)
        self._end(ended, "lost", wall, (width, height), events, zones_changed, snapshots)
        ids: dict[int, int] = {}
        for track in self.tracker.tracks:
            if not track.confirmed:
                continue
            follow = self.follows.setdefault(track.id, _Follow(still_since=now))
            if track.detection is not None:
                ids[track.detection] = track.id
            if not follow.announced:
                follow.announced = True
                follow.last_update = now
                events.append(self._event("new", track, follow, wall, (width, height)))
            if track.matched:
                self._stationary(track, follow, now, wall, (width, height), events)
                self._zones(track, follow, now, wall, (width, height), events, zones_changed)
                self._lines(track, follow, lines_changed)
                self._keep_best(track, follow, frame)
            self._maybe_update(track, follow, now, wall, (width, height), events)
        threshold = {label: self.stream.thresholds.get(label, self.stream.threshold)
                     for label in {d.label for d in result.detections}}
        published = Detections([dataclasses.replace(d, track=ids.get(i))
                                for i, d in enumerate(result.detections)
                                if d.score >= threshold[d.label]])
        if lines_changed:
            self._save_counts()
        return SceneUpdate(published, events,
                           {z: self.zone_state(z, wall) for z in sorted(zones_changed)},
                           {n: self.line_state(n, wall) for n in sorted(lines_changed)},
                           snapshots)

    def end_all(self, frame_size: tuple[int, int], wall: float, reason: str = "stopped"
                ) -> SceneUpdate:
        """End every track (the stream stops): their ``end`` and ``leave`` events."""
        events: list[dict[str, Any]] = []
        zones_changed: set[str] = set()
        snapshots: dict[int, bytes] = {}
        self._end(self.tracker.end_all(), reason, wall, frame_size, events, zones_changed,
                  snapshots)
        return SceneUpdate(Detections([]), events,
                           {z: self.zone_state(z, wall) for z in sorted(zones_changed)}, {},
                           snapshots)

    # -- internals --------------------------------------------------------------------------

    def _end(self, tracks: list[Track], reason: str, wall: float, size: tuple[int, int],
             events: list[dict[str, Any]], zones_changed: set[str],
             snapshots: dict[int, bytes]) -> None:
        for track in tracks:
            follow = self.follows.pop(track.id, None)
            if follow is None or not follow.announced:
                continue
            for name, member in follow.zones.items():
                if member.inside:
                    zones_changed.add(name)
                    events.append(self._event("leave", track, follow, wall, size, zone=name,
                                              seconds=round(wall - member.since, 1)))
            follow.zones.clear()
            events.append(self._event("end", track, follow, wall, size, reason=reason))
            if follow.best_jpeg is not None:
                snapshots[track.id] = follow.best_jpeg

    def _stationary(self, track: Track, follow: _Follow, now: float, wall: float,
                    size: tuple[int, int], events: list[dict[str, Any]]) -> None:
        x, y = anchor_point(track.box, "center")
        height = max(track.box[3] - track.box[1], 1e-6)
        if follow.still_at is None or np.hypot(x - follow.still_at[0], y - follow.still_at[1]) \
                > self.tracking.stationary_distance * height:
            follow.still_at, follow.still_since = (x, y), now
            follow.stationary = False
        elif not follow.stationary and now - follow.still_since >= \
                self.tracking.stationary_after:
            follow.stationary = True

    def _zones(self, track: Track, follow: _Follow, now: float, wall: float,
               size: tuple[int, int], events: list[dict[str, Any]],
               changed: set[str]) -> None:
        if follow.stationary:
            return  # a parked car neither enters nor leaves: its zones are held
        for name, zone in self.zones.items():
            if zone.labels is not None and track.label not in zone.labels:
                continue
            member = follow.zones.setdefault(name, _Membership())
            now_inside = inside(zone.polygon, *anchor_point(track.box, zone.anchor))
            member.streak = member.streak + 1 if now_inside != member.inside else 0
            if member.streak >= zone.inertia:
                member.inside, member.streak = now_inside, 0
                changed.add(name)
                if now_inside:
                    member.since, member.loitered = wall, False
                    events.append(self._event("enter", track, follow, wall, size, zone=name))
                else:
                    events.append(self._event("leave", track, follow, wall, size, zone=name,
                                              seconds=round(wall - member.since, 1)))
            if (member.inside and not member.loitered and zone.loiter_after is not None
                    and wall - member.since >= zone.loiter_after):
                member.loitered = True
                events.append(self._event("loiter", track, follow, wall, size, zone=name,
                                          seconds=round(wall - member.since, 1)))

    def _lines(self, track: Track, follow: _Follow, changed: set[str]) -> None:
        x, y = anchor_point(track.box)
        for name, line in self.lines.items():
            if line.labels is not None and track.label not in line.labels:
                continue
            side = _side(line, x, y)
            if side == 0:
                continue  # within the margin: no decision, no double count from jitter
            before = follow.sides.get(name)
            follow.sides[name] = side
            if before is None or before == side or not _within(line, x, y):
                continue
            direction = 0 if side > 0 else 1  # left -> right is the first direction
            if (name, direction) in follow.counted:
                continue
            follow.counted.add((name, direction))
            per_label = self.counts.setdefault(name, {}).setdefault(track.label, {})
            key = line.directions[direction]
            per_label[key] = per_label.get(key, 0) + 1
            changed.add(name)

    def _keep_best(self, track: Track, follow: _Follow, frame: Frame) -> None:
        if (self.tracking.snapshot and self.draw is not None
                and track.score >= track.best_score and track.detection is not None):
            follow.best_jpeg = self.draw(frame.image, track)

    def _maybe_update(self, track: Track, follow: _Follow, now: float, wall: float,
                      size: tuple[int, int], events: list[dict[str, Any]]) -> None:
        zones = frozenset(n for n, m in follow.zones.items() if m.inside)
        state = (zones, follow.stationary, track.best_score)
        if follow.reported is None:
            follow.reported = state
            return
        old_zones, old_stationary, old_best = follow.reported
        if (zones == old_zones and follow.stationary == old_stationary
                and track.best_score < old_best + BETTER_SCORE):
            return
        if now - follow.last_update < self.tracking.update_interval:
            return
        follow.reported, follow.last_update = state, now
        events.append(self._event("update", track, follow, wall, size))

    def _event(self, kind: str, track: Track, follow: _Follow, wall: float,
               size: tuple[int, int], **extra: Any) -> dict[str, Any]:
        width, height = size
        box = track.box
        return {
            "schema": SCHEMA_VERSION, "device": self.device, "stream": self.stream.name,
            "type": kind, "time": iso_time(wall), "track": track.id, "label": track.label,
            "score": round(track.best_score, 4),
            "first_seen": iso_time(track.first_seen + self._wall_offset),
            "last_seen": iso_time(track.last_seen + self._wall_offset),
            "box": [round(float(v) * s) for v, s in zip(box, (width, height) * 2, strict=True)],
            "box_norm": [round(float(v), 4) for v in box],
            "zones": sorted(n for n, m in follow.zones.items() if m.inside),
            "stationary": follow.stationary, **extra,
        }

    def _save_counts(self) -> None:
        if self.counts_file is None:
            return
        try:
            self.counts_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.counts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.counts))
            os.replace(tmp, self.counts_file)
        except OSError as exc:
            log.warning("stream %s: cannot keep the line counts in %s: %s", self.stream.name,
                        self.counts_file, exc.strerror or exc)


def _side(line: LineConfig, x: float, y: float) -> int:
    """+1 right of the line (first point -> second), -1 left, 0 within its margin."""
    (ax, ay), (bx, by) = line.points
    length = max(float(np.hypot(bx - ax, by - ay)), 1e-9)
    distance = ((bx - ax) * (y - ay) - (by - ay) * (x - ax)) / length
    return 0 if abs(distance) <= line.margin else (1 if distance > 0 else -1)


def _within(line: LineConfig, x: float, y: float) -> bool:
    """Whether (x, y) projects onto the segment (with a little slack at its ends)."""
    (ax, ay), (bx, by) = line.points
    dx, dy = bx - ax, by - ay
    t = ((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-12)
    return -0.05 <= t <= 1.05


def _check_labels(stream: StreamConfig, labels: Sequence[str], where: str) -> None:
    known = set(labels)
    named = [(f"zones.{n}.labels", z.labels or []) for n, z in stream.zones.items()]
    named += [(f"lines.{n}.labels", ln.labels or []) for n, ln in stream.lines.items()]
    named += [("min_area", list(stream.min_area)), ("max_area", list(stream.max_area))]
    for path, names in named:
        for label in names:
            if label not in known:
                raise EdgedError(f"{where}.{path}: {label!r} is not a label of the model"
                                 f"{did_you_mean(label, known)}")


def _load_counts(path: Path | None, lines: dict[str, LineConfig]
                 ) -> dict[str, dict[str, dict[str, int]]]:
    """Line counts kept by an earlier run (lines no longer configured are dropped)."""
    counts: dict[str, dict[str, dict[str, int]]] = {name: {} for name in lines}
    if path is None or not path.exists():
        return counts
    try:
        kept = json.loads(path.read_text())
        for name in lines:
            for label, per in kept.get(name, {}).items():
                counts[name][str(label)] = {str(d): int(n) for d, n in per.items()
                                            if d in lines[name].directions}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("line counts in %s are unreadable (%s): counting from zero", path, exc)
        return {name: {} for name in lines}
    return counts


def check_line_names(names: Iterable[str], configured: Iterable[str]) -> list[str]:
    """``names`` if every one is a configured line; raises ``EdgedError`` naming the first
    that is not."""
    configured = list(configured)
    names = list(names)
    for name in names:
        if name not in configured:
            raise EdgedError(f"reset_lines: no line {name!r}{did_you_mean(name, configured)}"
                             f" (lines: {', '.join(configured) or 'none'})")
    return names

