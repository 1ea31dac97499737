"""Planned models made ready for the daemon: optimized on this machine, re-sorted, cached.

A planned model (``edged.plan`` metadata) runs under the lean session options, which keep the
planned order and allocate as simulated but switch graph optimizations off. To win back the
fused and blocked kernels, the model is optimized once on the machine that runs it and re-sorted
into its planned order (``session.optimize_for_lean``), in a child process so the daemon's own
peak memory never holds the optimizer's copies, and cached under a key of the file's bytes,
ONNX Runtime's version and the CPU's features. A model without a plan is recorded as such
(``.none``), so later starts know at once.

``python -m edged.schedule.prepare MODEL OUT [--any]`` is the child's entry point.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

from edged.errors import EdgedError
from edged.fetch import atomic_file


def _cpu_features() -> str:
    """The CPU's model and feature flags: optimized models depend on its vector width."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.split(":")[0].strip() in
            ("flags", "Features", "model name", "CPU part")]
    return "\n".join(dict.fromkeys(keep)) + os.uname().machine


def cache_key(path: Path, any_model: bool) -> str:
    """What the prepared file depends on: the model's bytes, ONNX Runtime, the CPU, the mode."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(f"{ort.__version__}\n{_cpu_features()}\n{any_model}".encode())
    return digest.hexdigest()[:20]


def mentions_plan(path: Path) -> bool:
    """Whether the file holds the bytes of the ``edged.plan`` key: a cheap test that never
    misses a planned model (``prepare`` checks the metadata itself)."""
    try:
        with path.open("rb") as stream, mmap.mmap(stream.fileno(), 0,
                                                  access=mmap.ACCESS_READ) as view:
            return view.find(b"edged.plan") >= 0
    except (OSError, ValueError):  # unreadable or empty: the normal loader says why
        return False


def lean_model(path: Path, cache_dir: Path, any_model: bool = False) -> Path | None:
    """The prepared lean file for ``path`` (made on first use), or ``None`` when the model has
    no plan and ``any_model`` is not set (then it runs as it is)."""
    if not any_model and not mentions_plan(path):
        return None
    folder = cache_dir / "lean"
    ready = folder / f"{path.stem}-{cache_key(path, any_model)}.onnx"
    unplanned = ready.with_suffix(".none")
    if ready.is_file():
        return ready
    if unplanned.is_file():
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgedError(f"{folder}: cannot create the lean model cache ({exc.strerror})"
                         ) from None
    command = [sys.executable, "-m", "edged.schedule.prepare", str(path), str(ready)]
    done = subprocess.run(command + (["--any"] if any_model else []), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no message"]
        raise EdgedError(f"{path}: cannot prepare the lean session ({lines[-1][:300]})")
    return ready if ready.is_file() else None


def prepare(path: Path, output: Path, any_model: bool) -> None:
    """Write ``output``: ``path`` optimized here and re-sorted into its planned order (a model
    without a plan: into its best order, if ``any_model``; else only a ``.none`` marker)."""
    import onnx

    from edged.schedule.graph import PLAN_KEY, OpGraph, reordered_model
    from edged.schedule.order import best_order
    from edged.schedule.session import is_quantized, optimize_for_lean, runtime_graph

    model = onnx.load(str(path))
    planned = any(p.key == PLAN_KEY for p in model.metadata_props)
    if not planned and not any_model:
        output.with_suffix(".none").touch()
        return
    graph = OpGraph.from_model(model, str(path))
    if is_quantized(graph):  # int8: only reordered, in the graph ORT makes of it here
        runtime = runtime_graph(graph)
        lean = reordered_model(runtime, best_order(runtime, time_limit=2.0).order)
    else:
        order = graph.file_order if planned else best_order(graph, time_limit=2.0).order
        lean = optimize_for_lean(graph, order)
    with atomic_file(output) as f:
        f.write(lean.SerializeToString())


if __name__ == "__main__":
    try:
        prepare(Path(sys.argv[1]), Path(sys.argv[2]), "--any" in sys.argv[3:])
    except EdgedError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        sys.exit(2)
