"""int8 edged models: carry a checkpoint's trained quantization into ONNX, or calibrate one.

Two ways to an int8 model, both starting from the verified float export:

- ``carry_quantization``: the QAT TFLite checkpoints already hold what int8 needs - every
  activation's scale and zero point, int8-ready weights and int32 biases. They go into a QDQ
  graph unchanged: uint8 activations with the checkpoint's own parameters, weights per-channel
  symmetric int8 (ONNX Runtime's fast kernels need weight zero point 0) with the exact values
  ``q - z`` wherever a channel fits (``fit_weights``: within +-127, and no weight pair that x86
  kernels without VNNI would saturate on) and only the other channels re-fitted (their biases
  rescaled), no Clip/Relu where the uint8 range already saturates, float where int8 buys
  nothing (the classifier, everything after the detection heads and the segmentation logits),
  and a segmentation model's argmax at a quarter of its output resolution (``coarse_labels``).
- ``calibrate``: float checkpoints get ONNX Runtime's static quantization, its activation
  ranges measured on frames the user gives, its weights then fitted the same way.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edged.errors import EdgedError, first_line
from edged.fetch import atomic_file
from edged.model import Model, load_model
from edged.preprocess import Preprocessor
from edged.schedule.session import optimize_offline
from models.agreement import Frame, agreement_report, load_frames, photo_frames
from models.export import Progress, drop_unused_constants, quiet, set_metadata
from models.importers.tflite import Operator, Tensor, TFLiteModel, conv_weights

PRECISIONS = ("fp32", "int8")
WEIGHT_LIMIT = 127  # symmetric int8 weights: -127..127
PAIR_LIMIT = 128  # 255 * 128 <= 32767: see pair_sums
LABEL_STEP = 4  # segmentation argmax at 1/4 of the output resolution: see coarse_labels
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
# What calibration quantizes. Clip (ReLU6) and Relu must be among them: the quantizer then folds
# them into the producer's output range; left float, each costs a dequantize-quantize round trip
# (SSDLite person: int8 as slow as fp32, peak 10.5 MB instead of 4.4).
QUANTIZED_OPS = ["Conv", "Add", "GlobalAveragePool", "Clip", "Relu"]



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


def pair_sums(codes: np.ndarray) -> np.ndarray:
    """Per output channel, ``|a| + |b|`` of each same-sign pair of neighbouring weights in the
    order x86 integer kernels multiply them (kernel row, column, input channel; pairs 2i, 2i+1).

    Without VNNI those kernels add each pair's two uint8 x int8 products in 16 bits with
    saturation: with activation codes up to 255 a same-sign pair summing over ``PAIR_LIMIT``
    overflows, an opposite-sign pair never does (255 * 127 < 32767).
    """
    flat = codes.transpose(0, 2, 3, 1).reshape(codes.shape[0], -1)
    if flat.shape[1] % 2:
        flat = np.pad(flat, ((0, 0), (0, 1)))
    a, b = flat[:, 0::2], flat[:, 1::2]
    return np.where(a * b > 0, np.abs(a) + np.abs(b), 0)


def _fits(codes: np.ndarray, dense: bool) -> np.ndarray:
    """Which output channels' integer weights every x86 / ARM kernel multiplies exactly."""
    ok = np.abs(codes).reshape(codes.shape[0], -1).max(axis=1) <= WEIGHT_LIMIT
    if dense:
        ok &= pair_sums(codes).max(axis=1) <= PAIR_LIMIT
    return ok


def _refit_scale(w: np.ndarray, dense: bool) -> float:
    """The smallest scale (to 0.1 %) at which one output channel's float weights ``w`` fit."""
    scale = float(np.abs(w).max()) / WEIGHT_LIMIT
    if dense:
        scale = max(scale, float(pair_sums(w[None]).max()) / PAIR_LIMIT)
    while not _fits(np.rint(w / scale)[None], dense)[0]:  # rounding may still overshoot
        scale *= 1.001
    return scale


def fit_weights(w: np.ndarray, scale: np.ndarray, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and per-channel scales for float conv weights ``w`` (O, I, kH, kW) given at
    per-channel ``scale``: exact where a channel fits (see ``_fits``; depthwise kernels, not
    ``dense``, sum in 32 bits), the smallest scale that fits where it does not."""
    codes = np.rint(w / scale[:, None, None, None])
    new_scale = scale.astype(np.float64)
    for c in np.flatnonzero(~_fits(codes, dense)):
        new_scale[c] = _refit_scale(w[c], dense)
        codes[c] = np.rint(w[c] / new_scale[c])
    return codes.astype(np.int8), new_scale


def rescaled_bias(bias: np.ndarray, scale: np.ndarray, new_scale: np.ndarray) -> np.ndarray:
    """int32 biases (scale: input scale x weight scale) for weights re-fitted from ``scale`` to
    ``new_scale``; unchanged where the weight scale is."""
    ratio = scale.astype(np.float32).astype(np.float64) / new_scale.astype(np.float32)
    return np.rint(bias.astype(np.float64) * ratio).astype(np.int32)


# --- carrying a QAT checkpoint's quantization -------------------------------------------------

def _pairing(codes: np.ndarray, tries: int = 300) -> np.ndarray | None:
    """An order of the input channels of 1x1 weight ``codes`` (O, I, 1, 1) under which fewer
    output channels hold an overflowing same-sign pair (``pair_sums``), or None if the given
    order is as good. Channels over ``WEIGHT_LIMIT`` re-fit anyway and are left out. Largest
    channels are paired with the smallest first, then random partner swaps that do not make
    it worse (seeded: conversions are reproducible)."""
    counted = np.abs(codes).reshape(codes.shape[0], -1).max(axis=1) <= WEIGHT_LIMIT
    codes = codes[counted]

    def overflowing(order: np.ndarray) -> int:
        return int((pair_sums(codes[:, order]).max(axis=1) > PAIR_LIMIT).sum())

    n = codes.shape[1]
    best = overflowing(np.arange(n))
    if best == 0:
        return None
    by_size = np.argsort(-np.abs(codes).max(axis=(0, 2, 3)), kind="stable")
    order = np.empty(n, np.int64)
    order[0::2], order[1::2] = by_size[: n // 2], by_size[::-1][: n // 2]
    found = overflowing(order)
    rng = np.random.default_rng(0)
    for _ in range(tries):
        if found == 0:
            break
        p, q = 2 * rng.integers(0, n // 2, 2) + 1
        swapped = order.copy()
        swapped[p], swapped[q] = order[q], order[p]
        if (count := overflowing(swapped)) <= found:
            order, found = swapped, count
    return order if found < best else None


def _group(node: onnx.NodeProto) -> int:
    """A Conv's ``group`` attribute (1: dense)."""
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _stem_order(w: np.ndarray, scale: np.ndarray) -> tuple[int, tuple[int, ...]] | None:
    """For a dense conv's float weights ``w`` (O, I, kH, kW) at per-channel ``scale``: how many
    zero input channels make I a multiple of 4 and the channel order that leaves the fewest
    weights to re-fit (``_stem_refits``); None when I already is one."""
    missing = -w.shape[1] % 4
    if not missing:
        return None
    total = w.shape[1] + missing
    orders = itertools.permutations(range(total)) if total <= 4 else [range(total)]
    best = min((tuple(o) for o in orders),
               key=functools.partial(_stem_refits, w, scale, missing))
    return missing, best


def _channel_pad_nodes(q: str, base: str, missing: int, order: Sequence[int], zero: str,
                       init: Callable[[str, np.ndarray], str]
                       ) -> tuple[list[onnx.NodeProto], str]:
    """Nodes appending ``missing`` channels of code ``zero`` (value 0) to the quantized NCHW
    tensor ``q`` and putting its channels in ``order``, and their output; ``init(name, array)``
    adds their constants (named after ``base``)."""
    pads = init(f"{base}.channel_pads", np.array([0, 0, 0, 0, 0, missing, 0, 0], np.int64))
    out = f"{q}_padded"
    nodes = [helper.make_node("Pad", [q, pads, zero], [out], name=out)]
    if list(order) != sorted(order):
        indices = init(f"{base}.channel_order", np.array(order, np.int64))
        nodes.append(helper.make_node("Gather", [out, indices], [f"{out}_ordered"],
                                      name=f"{out}_ordered", axis=1))
        out = f"{out}_ordered"
    return nodes, out


def _stem_refits(w: np.ndarray, scale: np.ndarray, missing: int, order: Sequence[int]
                 ) -> tuple[int, float]:
    """How many output channels (and how much scale) re-fit with the stem's input channels
    padded by ``missing`` and put in ``order`` (``_Carrier._stem_pad`` takes the least)."""
    fitted = fit_weights(_padded_channels(w, missing, order), scale.copy(), dense=True)[1]
    return int((fitted != scale).sum()), float((fitted / scale).sum())


def _padded_channels(w: np.ndarray, missing: int, order: Sequence[int]) -> np.ndarray:
    """Conv weights ``[out, in, kh, kw]`` with ``missing`` zero input channels appended, then
    the input channels in ``order``."""
    return np.pad(w, ((0, 0), (0, missing), (0, 0), (0, 0)))[:, list(order)]


class _Carrier:
    """Rewrites a float graph into QDQ with the parameters of the TFLite checkpoint ``tfl``."""

    def __init__(self, model: onnx.ModelProto, tfl: TFLiteModel, exact: bool = False) -> None:
        self.model = model
        self.exact = exact  # the checkpoint's weights as they are (see carry_quantization)
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
        # Conv name -> (zero input channels appended, input channel order after them), and the
        # same for a graph input padded to match (``_stem_pad``, ``_private_orders``)
        self.in_channels: dict[str, tuple[int, Sequence[int]]] = {}
        self.padded: dict[str, tuple[int, Sequence[int]]] = {}
        # Conv name -> order of its output channels (``_private_orders``)
        self.out_order: dict[str, np.ndarray] = {}

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
        if node.name in self.in_channels:
            w = _padded_channels(w, *self.in_channels[node.name])
        channels = w.shape[0]
        scale = np.broadcast_to(weight.scale.astype(np.float64), (channels,)).copy()
        bias_data = bias.data
        if node.name in self.out_order:
            order = self.out_order[node.name]
            w, scale, bias_data = w[order], scale[order], bias_data[order]
        if self.exact:
            codes, new_scale = np.rint(w / scale[:, None, None, None]).astype(np.int32), scale
        else:
            codes, new_scale = fit_weights(w, scale, dense=op.type == "CONV_2D")
        w_scale = new_scale.astype(np.float32)
        self.refitted += int((new_scale != scale).sum())
        self.channels += channels

        name = node.name
        node.input[1] = self._dequantize(
            self._init(f"{name}.weight_q", codes),
            self._init(f"{name}.weight_scale", w_scale),
            self._init(f"{name}.weight_zero", np.zeros(channels, codes.dtype)), axis=0)
        bias_q = self._init(f"{name}.bias_q", rescaled_bias(bias_data, scale, new_scale))
        bias_dq = self._dequantize(bias_q, self._init(f"{name}.bias_scale",
                                                      np.float32(in_scale) * w_scale),
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

        if not self.exact:
            self._stem_pad(convs, users, ops)
            self._private_orders(convs, users, ops)
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

    def _stem_pad(self, convs: list[onnx.NodeProto], users: dict[str, list[onnx.NodeProto]],
                  ops: dict[str, Operator]) -> None:
        """Give a graph input read only by one Conv zero channels up to a multiple of 4.

        ONNX Runtime's direct int8 convolution needs input channels in multiples of 4 (on x86;
        MLAS's ``MlasConvSymPackWSize``). An RGB stem otherwise falls back to a general GEMM with
        an int32 accumulator per output value and an im2col copy: 1.6 MB for MobileNetV2-224,
        8.5 MB for DeepLabv3-513, each model's int8 memory peak. Zero channels with zero weights
        compute the same sums and take the direct kernel (``_insert_qdq`` pads the quantized
        input, ``_weights`` the weights). x86 kernels add the weights of channels 0+1 and 2+3
        in pairs, so the channels are also put in the order that leaves the fewest weights to
        re-fit (R with B and G with the zero channel, for the three checkpoints here)."""
        inputs = {i.name for i in self.graph.input}
        for node in convs:
            name = node.input[0]
            op = ops[node.name]
            if name not in inputs or users.get(name) != [node] or _group(node) != 1:
                continue
            w = conv_weights(op)[0].astype(np.float64)
            scale = np.broadcast_to(op.inputs[1].scale.astype(np.float64), (w.shape[0],))
            padding = _stem_order(w, scale)
            if padding is not None:
                self.padded[name] = self.in_channels[node.name] = padding

    def _private_orders(self, convs: list[onnx.NodeProto],
                        users: dict[str, list[onnx.NodeProto]], ops: dict[str, Operator]) -> None:
        """Reorder the channels private to a bottleneck so fewer projection weights re-fit.

        The channels between an expansion, its depthwise conv and its 1x1 projection are read by
        nothing else: any order computes the same. x86 kernels add the projection's weights of
        input channels 2i and 2i+1 in pairs (``pair_sums``); ``_pairing`` picks an order where
        fewer output channels hold an overflowing pair, so more keep the checkpoint's exact
        weights (``_weights`` applies the order to all three convs)."""
        by_output = {n.output[0]: n for n in self.graph.node}

        def only_reader(name: str) -> onnx.NodeProto | None:
            """The one node reading ``name``, looking through a single activation."""
            readers = users.get(name, [])
            if len(readers) == 1 and readers[0].op_type in _ACTIVATIONS:
                readers = users.get(readers[0].output[0], [])
            return readers[0] if len(readers) == 1 else None

        conv_names = {n.name for n in convs}
        for dw in convs:
            group = _group(dw)
            source = by_output.get(dw.input[0])
            if source is not None and source.op_type in _ACTIVATIONS:
                source = by_output.get(source.input[0])
            project = only_reader(dw.output[0])
            if (group == 1 or source is None or source.name not in conv_names
                    or project is None or project.name not in conv_names
                    or only_reader(source.output[0]) is not dw):
                continue
            w = conv_weights(ops[project.name])[0].astype(np.float64)
            if w.shape[2:] != (1, 1) or w.shape[1] != group or group % 2:
                continue
            scale = np.broadcast_to(ops[project.name].inputs[1].scale.astype(np.float64),
                                    (w.shape[0],))
            order = _pairing(np.rint(w / scale[:, None, None, None]))
            if order is not None:
                self.out_order[source.name] = self.out_order[dw.name] = order
                self.in_channels[project.name] = (0, order)

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
            quantized = [helper.make_node("QuantizeLinear", [name, scale, zero], [f"{name}_q"],
                                          name=f"{name}_q")]
            q = f"{name}_q"
            if name in self.padded:  # NCHW: zero channels appended on axis 1, then ordered
                nodes, q = _channel_pad_nodes(q, name, *self.padded[name], zero, self._init)
                quantized += nodes
            return quantized + [helper.make_node("DequantizeLinear", [q, scale, zero],
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
        drop_unused_constants(graph)  # the float weights and the folded activations' bounds


def coarse_labels(model: onnx.ModelProto, step: int = LABEL_STEP) -> bool:
    """Take a segmentation model's argmax at 1/``step`` of the output resolution.

    A model ending in ``Resize`` (bilinear logits to full size) then ``ArgMax`` over the classes
    spends most of its float tail there (DeepLab: 21 x 513 x 513 logits). Resizing the logits
    to ``(size - 1) / step + 1`` instead, taking the argmax there and upsampling the labels
    (nearest, uint8) moves only class edges, by less than ``step`` pixels. Returns whether the
    model had that tail.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    argmax = producers.get(graph.output[0].name)
    resize = producers.get(argmax.input[0]) if argmax is not None else None
    if argmax is None or argmax.op_type != "ArgMax" or resize is None \
            or resize.op_type != "Resize" or len(resize.input) < 4:
        return False
    sizes = _constant(graph, resize.input[3])
    full = sizes[2:]
    mid = (full - 1) // step + 1
    name = argmax.output[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([*sizes[:2], *mid], np.int64), f"{name}.coarse_sizes"),
        numpy_helper.from_array(np.array([sizes[0], *full], np.int64), f"{name}.full_sizes")])
    resize.input[3] = f"{name}.coarse_sizes"
    argmax.output[0] = f"{name}_coarse"
    tail = [helper.make_node("Cast", [f"{name}_coarse"], [f"{name}_coarse_u8"],
                             to=onnx.TensorProto.UINT8),  # class indices: 4x less to move
            helper.make_node("Resize", [f"{name}_coarse_u8", "", "", f"{name}.full_sizes"],
                             [f"{name}_u8"], mode="nearest",
                             coordinate_transformation_mode="align_corners",
                             nearest_mode="round_prefer_floor"),
            helper.make_node("Cast", [f"{name}_u8"], [name], to=onnx.TensorProto.INT64)]
    at = list(graph.node).index(argmax) + 1
    for offset, node in enumerate(tail):
        graph.node.insert(at + offset, node)
    drop_unused_constants(graph)  # the full-size resize's sizes
    return True


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """The value of initializer or Constant node ``name``."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise EdgedError(f"{name}: not a constant of the graph")


def carry_quantization(model: onnx.ModelProto, checkpoint: str | os.PathLike[str],
                       exact: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The QDQ version of ``model`` (a float edged export of ``checkpoint``, changed in place)
    using the checkpoint's trained quantization; also what was carried.

    ``exact`` builds the yardstick for conversions instead of a model to deploy: the
    checkpoint's weights exactly as trained (``q - z`` as int32, nothing re-fitted, padded or
    reordered). ONNX Runtime has no integer kernel for int32 weights: run it unoptimized
    (``ORT_DISABLE_ALL``), in float arithmetic on the exact integer values."""
    path = Path(checkpoint)
    try:
        tfl = TFLiteModel(path)
    except EdgedError:
        raise EdgedError(f"{path}: not a quantized TFLite checkpoint, so it has no trained "
                         "quantization to carry (calibrate instead: --calibration CLIP|DIR)"
                         ) from None
    carrier = _Carrier(model, tfl, exact)
    carrier.run()
    carried: dict[str, Any] = {"quantized_tensors": len(carrier.mapped),
                               "weight_channels": carrier.channels,
                               "refitted_channels": carrier.refitted}
    if coarse_labels(model):
        carried["label_step"] = LABEL_STEP
    return model, carried


def load_yardstick(model: onnx.ModelProto, like: Model) -> Model:
    """The model ``carry_quantization(..., exact=True)`` made, loaded as ONNX Runtime can run it:
    unoptimized (no integer kernel takes int32 weights), with the float model ``like``'s
    contract (task, labels, input)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return Model(like.info, session)


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


def calibrate(float_path: str | os.PathLike[str], frames: Sequence[Frame]
              ) -> tuple[onnx.ModelProto, int]:
    """Static int8 quantization of a float edged model, activation ranges measured on
    ``frames``: per-channel symmetric int8 weights, uint8 activations; the classifier (Gemm)
    and the ops after the detection heads stay float. Also returns how many weight channels
    were re-fitted so that x86 kernels without VNNI do not saturate (``fit_qlinear_weights``:
    most of them, as calibrated weights use the whole int8 range)."""
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
                            op_types_to_quantize=QUANTIZED_OPS,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True})
        finally:
            root.setLevel(level)
        model = onnx.load(str(out))
    pad_calibrated_stem(model)
    refitted = fit_qlinear_weights(model)
    drop_unused_constants(model.graph)  # the bounds of the ReLU6s the quantizer folded
    source = onnx.load(str(float_path), load_external_data=False)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    return model, refitted


def pad_calibrated_stem(model: onnx.ModelProto) -> None:
    """Give a calibrated model's stem (a QLinearConv reading the quantized graph input) zero
    input channels up to a multiple of 4, as carried models get (``_Carrier._stem_pad``: ONNX
    Runtime's direct int8 convolution, no int32 accumulator + im2col)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    by_output = {n.output[0]: n for n in graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def is_stem(node: onnx.NodeProto) -> bool:
        if node.op_type != "QLinearConv" or _group(node) != 1:
            return
        source = by_output.get(node.input[0])
        return (source is not None and source.op_type == "QuantizeLinear"
                and source.input[0] in inputs and readers[node.input[0]] == [node])

    index = next((i for i, node in enumerate(graph.node) if is_stem(node)), None)
    if index is None:
        return
    stem = graph.node[index]
    # inputs: x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero[, bias]
    codes = numpy_helper.to_array(inits[stem.input[3]])
    scale = np.broadcast_to(numpy_helper.to_array(inits[stem.input[4]]).astype(np.float64),
                            (codes.shape[0],))
    padding = _stem_order(codes * scale[:, None, None, None], scale)
    if padding is None:
        return
    added: list[onnx.TensorProto] = []

    def init(name: str, array: np.ndarray) -> str:
        added.append(numpy_helper.from_array(array, name))
        return name

    pad_nodes, stem.input[0] = _channel_pad_nodes(stem.input[0], stem.input[0], *padding,
                                                  stem.input[2], init)
    inits[stem.input[3]].CopyFrom(numpy_helper.from_array(_padded_channels(codes, *padding),
                                                          stem.input[3]))
    graph.initializer.extend(added)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:index] + pad_nodes + nodes[index:])


def fit_qlinear_weights(model: onnx.ModelProto) -> int:
    """Re-fit the dense QLinearConv weight channels of ``model`` that x86 kernels without VNNI
    would saturate on (``fit_weights``), rescaling their int32 biases; returns how many."""
    inits = {t.name: t for t in model.graph.initializer}
    refitted = 0
    for node in model.graph.node:
        if node.op_type != "QLinearConv" or _group(node) != 1:
            continue
        # inputs: x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero[, bias]
        codes = numpy_helper.to_array(inits[node.input[3]])
        channels = codes.shape[0]
        scale = np.broadcast_to(numpy_helper.to_array(inits[node.input[4]]).astype(np.float64),
                                (channels,))
        new_codes, new_scale = fit_weights(codes * scale[:, None, None, None], scale, dense=True)
        refit = new_scale != scale
        if not refit.any():
            continue
        refitted += int(refit.sum())
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(new_codes, node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32),
                                                              node.input[4]))
        if len(node.input) > 8 and node.input[8]:
            bias = rescaled_bias(numpy_helper.to_array(inits[node.input[8]]), scale, new_scale)
            inits[node.input[8]].CopyFrom(numpy_helper.from_array(bias, node.input[8]))
    return refitted


# --- checking and writing ----------------------------------------------------------------------

def check_int8(model: onnx.ModelProto, where: str) -> dict[str, int]:
    """Optimize ``model`` as the daemon's sessions do (ORT_ENABLE_ALL) and fail if a float
    Conv / Add is left or a tensor goes back to float only to be quantized again. Returns the
    optimized graph's op counts."""
    graph = optimize_offline(model).graph
    counts: dict[str, int] = {}
    users: dict[str, set[str]] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    left = [node for node in graph.node if node.op_type in FLOAT_OPS]
    if left:
        kinds = sorted({n.op_type for n in left})
        raise EdgedError(f"{where}: {len(left)} float {'/'.join(kinds)} node(s) left after ONNX "
                         f"Runtime's optimizations (first: {left[0].name}): not an int8 model")
    # An op left in float between integer ones (a ReLU6 the quantizer did not fold, say) shows
    # as DequantizeLinear -> QuantizeLinear: a float tensor 4x the size, two conversions.
    trips = [node for node in graph.node if node.op_type == "DequantizeLinear"
             and users.get(node.output[0]) == {"QuantizeLinear"}]
    if trips:
        raise EdgedError(f"{where}: {len(trips)} float round trip(s) (DequantizeLinear -> "
                         "QuantizeLinear) left between integer ops after ONNX Runtime's "
                         f"optimizations (first: {trips[0].name})")
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
    progress = progress or quiet
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
        model, refitted = calibrate(float_path, frames)
        precision = {"weights": "int8", "activations": "uint8", "method": "calibrated",
                     "calibration": {"source": Path(calibration).name, "frames": len(frames)},
                     "refitted_channels": refitted}
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise EdgedError(f"{output}: int8 graph fails the ONNX checker: "
                         f"{first_line(exc)}") from None
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
