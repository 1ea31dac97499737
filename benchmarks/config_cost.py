"""What the configuration layer costs on the device: memory of the validation library, and the
daemon's start time and peak RSS against an earlier revision, measured side by side.

    .venv/bin/python benchmarks/config_cost.py                   # libraries only
    .venv/bin/python benchmarks/config_cost.py --baseline ec1d61c --model M.onnx

Libraries: a fresh interpreter imports numpy and the standard library modules a config layer
uses, then the library, declares a three-field model and validates one document; the RSS and
RssAnon growth is that library's price (pydantic is measured when it is importable).
Daemon: ``edged run --task classify --source IMAGE --stdout`` from each tree in turn (the same
virtualenv; PYTHONPATH picks the tree), timed from spawn to the first result line; peak RSS
from the child's rusage. Runs alternate between the trees; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LIBRARY_PROBE = """
import json, os, re, sys, typing, dataclasses, numpy
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon")}
before = status()
if sys.argv[1] == "msgspec":
    from typing import Annotated
    import msgspec
    class Model(msgspec.Struct, forbid_unknown_fields=True):
        host: str
        port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
        rate: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    msgspec.convert({"host": "a", "port": 1884}, Model)
else:
    import pydantic
    class Model(pydantic.BaseModel, extra="forbid"):
        host: str
        port: int = pydantic.Field(1883, ge=1, le=65535)
        rate: float = pydantic.Field(1.0, gt=0, le=1000)
    Model.model_validate({"host": "a", "port": 1884})
after = status()
print(json.dumps({k: after[k] - before[k] for k in after}))
"""


def library_cost(name: str) -> dict[str, float] | None:
    """RSS / RssAnon growth (MB) for importing ``name`` and validating with one model."""
    probe = subprocess.run([sys.executable, "-c", LIBRARY_PROBE, name], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return None  # not installed here
    return json.loads(probe.stdout)


def daemon_run(tree: Path, model: Path, image_dir: Path) -> tuple[float, float]:
    """(seconds to the first result, peak RSS MB) of one ``edged run`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "--task", "classify", "--model", str(model),
         "--source", str(image_dir), "--stdout", "--fast",
         "--state-dir", str(image_dir.parent / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, cwd=tree)
    first = None
    for line in proc.stdout:
        if first is None and "/result" in line:
            first = time.monotonic() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if first is None or status != 0:
        raise SystemExit(f"config_cost: edged run from {tree} failed (status {status})")
    return first, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="git revision to compare the daemon with")
    parser.add_argument("--model", type=Path, help="a classify ONNX model (for the daemon runs)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, {os.uname().machine}")
    for name in ("msgspec", "pydantic"):
        cost = library_cost(name)
        print(f"{name:9s} " + ("not installed" if cost is None else
                               f"+{cost['VmRSS']:.1f} MB RSS, +{cost['RssAnon']:.1f} MB anonymous"))
    if not args.baseline:
        return 0
    if args.model is None:
        raise SystemExit("config_cost: --baseline needs --model (a classify ONNX file)")
    with tempfile.TemporaryDirectory(prefix="edged-config-cost-") as tmp:
        root = Path(tmp)
        baseline = root / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach",
                        str(baseline), args.baseline], check=True)
        try:
            import cv2  # the daemon runs need the project's virtualenv
            import numpy as np

            images = root / "images"
            images.mkdir()
            cv2.imwrite(str(images / "frame.png"), np.full((240, 320, 3), 128, np.uint8))
            trees = {args.baseline: baseline, "this tree": REPO}
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
            for i in range(args.runs):
                for name, tree in trees.items():
                    runs[name].append(daemon_run(tree, args.model, images))
                print(f"\rrun {i + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(baseline)], check=True)
    for name, values in runs.items():
        start = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        print(f"{name:10s} first result after {start:.3f} s, peak RSS {rss:.1f} MB "
              f"(median of {len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
