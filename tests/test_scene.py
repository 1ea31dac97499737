"""Zones, lines, masks, stationary objects and events, on synthetic detections fed through the
real tracker (frames at 5 per second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import stream_settings

from edged.errors import EdgedError
from edged.frame import Frame
from edged.postprocess import Detection, Detections
from edged.scene import DetectionFilter, Scene, inside

LABELS = ("background", "person", "car")
IMAGE = np.full((100, 200, 3), 90, np.uint8)
DT = 0.2


def det(box: tuple[float, float, float, float], label: str = "person",
        score: float = 0.9) -> Detection:
    pixels = tuple(v * s for v, s in zip(box, (200, 100, 200, 100), strict=True))
    return Detection(label, LABELS.index(label), score, pixels, box)


def feed(scene: Scene, boxes_per_frame: list[list[Detection]], start: int = 0
         ) -> list[Any]:
    updates = []
    for i, dets in enumerate(boxes_per_frame, start):
        frame = Frame(IMAGE, i, 1_800_000_000.0 + i * DT, 1000.0 + i * DT)
        updates.append(scene.update(frame, Detections(dets)))
    return updates


def events(updates: list[Any], kind: str | None = None) -> list[dict]:
    found = [e for u in updates for e in u.events]
    return [e for e in found if kind is None or e["type"] == kind]


def walk(x0: float, x1: float, frames: int, y: float = 0.5, jitter: float = 0.0,
         seed: int = 0) -> list[list[Detection]]:
    rng = np.random.default_rng(seed)
    out = []
    for x in np.linspace(x0, x1, frames):
        dx = rng.uniform(-jitter, jitter) if jitter else 0.0
        out.append([det((x + dx - 0.03, y - 0.2, x + dx + 0.03, y))])
    return out


def test_a_line_counts_each_crossing_once_despite_jitter(tmp_path: Path) -> None:
    """A person walks to the line, dithers on it (jitter inside the margin) for 5 s, crosses,
    and comes back later: one count each way."""
    counts = tmp_path / "lines" / "cam.json"
    stream = stream_settings(lines={"gate": {"points": [[0.5, 0], [0.5, 1]],
                                             "directions": ["westward", "eastward"]}})
    scene = Scene(stream, LABELS, "dev", counts)
    frames = walk(0.2, 0.49, 8) + walk(0.49, 0.51, 25, jitter=0.015) + walk(0.52, 0.8, 8)
    frames += walk(0.8, 0.2, 12)
    updates = feed(scene, frames)
    final = [u.lines["gate"] for u in updates if "gate" in u.lines][-1]
    assert final["counts"] == {"person": {"eastward": 1, "westward": 1}}
    assert final["total"] == {"westward": 1, "eastward": 1}
    # Kept on disk: a new scene (a restart) starts from them; a reset zeroes them.
    assert json.loads(counts.read_text())["gate"]["person"] == {"eastward": 1, "westward": 1}
    again = Scene(stream, LABELS, "dev", counts)
    assert again.line_state("gate", 0)["total"] == {"westward": 1, "eastward": 1}
    assert again.reset_lines(["gate"], 0)["gate"]["total"] == {"westward": 0, "eastward": 0}
    assert json.loads(counts.read_text())["gate"] == {}


def test_the_first_direction_is_left_to_right_of_the_line() -> None:
    stream = stream_settings(lines={"gate": {"points": [[0.5, 0], [0.5, 1]]}})
    scene = Scene(stream, LABELS, "dev")
    # The line points down the frame: walking it, your left hand is on the frame's right, so
    # an object moving right crosses from its right to its left: the second direction.
    feed(scene, walk(0.3, 0.7, 10))
    assert scene.line_state("gate", 0)["total"] == {"in": 0, "out": 1}
    scene = Scene(stream_settings(lines={"gate": {"points": [[0.5, 1], [0.5, 0]]}}),
                  LABELS, "dev")
    feed(scene, walk(0.3, 0.7, 10))
    assert scene.line_state("gate", 0)["total"] == {"in": 1, "out": 0}


def test_zone_entry_and_exit_with_inertia_and_loitering() -> None:
    stream = stream_settings(zones={"porch": {"polygon": [[0.4, 0], [1, 0], [1, 1], [0.4, 1]],
                                              "inertia": 3, "loiter_after": 2}})
    scene = Scene(stream, LABELS, "dev")
    # Up to the edge, one frame just inside and back (no entry), then in for 3 s, then out.
    frames = walk(0.2, 0.38, 4) + walk(0.41, 0.41, 1) + walk(0.38, 0.38, 1)
    frames += walk(0.42, 0.6, 6) + walk(0.6, 0.6, 10) + walk(0.6, 0.2, 8) + walk(0.2, 0.2, 5)
    updates = feed(scene, frames)
    kinds = [(e["type"], e.get("zone")) for e in events(updates) if e.get("zone")]
    assert kinds == [("enter", "porch"), ("loiter", "porch"), ("leave", "porch")]
    enter = next(i for i, u in enumerate(updates) if any(e["type"] == "enter" for e in u.events))
    assert enter == 8  # the third frame in a row inside
    occupancy = [u.zones["porch"]["occupancy"] for u in updates if "porch" in u.zones]
    assert occupancy == [{"person": 1}, {}]
    leave = events(updates, "leave")[0]
    assert 3.0 < leave["seconds"] < 5.0


def test_zone_labels_and_anchor() -> None:
    stream = stream_settings(zones={"road": {"polygon": [[0, 0.6], [1, 0.6], [1, 1], [0, 1]],
                                             "labels": ["car"], "inertia": 1}})
    scene = Scene(stream, LABELS, "dev")
    # A person whose feet are on the road is not counted; a car is.
    updates = feed(scene, [[det((0.1, 0.5, 0.2, 0.8)), det((0.5, 0.5, 0.7, 0.8), "car")]] * 3)
    assert [u.zones["road"]["occupancy"] for u in updates if u.zones] == [{"car": 1}]


def test_a_stationary_object_stops_updating_and_holds_its_zones() -> None:
    stream = stream_settings(track={"stationary_after": 2, "update_interval": 0},
                             zones={"lot": {"polygon": [[0.4, 0], [0.6, 0], [0.6, 1], [0.4, 1]],
                                            "inertia": 1}})
    scene = Scene(stream, LABELS, "dev")
    # A car parks across the zone's edge: its bottom centre wobbles in and out of it.
    wobble = [[det((0.5 + (0.12 if i % 2 else 0.0) * (i > 15) - 0.1, 0.5, 0.6, 0.8), "car")]
              for i in range(40)]
    updates = feed(scene, [[det((0.45, 0.5, 0.55, 0.8), "car")]] * 15 + wobble)
    updated = events(updates, "update")
    assert updated and updated[0]["stationary"] is True
    assert len(updated) == 1, "a stationary object went on producing updates"
    assert not events(updates, "leave"), "a parked car flickered out of its zone"


def test_new_and_end_events_carry_the_track() -> None:
    scene = Scene(stream_settings(track={"max_age": 0.5}), LABELS, "dev")
    updates = feed(scene, walk(0.2, 0.4, 6) + [[]] * 5)
    new, end = events(updates, "new"), events(updates, "end")
    assert len(new) == 1 and len(end) == 1 and new[0]["track"] == end[0]["track"]
    assert end[0]["reason"] == "lost" and end[0]["label"] == "person"
    assert set(new[0]) >= {"schema", "device", "stream", "time", "track", "label", "score",
                           "first_seen", "last_seen", "box", "box_norm", "zones", "stationary"}
    assert new[0]["first_seen"] < new[0]["last_seen"]  # seen on the frame before confirming
    # The result's detections carry the track id once the track is confirmed.
    assert updates[0].detections.detections[0].track is None
    assert updates[2].detections.detections[0].track == new[0]["track"]


def test_masks_and_area_bounds() -> None:
    keep = DetectionFilter(stream_settings(
        masks=[[[0, 0], [0.3, 0], [0.3, 1], [0, 1]]], min_area={"person": 0.01},
        max_area={"car": 0.2}))
    found = keep(Detections([
        det((0.1, 0.2, 0.2, 0.6)),  # in the mask (a tree that looks like a person)
        det((0.5, 0.2, 0.51, 0.25)),  # too small to be a person here
        det((0.4, 0.1, 0.95, 0.9), "car"),  # too large: a shadow over the frame
        det((0.5, 0.2, 0.6, 0.6)),  # kept
    ]))
    assert [d.box_norm for d in found.detections] == [(0.5, 0.2, 0.6, 0.6)]
    assert inside(np.array([[0, 0], [1, 0], [0, 1]], float), 0.2, 0.2)
    assert not inside(np.array([[0, 0], [1, 0], [0, 1]], float), 0.8, 0.8)


def test_labels_are_checked_against_the_model() -> None:
    with pytest.raises(EdgedError, match=r"^streams\[0\]\.zones\.porch\.labels: 'persn' is not "
                                         r"a label of the model \(did you mean 'person'\?\)$"):
        Scene(stream_settings(zones={"porch": {"polygon": [[0, 0], [1, 0], [1, 1]],
                                               "labels": ["persn"]}}), LABELS, "dev",
              where="streams[0]")
