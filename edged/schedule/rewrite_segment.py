"""Segmentation without full-resolution float logits: resize + argmax in row bands.

A segmentation model ending in ``Resize(logits) -> ArgMax(channels)`` holds the resized logits
(DeepLabv3-513: 21 x 513 x 513 floats, 22 MB) only to pick one label per pixel. A linear or
nearest resize of the spatial axes is separable, ``out = Ry @ x @ Rx^T`` per channel, so a band
of output rows needs only ``Ry``'s rows for that band and the few input rows they touch. Each
band is ``MatMul(Ry_band, x_rows) -> MatMul(., Rx^T) -> ArgMax -> Cast uint8``; the bands are
joined as uint8 and cast back to the int64 the model promises. ``Ry`` and ``Rx`` are taken from
ONNX Runtime's own Resize (resizing an identity), so every coordinate mode means what it means
there. Float sums in another order can flip a near tie: the check is label agreement (>= 99.9 %),
not equality.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edged.schedule.blocks import Builder

_MAX_CLASSES = 256  # labels travel between the bands as uint8


def _resize_matrix(node: onnx.NodeProto, n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: the node's resize along one axis, measured on an identity."""
    from edged.schedule.session import lean_session_options, run_model

    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, n_out, n_in])
    probe = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="resize",
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph(
        [probe], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          [1, 1, n_in, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n_out, n_in])], [sizes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    eye = np.eye(n_in, dtype=np.float32)[None, None]
    return run_model(model, {"x": eye}, lean_session_options(1))["y"][0, 0]


def label_region(builder: Builder, bands: int) -> tuple[set[int], list[onnx.NodeProto]] | None:
    """The ``Resize -> ArgMax`` tail's nodes and nodes computing it in ``bands`` row bands;
    ``None`` when the model does not end so."""
    graph = builder.graph
    nodes = graph.model.graph.node
    for k, node in enumerate(nodes):
        if node.op_type != "ArgMax" or node.output[0] not in graph.outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source = graph.producer.get(node.input[0])
        if source is None or attrs.get("axis") != 1 or attrs.get("keepdims", 1) != 0 \
                or attrs.get("select_last_index", 0):
            return None
        resize = graph.ops[source]
        logits = resize.slot_inputs[0]
        if resize.op_type != "Resize" or logits is None \
                or len(graph.consumers[node.input[0]]) != 1:
            return None
        n, c, h_in, w_in = graph.tensors[logits].shape
        _, c_out, h, w = graph.tensors[node.input[0]].shape
        if n != 1 or c_out != c or c > _MAX_CLASSES:
            return None
        resize_node = nodes[resize.node]
        ry = _resize_matrix(resize_node, h_in, h)
        rx_t = np.ascontiguousarray(_resize_matrix(resize_node, w_in, w).T)
        return {resize.node, k}, _emit(builder, logits, ry, rx_t, bands, node.output[0])
    return None


def _emit(builder: Builder, logits: str, ry: np.ndarray, rx_t: np.ndarray, bands: int,
          output: str) -> list[onnx.NodeProto]:
    start = len(builder.nodes)
    height = ry.shape[0]
    cuts = [round(height * k / bands) for k in range(bands + 1)]
    right = builder.constant(("rx", output), rx_t)
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b <= a:
            continue
        used = np.flatnonzero(np.abs(ry[a:b]).sum(axis=0))
        lo, hi = int(used.min()), int(used.max()) + 1
        left = builder.constant(("ry", output, a, b), np.ascontiguousarray(ry[a:b, lo:hi]))
        rows = builder.rows(logits, lo, hi)
        band = builder.node("MatMul", [left, rows], "rows_resized")
        band = builder.node("MatMul", [band, right], "resized")
        band = builder.node("ArgMax", [band], "labels", axis=1, keepdims=0)
        parts.append(builder.node("Cast", [band], "labels_u8", to=TensorProto.UINT8))
    joined = builder.node("Concat", parts, "labels_u8", axis=1)
    builder.node("Cast", [joined], "labels", output=output, to=TensorProto.INT64)
    return builder.nodes[start:]
