"""Read a TFLite flatbuffer without TensorFlow: operators in execution order, tensors dequantized.

Only what the importers need: each operator's type, options and input/output tensors, and a
tensor's float value (``(q - zero_point) * scale``, per-tensor or per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tflite
import torch
from torch import nn

from edged.errors import EdgedError

_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_DTYPES = {
    tflite.TensorType.FLOAT32: np.float32,
    tflite.TensorType.INT32: np.int32,
    tflite.TensorType.UINT8: np.uint8,
    tflite.TensorType.INT8: np.int8,
    tflite.TensorType.INT64: np.int64,
    tflite.TensorType.INT16: np.int16,
}


@dataclass
class Tensor:
    """One tensor of the graph; ``data`` is the raw stored value (None for activations)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    quantized_dimension: int = 0

    def dequantize(self) -> np.ndarray:
        """The float value of a constant tensor (dequantized if it is quantized)."""
        if self.data is None:
            raise EdgedError(f"tensor {self.name!r} holds no constant data")
        if self.scale is None or self.dtype in (np.float32,):
            return self.data.astype(np.float32)
        shape = [1] * self.data.ndim
        if self.scale.size > 1:
            shape[self.quantized_dimension] = -1
        scale = self.scale.reshape(shape).astype(np.float64)
        zero = self.zero_point.reshape(shape).astype(np.float64)
        return ((self.data.astype(np.float64) - zero) * scale).astype(np.float32)


@dataclass
class Operator:
    """One operator: its builtin name (``CONV_2D`` ...), tensors and raw options table."""

    index: int
    type: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    options: object = field(repr=False, default=None)


class TFLiteModel:
    """A parsed ``.tflite`` file (first subgraph)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        buf = self.path.read_bytes()
        try:
            model = tflite.Model.GetRootAsModel(buf, 0)
            graph = model.Subgraphs(0)
            self.tensors = [self._tensor(model, graph, i) for i in range(graph.TensorsLength())]
            self.operators = [self._operator(model, graph, i)
                              for i in range(graph.OperatorsLength())]
        except EdgedError:
            raise
        except Exception as exc:  # the flatbuffer reader raises assorted errors on bad bytes
            raise EdgedError(f"{self.path}: not a readable TFLite model ({exc})") from None

    def _tensor(self, model: tflite.Model, graph: tflite.SubGraph, i: int) -> Tensor:
        t = graph.Tensors(i)
        shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        dtype = _DTYPES.get(t.Type(), np.uint8)
        raw = model.Buffers(t.Buffer()).DataAsNumpy()
        data = None
        if not isinstance(raw, int) and raw is not None and raw.size:
            data = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
        q = t.Quantization()
        scale = zero = None
        axis = 0
        if q is not None and q.ScaleLength():
            scale = q.ScaleAsNumpy()
            zero = q.ZeroPointAsNumpy()
            axis = q.QuantizedDimension()
        return Tensor(i, t.Name().decode(), shape, dtype, data, scale, zero, axis)

    def _operator(self, model: tflite.Model, graph: tflite.SubGraph, i: int) -> Operator:
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        opcode = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _OP_NAMES.get(opcode, str(opcode))
        if name == "CUSTOM":
            name = code.CustomCode().decode()
        inputs = [self.tensors[j] for j in op.InputsAsNumpy() if j >= 0]
        outputs = [self.tensors[j] for j in op.OutputsAsNumpy()]
        return Operator(i, name, inputs, outputs, op.BuiltinOptions())

    def ops(self, *types: str) -> list[Operator]:
        """Operators of the given types, in execution order."""
        return [op for op in self.operators if op.type in types]

    def tensor(self, name: str) -> Tensor:
        """The tensor with this exact name."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise EdgedError(f"{self.path}: no tensor named {name!r}")


def conv_weights(op: Operator) -> tuple[np.ndarray, np.ndarray | None]:
    """A CONV_2D / DEPTHWISE_CONV_2D's float weight in PyTorch layout, and its bias.

    TFLite stores conv weights OHWI and depthwise weights 1HWC; PyTorch wants OIHW and C1HW.
    """
    weight = op.inputs[1].dequantize()
    if op.type == "DEPTHWISE_CONV_2D":
        weight = weight.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
    elif op.type == "CONV_2D":
        weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW
    else:
        raise EdgedError(f"operator {op.index} is {op.type}, not a convolution")
    bias = op.inputs[2].dequantize() if len(op.inputs) > 2 else None
    return np.ascontiguousarray(weight), bias


def load_folded(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, weight: np.ndarray,
                bias: np.ndarray) -> None:
    """Set a conv (and its BatchNorm) to compute ``conv(x, weight) + bias``.

    TFLite folds BatchNorm into the conv bias; the BatchNorm becomes a pass-through carrying
    that bias, which keeps the trainable conv-then-BatchNorm layout (and its names).
    """
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        (conv if bn is None else bn).bias.copy_(torch.from_numpy(bias))
        if bn is not None:
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)


# --- shared by the TFLite importers: TF checkpoints with BatchNorm folded into conv biases ---

Layer = tuple[nn.Conv2d | nn.Linear, nn.BatchNorm2d | None]


def conv_bn_pairs(modules: list[nn.Module]) -> list[Layer]:
    """Each Conv2d / Linear among ``modules`` (in order) with the BatchNorm right after it."""
    pairs: list[Layer] = []
    for module in modules:
        if isinstance(module, nn.Conv2d | nn.Linear):
            pairs.append((module, None))
        elif isinstance(module, nn.BatchNorm2d) and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], module)
    return pairs


def load_convolutions(path: Path, layers: list[Layer]) -> None:
    """Load the file's CONV_2D / DEPTHWISE_CONV_2D weights, in execution order, into ``layers``
    (each with its folded BatchNorm, see ``load_folded``).

    A Linear takes a 1x1 convolution. The first mismatch (count or shape) raises EdgedError:
    the file is not a checkpoint of this architecture.
    """
    ops = TFLiteModel(path).ops("CONV_2D", "DEPTHWISE_CONV_2D")
    for i, ((layer, bn), op) in enumerate(zip(layers, ops, strict=False)):
        weight, bias = conv_weights(op)
        need = tuple(layer.weight.shape)
        if isinstance(layer, nn.Linear):
            need = (*need, 1, 1)
        if weight.shape != need or bias is None:
            raise EdgedError(
                f"{path}: convolution {i} ({op.inputs[1].name.split(';')[0]}) has weight shape "
                f"{list(weight.shape)}, the architecture needs {list(need)} with a bias: "
                "not a checkpoint of this architecture"
            )
        load_folded(layer, bn, weight.reshape(layer.weight.shape), bias)
    if len(ops) != len(layers):
        raise EdgedError(f"{path}: {len(ops)} convolutions, the architecture needs "
                         f"{len(layers)}: not a checkpoint of this architecture")
