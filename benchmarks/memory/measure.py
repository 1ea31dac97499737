"""Memory benchmark: each configuration of each model in its own process, side by side.

For every (model, configuration) a fresh Python process runs under the LD_PRELOAD heap counter
(``malloc_counter.c``, compiled with gcc into a cache folder on first use) and reports:
computed peak (``edged.schedule`` simulation; only meaningful where ONNX Runtime follows the
simulated buffer rules), measured per-inference peak heap (peak minus live bytes before
``run``; the input array belongs to the caller and is not counted), heap after session creation,
heap held after the runs (session plus whatever an arena keeps), whole-process peak RSS and
median latency.

Configurations:
  default         ONNX Runtime defaults (all optimizations, CPU arena on)
  arena-off       all optimizations, CPU arena off
  lean            the file as it is, under edged's lean session options (file order, no pooling)
  lean-optimized  optimized offline at ORT_ENABLE_ALL, re-sorted into the best order found, lean
  planned:SIZE    rewritten by ``edged plan --budget SIZE``, then prepared as the daemon does
                  (optimized offline, re-sorted into the planned order, lean)

    python benchmarks/memory/measure.py model.onnx [more.onnx] [--config lean ...] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "malloc_counter.c"
CONFIGS = ("default", "arena-off", "lean", "lean-optimized")


def counter_library() -> Path:
    """The compiled counter, built with gcc on first use into a cache keyed by its source."""
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edged"
    library = cache / f"malloc_counter-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(partial),
                        str(SOURCE)], check=True)
        partial.rename(library)
    return library


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: the latter carries the parent's
    peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(spec: dict) -> dict:
    """Runs inside the measured process (LD_PRELOAD set): one session, several inferences."""
    import numpy as np
    import onnxruntime as ort

    from edged.schedule.session import lean_session_options

    counter = ctypes.CDLL(spec["library"])
    for name in ("mc_live", "mc_peak"):
        getattr(counter, name).restype = ctypes.c_int64
    if spec["lean"]:
        options = lean_session_options(spec["threads"])
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.enable_cpu_mem_arena = spec["arena"]
        options.log_severity_level = 3
    before = counter.mc_live()
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    session_heap = counter.mc_live() - before
    feeds = {}
    for value in session.get_inputs():
        dtype = np.float32 if value.type == "tensor(float)" else np.uint8
        feeds[value.name] = np.random.default_rng(0).random(value.shape).astype(dtype)
    for _ in range(2):  # warm-up: lazy allocations (thread pool, caches) are not per inference
        session.run(None, feeds)
    peaks, times = [], []
    for _ in range(spec["runs"]):
        counter.mc_reset()
        base = counter.mc_live()
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        times.append(time.perf_counter() - start)
        peaks.append(counter.mc_peak() - base)
        del outputs
    return {"session_heap": session_heap, "run_peak": int(statistics.median(peaks)),
            "run_peak_max": max(peaks),
            "held": counter.mc_live() - before,
            "rss_peak": _peak_rss(),
            "latency_ms": statistics.median(times) * 1000}


def measure(model: str | Path, config: str, threads: int = 1, runs: int = 10,
            time_limit: float = 10.0) -> dict:
    """Measure one configuration of ``model`` in a fresh process; returns the figures (bytes,
    milliseconds) with the computed peak of the graph ONNX Runtime runs."""
    from edged.schedule.graph import OpGraph, load_graph
    from edged.schedule.memory import MemoryModel
    from edged.schedule.order import best_order
    from edged.schedule.session import optimize_for_lean

    if config not in CONFIGS and not config.startswith("planned:"):
        raise ValueError(f"unknown configuration {config!r} (one of {', '.join(CONFIGS)}, "
                         "planned:SIZE)")
    graph = load_graph(model)
    nodes = len(graph)
    with tempfile.TemporaryDirectory(prefix="edged-measure-") as tmp:
        path = Path(model)
        if config == "lean-optimized" or config.startswith("planned:"):
            import onnx

            if config.startswith("planned:"):
                from edged.schedule.plan import parse_size, plan_for_budget

                planned, rewritten = plan_for_budget(graph, parse_size(config.split(":", 1)[1]))
                graph = OpGraph.from_model(rewritten, str(model))  # already in planned order
                order, nodes = graph.file_order, len(graph)
            else:
                order = best_order(graph, time_limit=time_limit).order
            path = Path(tmp) / "lean.onnx"
            onnx.save(optimize_for_lean(graph, order, threads), str(path))
            graph = OpGraph.from_model(onnx.load(str(path)), str(path))
        computed = MemoryModel(graph).simulate(graph.file_order).peak
        spec = {"model": str(path), "threads": threads, "runs": runs,
                "lean": config.startswith(("lean", "planned")), "arena": config == "default",
                "library": str(counter_library())}
        env = dict(os.environ, LD_PRELOAD=spec["library"])
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model} ({config}) failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": Path(model).name, "config": config, "computed": computed, "nodes": nodes,
            **result}


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--config", action="append", metavar="CONFIG",
                        help=f"configuration to measure: {', '.join(CONFIGS)} or planned:SIZE "
                        "(repeatable; default: the four plain ones)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if not args.models:
        parser.error("give at least one model")
    if not args.json:
        print(f"{'model':28} {'config':15} {'nodes':>5} {'computed':>9} {'run peak':>9} "
              f"{'session':>9} {'held':>9} {'peak RSS':>9} {'latency':>9}\n{'':28} {'':15} "
              f"{'':>5} {'MB':>9} {'MB':>9} {'MB':>9} {'MB':>9} {'MB':>9} {'ms':>9}")
    for model in args.models:
        for config in args.config or CONFIGS:
            row = measure(model, config, args.threads, args.runs)
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            print(f"{row['model'][:28]:28} {config:15} {row['nodes']:>5} "
                  f"{_mb(row['computed']):>9} "
                  f"{_mb(row['run_peak']):>9} {_mb(row['session_heap']):>9} "
                  f"{_mb(row['held']):>9} {_mb(row['rss_peak']):>9} {row['latency_ms']:9.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
