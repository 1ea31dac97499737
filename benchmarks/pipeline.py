"""Full pipeline vs bare inference, side by side, on bikes.mp4 with the SSD detector.

    python benchmarks/pipeline.py [--model FILE] [--clip bikes.mp4] [--threads 2] [--rounds 2]

Each measurement runs in a fresh child process (so peak RSS is its own):
- ``bare``: ``session.run`` on one preprocessed frame, as many times as the clip has frames;
- ``pipeline``: the daemon's ``Pipeline`` on the clip read as fast as it is consumed (every
  frame, no pacing): decode, preprocess, inference, postprocess, result JSON, a sink.
Prints frames/s of both, the pipeline's share of bare throughput (target >= 90 %),
capture-to-publish latency p50 / p99 and peak RSS, and draws the figures into a PNG with
OpenCV (``--plot``, default out/pipeline.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIP = REPO.parent / "shared" / "samples" / "bikes.mp4"
TARGET = 0.90


class LatencySink:
    """A sink that notes capture-to-publish latency of each result (nothing else)."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self._lock = threading.Lock()

    def publish(self, topic_suffix: str, payload: bytes | dict, retain: bool = False) -> None:
        if topic_suffix.endswith("/result"):
            now = time.monotonic()
            json.dumps(payload)  # what a real sink pays to serialize it
            with self._lock:
                self.latencies_ms.append((now - payload["frame"]["monotonic"]) * 1000)

    def close(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, Any]:
        return {"results": len(self.latencies_ms)}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bare(model_path: str, clip: str, threads: int) -> dict[str, Any]:
    from edged.model import load_model
    from edged.preprocess import Preprocessor

    model = load_model(model_path, threads=threads)
    capture = cv2.VideoCapture(clip)
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, image = capture.read()
    assert ok, f"cannot read {clip}"
    tensor, _ = Preprocessor(model.info.input)(image)
    for _ in range(5):  # warm-up
        model.run(tensor)
    start = time.perf_counter()
    for _ in range(frames):
        model.run(tensor)
    elapsed = time.perf_counter() - start
    return {"frames": frames, "fps": frames / elapsed, "peak_rss_mb": peak_rss_mb()}


def run_pipeline(model_path: str, clip: str, threads: int) -> dict[str, Any]:
    from edged.config import parse_config
    from edged.model import load_model
    from edged.pipeline import Pipeline
    from edged.preprocess import Preprocessor

    model = load_model(model_path, threads=threads)
    capture = cv2.VideoCapture(clip)
    ok, image = capture.read()
    capture.release()
    tensor, _ = Preprocessor(model.info.input)(image)
    for _ in range(5):  # the same warm-up as the bare loop
        model.run(tensor)
    config = parse_config({"device": "bench", "stdout": True, "streams": [{
        "name": "bikes", "task": "detect", "model": model_path, "threads": threads,
        "source": {"uri": clip, "realtime": False}}]}).streams[0]
    sink = LatencySink()
    pipeline = Pipeline(config, model, [sink], "bench")
    start = time.perf_counter()
    pipeline.start()
    while not pipeline.finished:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    pipeline.stop()
    latency = np.array(sink.latencies_ms)
    return {"frames": pipeline.processed, "fps": pipeline.processed / elapsed,
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p99_ms": float(np.percentile(latency, 99)),
            "peak_rss_mb": peak_rss_mb()}


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its figures."""
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--clip",
           str(args.clip), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """A small bar chart of frames/s (OpenCV: no plotting library on the device)."""
    width, height, margin = 640, 360, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
    fps = {mode: float(np.median([r["fps"] for r in runs])) for mode, runs in rows.items()}
    top = max(fps.values()) * 1.15
    cv2.putText(canvas, title, (margin, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                cv2.LINE_AA)
    colours = {"bare": (180, 120, 40), "pipeline": (60, 160, 60)}
    bar = 140
    for i, (mode, value) in enumerate(fps.items()):
        x = margin + 60 + i * (bar + 120)
        y = int(height - margin - (height - 2 * margin) * value / top)
        cv2.rectangle(canvas, (x, y), (x + bar, height - margin), colours[mode], -1)
        cv2.putText(canvas, f"{value:.1f} fps", (x + 20, y - 10), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, mode, (x + 30, height - margin + 25), cv2.FONT_HERSHEY_SIMPLEX,
                    0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(canvas, (margin, height - margin), (width - margin, height - margin), (0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SSD ONNX file (default: ssd_mobilenet_v2_coco from "
                        "the model cache)")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--plot", type=Path, default=REPO / "out" / "pipeline.png")
    parser.add_argument("--child", choices=("bare", "pipeline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from edged.catalog import resolve_model

        args.model = str(resolve_model("ssd_mobilenet_v2_coco"))
    if args.child:
        run = run_bare if args.child == "bare" else run_pipeline
        print(json.dumps(run(args.model, str(args.clip), args.threads)))
        return

    rows: dict[str, list[dict[str, Any]]] = {"bare": [], "pipeline": []}
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
        for mode in rows:
            rows[mode].append(child(mode, args))
    bare = float(np.median([r["fps"] for r in rows["bare"]]))
    pipe = float(np.median([r["fps"] for r in rows["pipeline"]]))
    p50 = float(np.median([r["latency_p50_ms"] for r in rows["pipeline"]]))
    p99 = float(np.median([r["latency_p99_ms"] for r in rows["pipeline"]]))
    print(f"SSD-MobileNetV2 on {args.clip.name}, {args.threads} threads, {os.cpu_count()} "
          f"cores, median of {args.rounds} rounds")
    print(f"{'':28}{'bare session.run':>18}{'full pipeline':>16}")
    print(f"{'frames/s':28}{bare:>18.1f}{pipe:>16.1f}")
    print(f"{'capture-to-publish p50 ms':28}{'-':>18}{p50:>16.1f}")
    print(f"{'capture-to-publish p99 ms':28}{'-':>18}{p99:>16.1f}")
    print(f"{'peak RSS MB':28}{max(r['peak_rss_mb'] for r in rows['bare']):>18.0f}"
          f"{max(r['peak_rss_mb'] for r in rows['pipeline']):>16.0f}")
    share = pipe / bare
    print(f"pipeline / bare: {share * 100:.0f} % (target >= {TARGET * 100:.0f} %: "
          f"{'met' if share >= TARGET else 'NOT met'})")
    plot(rows, args.plot, f"SSD on {args.clip.name}, {args.threads} threads: pipeline "
         f"{share * 100:.0f} % of bare")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
