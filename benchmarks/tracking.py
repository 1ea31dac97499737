"""What tracking, zones and lines cost: per frame for 1 / 10 / 30 objects, and the detect
pipeline's throughput with them on against off, side by side in one run.

    .venv/bin/python benchmarks/tracking.py [--model ssd.onnx] [--clip bikes.mp4]

Per-frame cost: synthetic objects walking across a 640x360 frame at 5 frames/s through the
tracker alone, and through the whole scene (scene-cut check, tracker, 2 zones, 2 lines);
median and p99 over 600 frames. Throughput: the clip's frames decoded once, then each frame
through both pipelines (the plain detect stream, and the same with zones and lines), the order
alternating frame by frame; the ratio of their total processing times.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edged.config import parse_config
from edged.frame import Frame
from edged.postprocess import Detection, Detections
from edged.scene import Scene
from edged.tracking import Observation, Tracker

REPO = Path(__file__).resolve().parent.parent
SCENE = {
    "zones": {"left": {"polygon": [[0, 0.3], [0.45, 0.3], [0.45, 1], [0, 1]]},
              "right": {"polygon": [[0.55, 0.3], [1, 0.3], [1, 1], [0.55, 1]]}},
    "lines": {"middle": {"points": [[0.5, 0], [0.5, 1]]},
              "across": {"points": [[0, 0.6], [1, 0.6]]}},
}
LABELS = ("background", "person", "car")


def walkers(n: int, frames: int, seed: int = 0) -> list[list[tuple[float, ...]]]:
    """Per frame, the boxes of ``n`` objects bouncing around the frame."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.1, 0.9, (n, 2))
    vel = rng.uniform(-0.02, 0.02, (n, 2))
    out = []
    for _ in range(frames):
        pos += vel
        vel[(pos < 0.05) | (pos > 0.95)] *= -1
        out.append([(x - 0.03, y - 0.08, x + 0.03, y + 0.08) for x, y in pos])
    return out


def per_frame_cost(n: int, frames: int = 600) -> tuple[list[float], list[float]]:
    """Milliseconds per frame: the tracker alone, and the whole scene."""
    boxes = walkers(n, frames)
    tracker = Tracker(high=0.5, low=0.1, max_age=2.0)
    alone = []
    for i, frame_boxes in enumerate(boxes):
        observations = [Observation("person", 0.8, b) for b in frame_boxes]
        start = time.perf_counter()
        tracker.update(observations, i / 5)
        alone.append((time.perf_counter() - start) * 1000)
    stream = parse_config({"stdout": True, "streams": [{
        "name": "s", "task": "detect", "source": "/dev/video0", **SCENE}]}).streams[0]
    scene = Scene(stream, LABELS, "bench")
    image = np.full((360, 640, 3), 100, np.uint8)
    whole = []
    for i, frame_boxes in enumerate(boxes):
        dets = Detections([Detection("person", 1, 0.8, tuple(v * 640 for v in b), b)
                           for b in frame_boxes])
        frame = Frame(image, i, 1.8e9 + i / 5, i / 5)
        start = time.perf_counter()
        scene.update(frame, dets)
        whole.append((time.perf_counter() - start) * 1000)
    return alone, whole


class NullSink:
    """Takes every message and drops it."""

    def publish(self, topic_suffix: str, payload: object, retain: bool = False) -> None:
        """Nothing is kept."""

    def close(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict:
        return {}


def throughput(model_path: str, clip: str) -> tuple[float, float, int]:
    """(seconds without, seconds with zones and lines, frames) over the clip's frames."""
    from edged.model import load_model
    from edged.pipeline import Pipeline

    capture = cv2.VideoCapture(clip)
    images = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        images.append(image)
    if not images:
        sys.exit(f"benchmarks/tracking.py: no frames in {clip}")
    model = load_model(model_path, threads=1)
    base = {"name": "s", "task": "detect", "model": model_path, "source": clip}
    plain = parse_config({"stdout": True, "streams": [base]}).streams[0]
    tracked = parse_config({"stdout": True, "streams": [{**base, **SCENE}]}).streams[0]
    pipelines = [Pipeline(plain, model, [NullSink()], "bench"),
                 Pipeline(tracked, model, [NullSink()], "bench")]
    spent = [0.0, 0.0]
    for i, image in enumerate(images * 2):
        frame = Frame(image, i, time.time(), time.monotonic())
        for which in ((0, 1) if i % 2 else (1, 0)):
            start = time.perf_counter()
            pipelines[which].process(frame)
            spent[which] += time.perf_counter() - start
        if i % 50 == 0:
            print(f"\rframe {i}/{2 * len(images)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return spent[0], spent[1], 2 * len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a detect model (default: the tests' converted SSD)")
    parser.add_argument("--clip", default=str(REPO.parent / "shared" / "samples" / "bikes.mp4"))
    args = parser.parse_args()
    print("objects  tracker median / p99 ms   whole scene median / p99 ms")
    for n in (1, 10, 30):
        alone, whole = per_frame_cost(n)
        p99 = lambda v: float(np.percentile(v, 99))  # noqa: E731
        print(f"{n:7d}  {statistics.median(alone):6.3f} / {p99(alone):6.3f}"
              f"           {statistics.median(whole):6.3f} / {p99(whole):6.3f}")
    model = args.model or next(iter(sorted(glob.glob(
        str(Path.home() / ".cache/edged-tests/*/ssd_mobilenet_v2_coco.onnx")))), None)
    if model is None:
        print("throughput: skipped (no detect model: pass --model)")
        return 0
    off, on, frames = throughput(model, args.clip)
    print(f"throughput over {frames} frames, 1 inference thread: without {frames / off:.1f} "
          f"frames/s, with tracking, 2 zones, 2 lines {frames / on:.1f} frames/s "
          f"({off / on * 100:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
