"""Read a TensorFlow 1 frozen GraphDef (``.pb``) without TensorFlow.

TensorFlow's protos come compiled with the ``tensorboard`` wheel; with ``protobuf`` they parse a
frozen graph. This reader gives what importers need: nodes by name, their attributes, constants
as numpy arrays, and the conversion of TF filter layouts to PyTorch's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import graph_pb2, node_def_pb2, tensor_pb2, types_pb2

from edged.errors import EdgedError

# TF DataType -> (numpy dtype, the TensorProto field holding values when tensor_content is empty)
_DTYPES: dict[int, tuple[type, str]] = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
}


def tensor_to_numpy(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto's value (packed ``tensor_content`` or a repeated, possibly splatted field)."""
    if tensor.dtype not in _DTYPES:
        raise EdgedError(f"unsupported tensor type {types_pb2.DataType.Name(tensor.dtype)}")
    dtype, field = _DTYPES[tensor.dtype]
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape).copy()
    values = np.asarray(getattr(tensor, field), dtype=dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if values.size == count:
        return values.reshape(shape)
    if values.size == 1:  # TF stores a constant fill as its single value
        return np.full(shape, values[0], dtype=dtype)
    raise EdgedError(f"tensor holds {values.size} values for shape {list(shape)}")


class GraphDef:
    """A parsed frozen GraphDef: ``node(name)``, ``constant(name)``, ``children(scope)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        graph = graph_pb2.GraphDef()
        try:
            graph.ParseFromString(self.path.read_bytes())
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise EdgedError(f"{self.path}: not a readable TensorFlow GraphDef ({exc})") from None
        if not graph.node:
            raise EdgedError(f"{self.path}: not a TensorFlow GraphDef (no nodes)")
        self.nodes: dict[str, node_def_pb2.NodeDef] = {n.name: n for n in graph.node}
        self._children: dict[str, list[node_def_pb2.NodeDef]] = {}
        for node in graph.node:
            self._children.setdefault(node.name.rpartition("/")[0], []).append(node)

    def node(self, name: str) -> node_def_pb2.NodeDef:
        """The node called ``name``."""
        try:
            return self.nodes[name]
        except KeyError:
            raise EdgedError(f"{self.path}: no node named {name!r}") from None

    def children(self, scope: str) -> list[node_def_pb2.NodeDef]:
        """The nodes directly inside ``scope`` (``scope/x``, not ``scope/y/x``), in graph order."""
        return self._children.get(scope, [])

    def constant(self, name: str) -> np.ndarray:
        """The value of the ``Const`` node ``name`` (following ``Identity`` nodes such as
        ``.../read``)."""
        node = self.node(name)
        while node.op == "Identity":
            node = self.node(node.input[0].split(":")[0])
        if node.op != "Const":
            raise EdgedError(f"{self.path}: node {name!r} is a {node.op}, not a constant")
        try:
            return tensor_to_numpy(node.attr["value"].tensor)
        except EdgedError as exc:
            raise EdgedError(f"{self.path}: constant {name!r}: {exc}") from None


def conv_weight(value: np.ndarray, depthwise: bool) -> np.ndarray:
    """A TF filter in PyTorch layout: Conv2D HWIO -> OIHW; depthwise HWCM -> (C*M)1HW."""
    if value.ndim != 4:
        raise EdgedError(f"a conv filter has 4 dimensions, got shape {list(value.shape)}")
    if depthwise:
        h, w, c, m = value.shape
        return np.ascontiguousarray(value.reshape(h, w, c * m).transpose(2, 0, 1)[:, None])
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
