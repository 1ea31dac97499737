"""Inverted-residual blocks found by pattern in an ONNX graph, and a builder for rewrites.

A block is ``Conv(+act) -> depthwise Conv(+act) -> Conv [-> Add(block input)]`` where each
inner tensor has one reader: MobileNetV2's bottleneck (1x1 expand, 3x3 depthwise, 1x1 project),
and also its stem with block 1 (3x3 stem conv, depthwise, project), which is how the paper's
first-layer trick falls out of the same split. ``find_blocks`` lists them in file order;
``Builder`` makes the nodes and weight slices of a rewrite, sharing each slice between stripes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edged.schedule.graph import OpGraph

_ACTS = frozenset({"Clip", "Relu"})


@dataclass(frozen=True)
class ConvLayer:
    """One Conv node with its optional activation node (Clip/Relu) and static shapes."""

    conv: int  # node index in the model
    act: int | None
    input: str
    output: str  # the activation's output, or the conv's
    weight: str
    bias: str | None
    kernel: int
    stride: int
    dilation: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    group: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def nodes(self) -> tuple[int, ...]:
        return (self.conv,) if self.act is None else (self.conv, self.act)

    def rows_needed(self, a: int, b: int) -> tuple[int, int, int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[a, b)`` read (clamped to the input),
        and the top / bottom zero padding that replaces the rows outside it."""
        height = self.in_shape[2]
        lo = a * self.stride - self.pads[0]
        hi = (b - 1) * self.stride - self.pads[0] + self.dilation * (self.kernel - 1) + 1
        return max(lo, 0), min(hi, height), max(0, -lo), max(0, hi - height)


@dataclass(frozen=True)
class Block:
    """``expand -> depthwise -> project [+ input]``; ``inner`` channels between them."""

    expand: ConvLayer
    depthwise: ConvLayer
    project: ConvLayer
    add: int | None  # node index of the residual Add
    input: str
    output: str
    index: int  # position among the model's blocks

    @property
    def nodes(self) -> tuple[int, ...]:
        extra = () if self.add is None else (self.add,)
        return self.expand.nodes + self.depthwise.nodes + self.project.nodes + extra

    @property
    def inner(self) -> int:
        return self.expand.out_shape[1]

    def inner_bytes(self, rows: int | None = None) -> int:
        """Bytes of the expanded tensor (fp32), for ``rows`` of it (default: all)."""
        _, c, h, w = self.expand.out_shape
        return 4 * c * (h if rows is None else rows) * w


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_layer(graph: OpGraph, k: int, readers: dict[str, list[int]]) -> ConvLayer | None:
    nodes = graph.model.graph.node
    node = nodes[k]
    attrs = _attrs(node)
    weights = graph.weights
    if node.op_type != "Conv" or node.input[1] not in weights or "auto_pad" in attrs and \
            attrs["auto_pad"] not in (b"NOTSET", "NOTSET"):
        return None
    kernel = attrs.get("kernel_shape", list(weights[node.input[1]].shape[2:]))
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    if len(kernel) != 2 or kernel[0] != kernel[1] or strides[0] != strides[1] \
            or dilations[0] != dilations[1]:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in weights:
        return None
    output, act = node.output[0], None
    follow = readers.get(output, [])
    if len(follow) == 1 and nodes[follow[0]].op_type in _ACTS \
            and not any(t in graph.tensors for t in nodes[follow[0]].input[1:]):
        act = follow[0]
        output = nodes[act].output[0]
    pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
    return ConvLayer(k, act, node.input[0], output, node.input[1], bias, kernel[0], strides[0],
                     dilations[0], (pads[0], pads[1], pads[2], pads[3]), attrs.get("group", 1),
                     graph.tensors[node.input[0]].shape, graph.tensors[output].shape)


def find_blocks(graph: OpGraph) -> list[Block]:
    """Every ``Conv(+act) -> depthwise Conv(+act) -> Conv [-> Add]`` in file order whose inner
    tensors are read by the next layer only."""
    nodes = graph.model.graph.node
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(k)
    outputs = set(graph.outputs)
    blocks: list[Block] = []
    for k, node in enumerate(nodes):
        if node.op_type != "Conv" or node.input[0] not in graph.tensors:
            continue
        expand = _conv_layer(graph, k, readers)
        if expand is None or expand.group != 1 or expand.act is None:
            continue
        chain = [expand]
        for _ in range(2):
            nxt = readers.get(chain[-1].output, [])
            if len(nxt) != 1 or chain[-1].output in outputs:
                break
            layer = _conv_layer(graph, nxt[0], readers)
            if layer is None:
                break
            chain.append(layer)
        if len(chain) < 3:
            continue
        _, dw, project = chain
        inner = expand.out_shape[1]
        if dw.group != inner or dw.out_shape[1] != inner or dw.act is None \
                or project.group != 1 or project.kernel != 1 or project.act is not None:
            continue
        add, output = None, project.output
        after = readers.get(project.output, [])
        if len(after) == 1 and nodes[after[0]].op_type == "Add" \
                and set(nodes[after[0]].input) == {expand.input, project.output}:
            add, output = after[0], nodes[after[0]].output[0]
        blocks.append(Block(expand, dw, project, add, expand.input, output, len(blocks)))
    return blocks


def groups_for(channels: int, pieces: int, align: int = 8) -> list[tuple[int, int]]:
    """``channels`` cut into about ``pieces`` groups, each a multiple of ``align`` channels
    where possible (ONNX Runtime's blocked kernels want multiples of 8)."""
    pieces = max(1, min(pieces, channels))
    size = -(-channels // pieces)
    if channels >= align * pieces:
        size = -(-size // align) * align
    cuts = list(range(0, channels, size)) + [channels]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass
class Builder:
    """Collects the nodes and initializers of a rewrite; weight slices are made once."""

    graph: OpGraph
    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _made: dict[tuple, str] = field(default_factory=dict)
    scope: str = ""  # the part of the rewrite being built, in every name (``block3``)
    _count: int = 0

    def name(self, hint: str) -> str:
        """A fresh tensor / node name: ``prefix/scope/hint_n``."""
        self._count += 1
        return f"{self.prefix}/{self.scope}/{hint}_{self._count}"

    def constant(self, key: tuple, array: np.ndarray) -> str:
        """An initializer holding ``array``, shared by every caller with the same ``key``."""
        if key not in self._made:
            name = self.name("w")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._made[key] = name
        return self._made[key]

    def weight_slice(self, name: str, cuts: tuple[tuple[int, int, int], ...]) -> str:
        """Weight ``name`` cut to ``[lo, hi)`` along each ``(axis, lo, hi)`` of ``cuts``
        (itself when nothing is cut)."""
        array = self.graph.weights[name]
        cuts = tuple(c for c in cuts if (c[1], c[2]) != (0, array.shape[c[0]]))
        if not cuts:
            return name
        index = [slice(None)] * array.ndim
        for axis, lo, hi in cuts:
            index[axis] = slice(lo, hi)
        return self.constant(("slice", name, cuts), np.ascontiguousarray(array[tuple(index)]))

    def node(self, op_type: str, inputs: list[str], hint: str, output: str | None = None,
             **attrs) -> str:
        """Append one node; returns its output name (``output``, else a fresh one)."""
        output = output or self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def conv(self, layer: ConvLayer, x: str, channels: tuple[int, int] | None = None,
             in_channels: tuple[int, int] | None = None, bias: bool = True,
             pads: tuple[int, int] | None = None, output: str | None = None) -> str:
        """``layer`` (with its activation) on ``x``: only output ``channels`` (a depthwise layer
        also reads only those), only ``in_channels`` of its weights' input axis, rows padded
        ``pads`` (top, bottom) instead of its own; ``output`` names the result."""
        nodes = self.graph.model.graph.node
        lo, hi = channels or (0, layer.out_shape[1])
        cuts = ((0, lo, hi),) if in_channels is None else ((0, lo, hi), (1, *in_channels))
        inputs = [x, self.weight_slice(layer.weight, cuts)]
        if bias and layer.bias is not None:
            inputs.append(self.weight_slice(layer.bias, ((0, lo, hi),)))
        top, bottom = pads if pads is not None else (layer.pads[0], layer.pads[2])
        group = hi - lo if layer.group > 1 else 1
        attrs = dict(kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2,
                     dilations=[layer.dilation] * 2, group=group,
                     pads=[top, layer.pads[1], bottom, layer.pads[3]])
        last = output if layer.act is None and output else self.name("conv")
        self.nodes.append(helper.make_node("Conv", inputs, [last], name=last, **attrs))
        if layer.act is None:
            return last
        act = nodes[layer.act]
        result = output or self.name(act.op_type.lower())
        self.nodes.append(helper.make_node(act.op_type, [last, *act.input[1:]], [result],
                                           name=result, **_attrs(act)))
        return result

    def ints(self, *values: int) -> str:
        """An int64 initializer holding ``values``."""
        return self.constant(("i64", values), np.array(values, np.int64))

    def rows(self, x: str, lo: int, hi: int) -> str:
        """Rows ``[lo, hi)`` (axis 2) of ``x``, copied."""
        return self.node("Slice", [x, self.ints(lo), self.ints(hi), self.ints(2)], "rows")


def replace_nodes(graph: OpGraph, builder: Builder,
                  regions: list[tuple[set[int], list[onnx.NodeProto]]]) -> onnx.ModelProto:
    """The model with each region's nodes replaced by its new nodes (placed where the region's
    first node was), ``Constant`` nodes first (new nodes read them), ``builder``'s weights
    added and unused weights dropped."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    removed = set().union(*(nodes for nodes, _ in regions))
    placed = {min(nodes): new for nodes, new in regions}
    constants = [n for n in graph.model.graph.node if n.op_type == "Constant"]
    kept: list[onnx.NodeProto] = list(constants)
    for k, node in enumerate(graph.model.graph.node):
        kept.extend(placed.get(k, ()))
        if k not in removed and node.op_type != "Constant":
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(builder.initializers)
    used = {t for n in model.graph.node for t in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.value_info[:]
    return model
