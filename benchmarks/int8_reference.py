"""How close each int8 conversion stays to its checkpoint's own integer arithmetic.

The yardstick is ``carry_quantization(..., exact=True)``: the checkpoint's weights exactly as
trained (``q - z``, nothing re-fitted, padded or reordered) with its activation quantization,
run by ONNX Runtime unoptimized (float arithmetic on the exact integer values; it has no integer
kernel for such weights). Per model this prints, side by side:
- the yardstick against fp32 on the 14 held-out frames: what the checkpoint itself gives on the
  frames the int8 targets are stated on;
- the shipped int8 conversion against fp32 on the same frames (as ``benchmarks/int8.py``);
- the shipped int8 conversion against the yardstick on other frames: carphone and bikes.mp4
  frames evenly spread, none of the 14 (for classification also the RMS change of the logits).

    python benchmarks/int8_reference.py [--weights ../shared/weights] [--samples ../shared/samples]
                                        [--models NAME ...] [--frames 40] [--dir CACHE]

Caveat (docs/int8.md): the yardstick is sensitive itself. A rounding that moves one activation
code by one step propagates, so these distances rank conversions, they do not measure an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.int8 import arguments, convert, print_table  # noqa: E402
from edged.catalog import get_model  # noqa: E402
from edged.fetch import locate  # noqa: E402
from edged.model import Model, load_model  # noqa: E402
from models.agreement import BIKES_FRAMES, clip_frames, compare_models, held_out_frames  # noqa: E402
from models.quantize import carry_quantization, load_yardstick  # noqa: E402


def yardstick(float_model: Model, weights: Path, name: str) -> Model:
    """The checkpoint's own arithmetic for catalog model ``name``, as a loaded model."""
    checkpoint = locate(get_model(name).checkpoint, None, mirror=weights)
    model, _ = carry_quantization(onnx.load(str(float_model.info.path)), checkpoint, exact=True)
    return load_yardstick(model, float_model)


def other_frames(samples: Path, count: int) -> list:
    """``count`` frames of carphone and ``count`` of bikes.mp4, evenly spread, none of the 14."""
    bikes = [f for f in clip_frames(samples / "bikes.mp4", limit=count + len(BIKES_FRAMES))
             if int(f[0].rsplit("#", 1)[1]) not in BIKES_FRAMES][:count]
    return clip_frames(samples / "carphone_pristine.mp4", limit=count) + bikes


def summary(report: dict) -> str:
    """The report's line, with the logits' RMS change where there is one."""
    rms = report.get("rms_logit_change")
    return report["summary"] + (f", logits RMS change {rms:.3f}" if rms is not None else "")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--frames", type=int, default=40, help="frames of each clip")
    args = parser.parse_args()
    held = held_out_frames(args.samples / "bikes.mp4")
    other = other_frames(args.samples, args.frames)
    header = ("model", "checkpoint vs fp32 (14 frames)", "int8 vs fp32 (14 frames)",
              f"int8 vs checkpoint ({len(other)} other frames)")
    rows = []
    for step, name in enumerate(args.models, 1):
        print(f"[{step}/{len(args.models)}] {name}", file=sys.stderr, flush=True)
        fp32, int8 = (convert(name, args.dir, args.weights, p) for p in ("fp32", "int8"))
        float_model, shipped = load_model(fp32), load_model(int8)
        reference = yardstick(float_model, args.weights, name)
        rows.append((name, summary(compare_models(float_model, reference, held)),
                     summary(compare_models(float_model, shipped, held)),
                     summary(compare_models(reference, shipped, other, "the checkpoint"))))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(header, rows)


if __name__ == "__main__":
    main()
