"""int8 vs fp32 side by side: latency ratio with 1 and 2 threads, and agreement, per model.

Both models of a pair run in the same process, taking turns in short blocks on the same real
frame, so the machine's load hits both alike; the ratio is the median of the ratios int8 / fp32
of adjacent blocks.
fp32 runs with ONNX Runtime's default session options (only the thread count set), as does int8.
Agreement is measured on the 14 held-out frames (scikit-image's chelsea, astronaut, coffee,
rocket and bikes.mp4 frames 9, 34, ..., 234). The CPU's integer instructions and the load
average (before and after) are printed with the table: int8 ratios depend on the first (x86
without VNNI multiplies int8 at about half the rate of VNNI or ARM dot-product cores) and are
only as good as the second allows.

    python benchmarks/int8.py [--weights ../shared/weights] [--samples ../shared/samples]
                              [--models NAME ...] [--runs 40] [--dir CACHE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.model import load_model  # noqa: E402
from edged.preprocess import Preprocessor  # noqa: E402
from models.agreement import held_out_frames  # noqa: E402
from models.convert import convert_catalog_model  # noqa: E402

MODELS = ("mobilenet_v2_imagenet", "ssd_mobilenet_v2_coco", "deeplabv3_mnv2_voc")
BLOCK = 4  # timed runs of one model before the other takes its turn
TARGETS = {"mobilenet_v2_imagenet": 0.45, "ssd_mobilenet_v2_coco": 0.42,
           "deeplabv3_mnv2_voc": 0.6}


def session(path: Path, threads: int) -> ort.InferenceSession:
    """ONNX Runtime defaults, ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_ratio(fp32: Path, int8: Path, tensor: np.ndarray, threads: int,
                 runs: int) -> tuple[float, float, float, float]:
    """Median fp32 ms, median int8 ms, the median ratio int8 / fp32 of adjacent blocks of wall
    time and that of CPU time (one thread only: then ONNX Runtime computes on the calling
    thread, and its CPU time leaves out the waits a loaded machine adds to the wall time).

    The models take turns in blocks of ``BLOCK`` timed runs, each after one untimed run: with
    two threads each session's pool spins for a while after its run, and a model timed right
    after the other would share the cores with those spinning threads."""
    sessions = [session(fp32, threads), session(int8, threads)]
    feed = {"image": tensor}
    for s in sessions:  # warm-up: first runs allocate and pack weights
        for _ in range(3):
            s.run(None, feed)
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for i in range(max(1, runs // BLOCK)):
        order = (0, 1) if i % 2 == 0 else (1, 0)  # neither model always runs second
        for k in order:
            sessions[k].run(None, feed)
            times, cpu_times = [], []
            for _ in range(BLOCK):
                start, start_cpu = time.perf_counter(), time.thread_time()
                sessions[k].run(None, feed)
                cpu_times.append(time.thread_time() - start_cpu)
                times.append(time.perf_counter() - start)
            wall[k].append(statistics.median(times))
            cpu[k].append(statistics.median(cpu_times))
    ratios = [b / a for a, b in zip(*wall, strict=True)]
    cpu_ratios = [b / a for a, b in zip(*cpu, strict=True)] if threads == 1 else [float("nan")]
    return (1e3 * statistics.median(wall[0]), 1e3 * statistics.median(wall[1]),
            statistics.median(ratios), statistics.median(cpu_ratios))


def int8_instructions() -> str:
    """What the CPU offers ONNX Runtime's integer kernels (x86 flags, else the machine)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features"))).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return platform.machine()
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return f"{platform.machine()} {' '.join(f for f in wanted if f in flags) or 'no int8 dot'}"


def load() -> str:
    """The 1-minute load average against the CPU count."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def convert(name: str, directory: Path, weights: Path, precision: str) -> Path:
    """The converted model, made once per cache directory and version of the converter."""
    digest = hashlib.sha256(b"".join(p.read_bytes()
                                     for p in sorted(REPO.glob("models/**/*.py")))).hexdigest()
    path = directory / digest[:12] / f"{name}.{precision}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        convert_catalog_model(name, path, mirror=weights, precision=precision)
    return path


def arguments(doc: str) -> argparse.ArgumentParser:
    """The int8 benchmarks' common options: checkpoints, clips, models and the model cache."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared" / "weights")
    parser.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "samples")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/edged-int8-bench"),
                        help="where converted models are kept between runs")
    return parser


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table on stdout."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=40,
                        help="timed runs of each model per thread count")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    frames = held_out_frames(args.samples / "bikes.mp4")
    before = load()

    from models.agreement import agreement_report

    header = ("model", "fp32 ms 1t", "int8 ms 1t", "ratio 1t", "CPU-time ratio 1t", "fp32 ms 2t",
              "int8 ms 2t", "ratio 2t", "target", "agreement")
    rows = []
    for name in args.models:
        fp32, int8 = (convert(name, args.dir, args.weights, p) for p in ("fp32", "int8"))
        # A real frame (astronaut), preprocessed as the daemon does.
        tensor = Preprocessor(load_model(fp32, 1).info.input)(dict(frames)["astronaut"])[0]
        cells = [name]
        for threads in (1, 2):
            a, b, ratio, cpu_ratio = paired_ratio(fp32, int8, tensor.copy(), threads, args.runs)
            cells += [f"{a:.1f}", f"{b:.1f}", f"{ratio:.2f}x"]
            if threads == 1:
                cells.append(f"{cpu_ratio:.2f}x")
        cells.append(f"<= {TARGETS[name]}x")
        cells.append(agreement_report(fp32, int8, frames, threads=2)["summary"])
        rows.append(cells)
        print(" | ".join(cells), file=sys.stderr, flush=True)

    print(f"CPU: {int8_instructions()}; load average {before} before, {load()} after")
    print()
    print_table(header, rows)


if __name__ == "__main__":
    main()
