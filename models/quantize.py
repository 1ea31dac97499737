"""int8 edged models: carry a checkpoint's trained quantization into ONNX, or calibrate one.

Two ways to an int8 model, both starting from the verified float export:

- ``carry_quantization``: the QAT TFLite checkpoints already hold what int8 needs - every
  activation's scale and zero point, int8-ready weights and int32 biases. They go into a QDQ
  graph unchanged: uint8 activations with the checkpoint's own parameters, weights per-channel
  symmetric int8 (ONNX Runtime's fast kernels need weight zero point 0) with the exact values
  ``q - z`` wherever a channel fits in +-127 and only the extreme channels re-fitted (their
  biases rescaled), no Clip/Relu where the uint8 range already saturates, and float where int8
  buys nothing (the classifier, everything after the detection heads and the segmentation
  logits).
- ``calibrate``: float checkpoints get ONNX Runtime's static quantization, its activation
  ranges measured on frames the user gives.

``check_int8`` proves the result is really integer after ONNX Runtime's own optimizations (no
float Conv or Add left); ``quantize_model`` ties it together for ``models.convert``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edged.errors import EdgedError
from edged.fetch import atomic_file
from edged.model import load_model
from edged.preprocess import Preprocessor
from models.agreement import Frame, agreement_report, load_frames, photo_frames
from models.export import _drop_unused_constants, set_metadata
from models.importers.tflite import Operator, Tensor, TFLiteModel, conv_weights

PRECISIONS = ("fp32", "int8")
WEIGHT_LIMIT = 127  # symmetric int8: -127..127 keeps the kernels' sums from overflowing
# TFLite ops that pass a tensor on with their own output parameters, by the ONNX op doing it.
_PASS_ON = {
    "Add": ("ADD",),
    "GlobalAveragePool": ("AVERAGE_POOL_2D", "MEAN"),
    "Concat": ("CONCATENATION",),
    "Expand": ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"),  # a 1x1 map broadcast
}
# Activations that the uint8 range of the conv before them may already apply.
_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Float ops that must not survive ONNX Runtime's optimizations in an int8 model.
FLOAT_OPS = frozenset({"Conv", "FusedConv", "Add", "Sum"})

Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class QParams:
    """An activation's uint8 quantization: ``x = (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    @classmethod
    def of(cls, tensor: Tensor) -> QParams:
        """The (per-tensor) parameters of a TFLite activation."""
        if tensor.scale is None or tensor.scale.size != 1 or tensor.dtype is not np.uint8:
            raise EdgedError(f"activation {tensor.name!r} is not per-tensor uint8 quantized")
        return cls(float(tensor.scale[0]), int(tensor.zero_point[0]))

    def range(self) -> tuple[float, float]:
        """The smallest and largest value the uint8 code can hold."""
        return (0 - self.zero_point) * self.scale, (255 - self.zero_point) * self.scale


# --- carrying a QAT checkpoint's quantization -------------------------------------------------

class _Carrier:
    """Rewrites a float graph into QDQ with the parameters of the TFLite checkpoint ``tfl``."""

    def __init__(self, model: onnx.ModelProto, tfl: TFLiteModel) -> None:
        self.model = model
        self.graph = model.graph
        self.tfl = tfl
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                       for n in self.graph.node
                       if n.op_type == "Constant" and n.attribute[0].name == "value"}
        # ONNX tensor name -> the TFLite activation holding the same values.
        self.mapped: dict[str, Tensor] = {}
        self.consumers: dict[int, list[Operator]] = {}
        for op in tfl.operators:
            for t in op.inputs:
                self.consumers.setdefault(t.index, []).append(op)
        self.new_inits: list[onnx.TensorProto] = []
        self.pending: list[onnx.NodeProto] = []  # weight / bias DequantizeLinear nodes
        self.refitted = 0
        self.channels = 0

    # The TFLite side ------------------------------------------------------------------------

    def _requantized(self, tensor: Tensor) -> Tensor:
        """``tensor`` or, when a QUANTIZE op only re-scales it for its one consumer, that op's
        output (TFLite re-scales a concat input that way)."""
        users = self.consumers.get(tensor.index, [])
        if len(users) == 1 and users[0].type == "QUANTIZE":
            return users[0].outputs[0]
        return tensor

    def _match_convs(self, convs: list[onnx.NodeProto]) -> dict[str, Operator]:
        """Each ONNX Conv's TFLite op: the one whose weights the importer loaded into it."""
        by_shape: dict[tuple[int, ...], list[tuple[Operator, np.ndarray]]] = {}
        for op in self.tfl.ops("CONV_2D", "DEPTHWISE_CONV_2D"):
            weight = op.inputs[1]
            if weight.scale is None or weight.dtype not in (np.uint8, np.int8):
                raise EdgedError(f"{self.tfl.path}: {weight.name!r} holds float weights: no "
                                 "trained quantization to carry (calibrate instead: "
                                 "--calibration CLIP|DIR)")
            w = conv_weights(op)[0]
            by_shape.setdefault(w.shape, []).append((op, w))
        matched: dict[str, Operator] = {}
        for node in convs:
            w = numpy_helper.to_array(self.inits[node.input[1]])
            tolerance = 1e-5 * float(np.abs(w).max()) + 1e-7
            candidates = by_shape.get(w.shape, [])
            for i, (op, ref) in enumerate(candidates):
                if float(np.abs(ref - w).max()) <= tolerance:
                    matched[node.name] = op
                    del candidates[i]  # identical twins map in execution order
                    break
            else:
                raise EdgedError(f"{self.tfl.path}: no convolution with the weights of "
                                 f"{node.name} ({list(w.shape)}): not the checkpoint this "
                                 "model was converted from")
        return matched

    # The ONNX side --------------------------------------------------------------------------

    def _map(self, name: str, tensor: Tensor) -> None:
        """Record that ONNX tensor ``name`` holds TFLite activation ``tensor``."""
        known = self.mapped.get(name)
        if known is not None and QParams.of(known) != QParams.of(tensor):
            raise EdgedError(f"{self.tfl.path}: {name} has two quantizations "
                             f"({known.name!r} and {tensor.name!r})")
        self.mapped[name] = tensor

    def _init(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def _weights(self, node: onnx.NodeProto, op: Operator, in_scale: float) -> None:
        """Per-channel symmetric int8 weights and int32 biases for ``node``, exact where the
        checkpoint's values fit."""
        weight, bias = op.inputs[1], op.inputs[2]
        w = conv_weights(op)[0].astype(np.float64)
        channels = w.shape[0]
        scale = np.broadcast_to(weight.scale.astype(np.float64), (channels,)).copy()
        codes = np.rint(w / scale[:, None, None, None])
        extreme = np.abs(codes).reshape(channels, -1).max(axis=1) > WEIGHT_LIMIT
        # The few channels holding the extremes: re-fit to +-127 and rescale the bias to match.
        new_scale = scale.copy()
        new_scale[extreme] = np.abs(w).reshape(channels, -1).max(axis=1)[extreme] / WEIGHT_LIMIT
        codes[extreme] = np.rint(w[extreme] / new_scale[extreme, None, None, None])
        w_scale = new_scale.astype(np.float32)
        b_scale = np.float32(in_scale) * w_scale
        old_b_scale = np.float32(in_scale) * scale.astype(np.float32)
        b = bias.data.astype(np.float64) * (old_b_scale / b_scale)
        self.refitted += int(extreme.sum())
        self.channels += channels

        name = node.name
        node.input[1] = self._dequantize(
            self._init(f"{name}.weight_q", codes.astype(np.int8)),
            self._init(f"{name}.weight_scale", w_scale),
            self._init(f"{name}.weight_zero", np.zeros(channels, np.int8)), axis=0)
        bias_q = self._init(f"{name}.bias_q", np.rint(b).astype(np.int32))
        bias_dq = self._dequantize(bias_q, self._init(f"{name}.bias_scale", b_scale),
                                   self._init(f"{name}.bias_zero", np.zeros(channels, np.int32)),
                                   axis=0)
        if len(node.input) > 2:
            node.input[2] = bias_dq
        else:
            node.input.append(bias_dq)

    def _dequantize(self, q: str, scale: str, zero: str, axis: int | None = None) -> str:
        out = f"{q}_dq"
        kwargs = {"axis": axis} if axis is not None else {}
        self.pending.append(helper.make_node("DequantizeLinear", [q, scale, zero], [out],
                                             name=out, **kwargs))
        return out

    def _fold_activation(self, conv: onnx.NodeProto, nodes: list[onnx.NodeProto],
                         users: dict[str, list[onnx.NodeProto]], out: QParams) -> None:
        """Drop the Relu/Clip after ``conv`` when ``out``'s uint8 range already clips there."""
        after = users.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type not in _ACTIVATIONS:
            return
        act = after[0]
        low, high = 0.0, np.inf  # Relu
        if act.op_type == "Clip":  # Clip(x, min, max); an absent bound is no bound
            bounds = [*act.input[1:3], "", ""][:2]
            low, high = (float(self.consts[n]) if n else default
                         for n, default in zip(bounds, (-np.inf, np.inf), strict=True))
        q_low, q_high = out.range()
        if q_low == low and q_high <= high * (1 + 1e-4):
            conv.output[0] = act.output[0]
            nodes.remove(act)

    def run(self) -> onnx.ModelProto:
        """The QDQ model (the float model is changed in place and returned)."""
        graph = self.graph
        nodes = list(graph.node)
        convs = [n for n in nodes if n.op_type == "Conv"]
        ops = self._match_convs(convs)
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in node.input:
                users.setdefault(name, []).append(node)

        for node in list(nodes):
            if node not in nodes:  # a folded activation
                continue
            if node.op_type == "Conv":
                op = ops[node.name]
                self._map(node.input[0], op.inputs[0])
                self._fold_activation(node, nodes, users, QParams.of(op.outputs[0]))
                self._map(node.output[0], op.outputs[0])
                self._weights(node, op, QParams.of(op.inputs[0]).scale)
            elif node.op_type in _PASS_ON:
                self._pass_on(node)
        self._insert_qdq(nodes)
        return self.model

    def _pass_on(self, node: onnx.NodeProto) -> None:
        """Map an Add / pool / concat / broadcast to the TFLite op doing the same on the same
        activations; unmatched ones stay float."""
        inputs = [self.mapped.get(name) for name in node.input if name not in self.consts
                  and name not in self.inits]
        if not inputs or any(t is None for t in inputs):
            return
        want = sorted(t.index for t in inputs)
        for op in self.tfl.operators:
            if op.type in _PASS_ON[node.op_type]:
                have = sorted(t.index for t in op.inputs if t.data is None)
                if have == want:
                    self._map(node.output[0], self._requantized(op.outputs[0]))
                    return

    def _insert_qdq(self, nodes: list[onnx.NodeProto]) -> None:
        """Quantize-dequantize every mapped activation where it is produced (or enters)."""
        graph = self.graph
        outputs = {o.name for o in graph.output}
        result: list[onnx.NodeProto] = []
        renamed: dict[str, str] = {}

        def qdq(name: str) -> list[onnx.NodeProto]:
            params = QParams.of(self.mapped[name])
            scale = self._init(f"{name}.scale", np.array(params.scale, np.float32))
            zero = self._init(f"{name}.zero", np.array(params.zero_point, np.uint8))
            renamed[name] = f"{name}_dq"
            return [helper.make_node("QuantizeLinear", [name, scale, zero], [f"{name}_q"],
                                     name=f"{name}_q"),
                    helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero],
                                     [f"{name}_dq"], name=f"{name}_dq")]

        for name in [i.name for i in graph.input]:
            if name in self.mapped:
                result += qdq(name)
        pending = {n.output[0]: n for n in self.pending}
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in pending:
                    result.append(pending.pop(name))
                node.input[i] = renamed.get(name, name)
            result.append(node)
            for name in node.output:
                if name in self.mapped and name not in outputs:
                    result += qdq(name)
        del graph.node[:]
        graph.node.extend(result)
        graph.initializer.extend(self.new_inits)
        _drop_unused_constants(graph)  # the float weights and the folded activations' bounds


def carry_quantization(model: onnx.ModelProto, checkpoint: str | os.PathLike[str]
                       ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The QDQ version of ``model`` (a float edged export of ``checkpoint``, changed in place)
    using the checkpoint's trained quantization; also what was carried."""
    path = Path(checkpoint)
    try:
        tfl = TFLiteModel(path)
    except EdgedError:
        raise EdgedError(f"{path}: not a quantized TFLite checkpoint, so it has no trained "
                         "quantization to carry (calibrate instead: --calibration CLIP|DIR)"
                         ) from None
    carrier = _Carrier(model, tfl)
    carrier.run()
    return model, {"quantized_tensors": len(carrier.mapped), "weight_channels": carrier.channels,
                   "refitted_channels": carrier.refitted}


# --- calibrating a float checkpoint ------------------------------------------------------------

class _Frames:
    """ONNX Runtime's calibration data reader over preprocessed frames."""

    def __init__(self, frames: Sequence[Frame], spec: Any) -> None:
        pre = Preprocessor(spec)
        # The preprocessor reuses one buffer: keep a copy of each tensor.
        self._tensors = iter([pre(image)[0].copy() for _, image in frames])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next input feed, None when done."""
        tensor = next(self._tensors, None)
        return None if tensor is None else {"image": tensor}


def calibrate(float_path: str | os.PathLike[str], frames: Sequence[Frame]) -> onnx.ModelProto:
    """Static int8 quantization of a float edged model, activation ranges measured on
    ``frames``: per-channel symmetric int8 weights, uint8 activations; the classifier (Gemm)
    and the ops after the detection heads stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not frames:
        raise EdgedError("int8 calibration needs frames: --calibration CLIP|DIR gave none")
    float_path = Path(float_path)
    spec = load_model(float_path, threads=1).info.input
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        root.setLevel(logging.ERROR)  # the quantizer's advice goes to the root logger
        try:
                quantize_static(str(float_path), str(out), _Frames(frames, spec),
                            quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Add", "GlobalAveragePool"],
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True})
        finally:
            root.setLevel(level)
        model = onnx.load(str(out))
    source = onnx.load(str(float_path), load_external_data=False)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    return model


# --- checking and writing ----------------------------------------------------------------------

def check_int8(model: onnx.ModelProto, where: str) -> dict[str, int]:
    """Optimize ``model`` as the daemon's sessions do (ORT_ENABLE_ALL) and fail unless no float
    Conv / Add is left. Returns the optimized graph's op counts."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    left = [node for node in graph.node if node.op_type in FLOAT_OPS]
    if left:
        kinds = sorted({n.op_type for n in left})
        raise EdgedError(f"{where}: {len(left)} float {'/'.join(kinds)} node(s) left after ONNX "
                         f"Runtime's optimizations (first: {left[0].name}): not an int8 model")
    return counts


def skip_write(progress: Progress) -> Progress:
    """``progress`` without the "write" step (the float export's temporary file)."""
    def report(step: str, detail: str) -> None:
        if step != "write":
            progress(step, detail)
    return report


def check_precision(precision: str, checkpoint_format: str,
                    calibration: str | os.PathLike[str] | None) -> None:
    """Fail before any work on a precision request that cannot be met."""
    if precision not in PRECISIONS:
        raise EdgedError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if precision == "fp32" and calibration is not None:
        raise EdgedError("--calibration goes with --int8 (an fp32 model needs no calibration)")
    if precision == "int8" and calibration is None and checkpoint_format != "tflite":
        raise EdgedError(f"int8 of a {checkpoint_format} checkpoint (float weights, no trained "
                         "quantization) needs calibration frames: --calibration CLIP|DIR")
    if calibration is not None and not Path(calibration).exists():
        raise EdgedError(f"{calibration}: no such clip or folder of images (--calibration)")


def quantize_model(float_path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                   checkpoint: str | os.PathLike[str], checkpoint_format: str,
                   calibration: str | os.PathLike[str] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Write the int8 version of the float edged model ``float_path`` to ``output``.

    A TFLite checkpoint's trained quantization is carried over; any other checkpoint is
    calibrated on the frames of ``calibration`` (a clip or a folder of images), which is then
    required. The result must pass ``check_int8``; its agreement with the float model (on
    scikit-image's photos plus the calibration frames) is stored as ``edged.agreement`` and
    returned.
    """
    progress = progress or (lambda _step, _detail: None)
    output = Path(output)
    frames = load_frames(calibration) if calibration is not None else []
    if checkpoint_format == "tflite":
        progress("quantize", f"carrying the trained quantization of {Path(checkpoint).name}")
        model, carried = carry_quantization(onnx.load(str(float_path)), checkpoint)
        precision = {"weights": "int8", "activations": "uint8", "method": "checkpoint",
                     **carried}
    else:
        check_precision("int8", checkpoint_format, calibration)
        progress("quantize", f"calibrating on {len(frames)} frames of {calibration}")
        model = calibrate(float_path, frames)
        precision = {"weights": "int8", "activations": "uint8", "method": "calibrated",
                     "calibration": {"source": Path(calibration).name, "frames": len(frames)}}
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EdgedError(f"{output}: int8 graph fails the ONNX checker: {first}") from None
    check_int8(model, str(output))

    set_metadata(model, {"edged.precision": precision})
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / output.name
        candidate.write_bytes(model.SerializeToString())
        report = agreement_report(float_path, candidate, photo_frames() + frames)
    set_metadata(model, {"edged.agreement": report})
    progress("agree", report["summary"])
    progress("write", str(output))
    with atomic_file(output) as f:
        f.write(model.SerializeToString())
    return report
