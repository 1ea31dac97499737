"""Full pipeline vs bare inference, side by side, on bikes.mp4 with the SSD detector.

    python benchmarks/pipeline.py [--model FILE] [--clip bikes.mp4] [--threads 2] [--blocks 20]

Throughput is measured in one process as ``--blocks`` pairs of short blocks, alternating:
- ``bare``: ``session.run`` on one preprocessed frame, in a loop, for ``--block-seconds``;
- ``pipeline``: a fresh daemon ``Pipeline`` on the clip read as fast as it is consumed (every
  frame, no pacing: decode, preprocess, inference, postprocess, result JSON, a sink), counted
  over the same time once its first frames are through, then stopped.
The ratio of each adjacent pair cancels the drift of a shared machine; the median of the pairs
is reported (target >= 90 %), with the time each frame costs besides inference (the difference
of the pair's frame periods) and the inference time per frame from which that cost stays
within the target. Capture-to-publish latency p50 / p99 and peak RSS come from one
run of each over the whole clip, each in a fresh process (so peak RSS is its own). A bar chart
is drawn with OpenCV (``--plot``, default out/pipeline.png).
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


def load(model_path: str, clip: str, threads: int) -> tuple[Any, np.ndarray]:
    """The model, warmed up on the clip's first frame, and that frame's input tensor."""
    from edged.model import load_model
    from edged.preprocess import Preprocessor

    model = load_model(model_path, threads=threads)
    capture = cv2.VideoCapture(clip)
    ok, image = capture.read()
    capture.release()
    if not ok:
        sys.exit(f"benchmarks/pipeline.py: {clip}: not a readable video file")
    tensor, _ = Preprocessor(model.info.input)(image)
    for _ in range(5):  # warm-up
        model.run(tensor)
    return model, tensor


def make_pipeline(model: Any, model_path: str, clip: str, threads: int,
                  loop: bool) -> tuple[Any, LatencySink]:
    """A daemon pipeline on ``clip`` (every frame, as fast as consumed) with a latency sink."""
    from edged.config import parse_config
    from edged.pipeline import Pipeline

    config = parse_config({"device": "bench", "stdout": True, "streams": [{
        "name": "bikes", "task": "detect", "model": model_path, "threads": threads,
        "source": {"uri": clip, "realtime": False, "loop": loop}}]}).streams[0]
    sink = LatencySink()
    return Pipeline(config, model, [sink], "bench"), sink


def wait_for_frames(pipeline: Any, count: int, timeout: float = 30.0) -> None:
    """Wait until ``pipeline`` has processed ``count`` frames; exit with its source's state if
    it does not within ``timeout`` (an unreadable clip is retried forever, as a camera is)."""
    deadline = time.monotonic() + timeout
    while pipeline.processed < count:
        if time.monotonic() > deadline:
            pipeline.stop()
            sys.exit(f"benchmarks/pipeline.py: no frames from {pipeline.config.source.uri} "
                     f"({pipeline.source_state}: {pipeline.source_detail})")
        time.sleep(0.001)


def run_bare(model_path: str, clip: str, threads: int) -> dict[str, Any]:
    """``session.run`` as many times as the clip has frames: peak RSS of inference alone."""
    model, tensor = load(model_path, clip, threads)
    capture = cv2.VideoCapture(clip)
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    for _ in range(frames):
        model.run(tensor)
    return {"peak_rss_mb": peak_rss_mb()}


def run_pipeline(model_path: str, clip: str, threads: int) -> dict[str, Any]:
    """The pipeline over the whole clip once: capture-to-publish latency and peak RSS."""
    model, _ = load(model_path, clip, threads)
    pipeline, sink = make_pipeline(model, model_path, clip, threads, loop=False)
    pipeline.start()
    wait_for_frames(pipeline, 1)
    while not pipeline.finished:
        time.sleep(0.005)
    pipeline.stop()
    latency = np.array(sink.latencies_ms)
    return {"latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p99_ms": float(np.percentile(latency, 99)), "peak_rss_mb": peak_rss_mb()}


def run_interleaved(model_path: str, clip: str, threads: int, blocks: int,
                    seconds: float) -> dict[str, Any]:
    """Frames/s of bare and pipeline blocks, alternating on one model (see module docstring)."""
    model, tensor = load(model_path, clip, threads)
    bare, pipe = [], []
    for block in range(blocks):
        pipeline, _ = make_pipeline(model, model_path, clip, threads, loop=True)
        pipeline.start()
        wait_for_frames(pipeline, 3)  # source opened, first frames through
        first, start = pipeline.processed, time.perf_counter()
        time.sleep(seconds)
        pipe.append((pipeline.processed - first) / (time.perf_counter() - start))
        pipeline.stop()  # nothing of the pipeline runs during the bare block
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.run(tensor)
            runs += 1
        bare.append(runs / (time.perf_counter() - start))
        print(f"[{block + 1}/{blocks}] bare {bare[-1]:.1f} frames/s, pipeline {pipe[-1]:.1f}",
              file=sys.stderr, flush=True)
    return {"bare_fps": bare, "pipeline_fps": pipe}


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its figures."""
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--clip",
           str(args.clip), "--threads", str(args.threads), "--blocks", str(args.blocks),
           "--block-seconds", str(args.block_seconds)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:  # the child said why on stderr
        sys.exit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(fps: dict[str, float], path: Path, title: str) -> None:
    """A small bar chart of frames/s (OpenCV: no plotting library on the device)."""
    width, height, margin = 640, 360, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
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
    parser.add_argument("--blocks", type=int, default=20, help="pairs of bare / pipeline blocks")
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--plot", type=Path, default=REPO / "out" / "pipeline.png")
    parser.add_argument("--child", choices=("bare", "pipeline", "interleaved"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from edged.catalog import resolve_model
        from edged.errors import EdgedError

        try:
            args.model = str(resolve_model("ssd_mobilenet_v2_coco"))
        except EdgedError as exc:
            sys.exit(f"benchmarks/pipeline.py: {exc}")
    if args.child == "interleaved":
        print(json.dumps(run_interleaved(args.model, str(args.clip), args.threads, args.blocks,
                                         args.block_seconds)))
        return
    if args.child:
        run = run_bare if args.child == "bare" else run_pipeline
        print(json.dumps(run(args.model, str(args.clip), args.threads)))
        return

    print(f"[1/3] throughput: {args.blocks} pairs of {args.block_seconds:g} s blocks",
          file=sys.stderr, flush=True)
    pairs = child("interleaved", args)
    bare_fps, pipe_fps = np.array(pairs["bare_fps"]), np.array(pairs["pipeline_fps"])
    print("[2/3] bare inference over the clip: peak RSS", file=sys.stderr, flush=True)
    bare = child("bare", args)
    print("[3/3] pipeline over the clip: latency, peak RSS", file=sys.stderr, flush=True)
    pipe = child("pipeline", args)
    share = pipe_fps / bare_fps
    median = float(np.median(share))
    threads = f"{args.threads} thread{'s' * (args.threads != 1)}"
    print(f"SSD-MobileNetV2 on {args.clip.name}, {threads}, {os.cpu_count()} "
          f"cores, {args.blocks} alternating pairs of {args.block_seconds:g} s")
    print(f"{'':28}{'bare session.run':>18}{'full pipeline':>16}")
    print(f"{'frames/s (median)':28}{np.median(bare_fps):>18.1f}{np.median(pipe_fps):>16.1f}")
    print(f"{'capture-to-publish p50 ms':28}{'-':>18}{pipe['latency_p50_ms']:>16.1f}")
    print(f"{'capture-to-publish p99 ms':28}{'-':>18}{pipe['latency_p99_ms']:>16.1f}")
    print(f"{'peak RSS MB':28}{bare['peak_rss_mb']:>18.0f}{pipe['peak_rss_mb']:>16.0f}")
    print(f"pipeline / bare, median of pairs: {median * 100:.1f} % (quartiles "
          f"{np.percentile(share, 25) * 100:.1f}-{np.percentile(share, 75) * 100:.1f} %; "
          f"target >= {TARGET * 100:.0f} %: {'met' if median >= TARGET else 'NOT met'})")
    # What each frame costs besides inference (decode, preprocess, postprocess, publish) is
    # paid on the cores inference uses, so the share depends on how fast inference is here:
    # it reaches the target once inference takes (1 / TARGET - 1) of that cost or more.
    extra_ms = float(np.median(1000 / pipe_fps - 1000 / bare_fps))
    print(f"time per frame besides inference, median of pairs: {extra_ms:.2f} ms against "
          f"{1000 / np.median(bare_fps):.1f} ms of inference; >= {TARGET * 100:.0f} % from "
          f"{extra_ms * TARGET / (1 - TARGET):.1f} ms of inference per frame")
    plot({"bare": float(np.median(bare_fps)), "pipeline": float(np.median(pipe_fps))},
         args.plot, f"SSD on {args.clip.name}, {threads}: pipeline "
         f"{median * 100:.0f} % of bare")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
