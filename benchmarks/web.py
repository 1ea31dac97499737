"""What watching costs: the detect pipeline's throughput with no preview client, one and three,
side by side in one run.

    .venv/bin/python benchmarks/web.py [--model ssd.onnx] [--clip bikes.mp4] [--rounds 3]

The daemon runs in this process with the web view on, reading the clip as fast as inference
goes (every frame, looped, 1 inference thread); viewers are ``curl`` processes reading
``/streams/<name>/mjpeg`` (at the default 5 frames/s preview cap). Windows of 6 s with 0, 1 and
3 viewers take turns; the frames processed per second in each are compared with the windows
without viewers.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINDOW = 6.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a detect model (default: the tests' converted SSD)")
    parser.add_argument("--clip", default=str(REPO.parent / "shared" / "samples" / "bikes.mp4"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or next(iter(sorted(glob.glob(
        str(Path.home() / ".cache/edged-tests/*/ssd_mobilenet_v2_coco.onnx")))), None)
    if model is None:
        sys.exit("benchmarks/web.py: no detect model: pass --model")
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.broker import free_port

    from edged.config import parse_config
    from edged.server import Server

    port = free_port()
    config = parse_config({"device": "bench", "stdout": False, "state_dir": "/tmp/edged-bench",
                           "mqtt": {"host": "127.0.0.1", "port": free_port()},
                           "http": {"port": port},
                           "streams": [{"name": "s", "task": "detect", "model": model,
                                        "threads": 1, "source": {
                                            "uri": args.clip, "realtime": False,
                                            "loop": True}}]})
    server = Server(config)
    server.start()
    pipeline = server.streams["s"].pipeline
    url = f"http://127.0.0.1:{port}/streams/s/mjpeg"
    rates: dict[int, list[float]] = {0: [], 1: [], 3: []}
    try:
        time.sleep(3)  # warm up
        for round_ in range(args.rounds):
            for viewers in (0, 1, 3):
                clients = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", url])
                           for _ in range(viewers)]
                time.sleep(1.0)  # connected and streaming
                start, before = time.monotonic(), pipeline.processed
                time.sleep(WINDOW)
                rates[viewers].append((pipeline.processed - before) / (time.monotonic() - start))
                for client in clients:
                    client.terminate()
                    client.wait()
                print(f"\rround {round_ + 1}/{args.rounds}: {viewers} viewer(s) "
                      f"{rates[viewers][-1]:.1f} frames/s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        server.stop()
    base = statistics.median(rates[0])
    for viewers, values in rates.items():
        rate = statistics.median(values)
        print(f"{viewers} viewer(s): {rate:.1f} frames/s ({rate / base * 100:.1f} % of none; "
              f"windows: {', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
