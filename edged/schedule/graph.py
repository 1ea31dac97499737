"""An ONNX model as a DAG of ops over activation tensors with static sizes.

``OpGraph`` is what the simulation (``memory``) and the order search (``order``) work on: the
ops in the file's order, each reading and writing named activation tensors whose byte sizes come
from ``onnx.shape_inference``. Weights (initializers and ``Constant`` nodes) are not activations:
they stay out of the ops and the tensors. Ops of ONNX Runtime's private domains (a model saved by
its optimizer) have no ONNX shape functions; their tensors are sized by running the model once.

A rewrite (phase 2) produces a new ``ModelProto``; ``OpGraph.from_model`` reads it like any file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edged.errors import EdgedError, first_line

PLAN_KEY = "edged.plan"
# Ops whose bodies are subgraphs: their memory is not a function of the outer graph's order.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


@dataclass(frozen=True)
class Tensor:
    """An activation tensor: name, static shape, element type (numpy name) and size in bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class Op:
    """One node: ``inputs`` / ``outputs`` list activation tensors only (no weights, no blanks).

    ``node`` is the node's position in the model's node list, ``first_input`` the activation
    fed to its first input slot (``None`` when that slot holds a weight): in-place reuse and
    aliasing apply to that slot.
    """

    node: int
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    slot_inputs: tuple[str | None, ...]

    @property
    def key(self) -> str:
        """``op_type`` qualified by its domain when not the default one (``nchwc:Conv``)."""
        if self.domain in ("", "ai.onnx"):
            return self.op_type
        return f"{self.domain.rsplit('.', 1)[-1]}:{self.op_type}"


class OpGraph:
    """The ops of a model in file order, with producers, consumers and tensor sizes.

    Ops are numbered 0..n-1 in file order (``Constant`` nodes excluded); an order is a list of
    these numbers. ``preds[i]`` / ``succs[i]`` are the ops feeding / fed by op ``i``.
    """

    def __init__(self, model: onnx.ModelProto, ops: list[Op], tensors: dict[str, Tensor],
                 inputs: tuple[str, ...], outputs: tuple[str, ...], source: str) -> None:
        self.model = model
        self.ops = ops
        self.tensors = tensors
        self.inputs = inputs
        self.outputs = outputs
        self.source = source
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {name: [] for name in tensors}
        for i, op in enumerate(ops):
            for name in op.outputs:
                self.producer[name] = i
            for name in dict.fromkeys(op.inputs):
                self.consumers[name].append(i)
        self.preds: list[frozenset[int]] = [
            frozenset(self.producer[t] for t in op.inputs if t in self.producer) for op in ops]
        succs: list[set[int]] = [set() for _ in ops]
        for i, pred in enumerate(self.preds):
            for p in pred:
                succs[p].add(i)
        self.succs: list[frozenset[int]] = [frozenset(s) for s in succs]

    def __len__(self) -> int:
        return len(self.ops)

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """The initializers as arrays (read on first use; rewrites slice them)."""
        return {init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer}

    @property
    def file_order(self) -> list[int]:
        """The order the model file lists its ops in."""
        return list(range(len(self.ops)))

    def is_topological(self, order: Sequence[int]) -> bool:
        """Whether ``order`` runs every op exactly once, after all of its producers."""
        if sorted(order) != self.file_order:
            return False
        position = {op: k for k, op in enumerate(order)}
        return all(position[p] < position[i] for i in order for p in self.preds[i])

    @classmethod
    def from_model(cls, model: onnx.ModelProto, source: str = "model") -> OpGraph:
        """Build the graph of ``model``; ``source`` names it in error messages."""
        graph = model.graph
        if not graph.node:
            raise EdgedError(f"{source}: ONNX graph has no nodes")
        weights = {init.name for init in graph.initializer}
        for node in graph.node:
            if node.op_type in _SUBGRAPH_OPS:
                raise EdgedError(f"{source}: node {node.name or node.op_type!r} is a "
                                 f"{node.op_type} with a subgraph; the scheduler needs a flat "
                                 "graph")
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                weights.update(node.output)
        inputs = tuple(v.name for v in graph.input if v.name not in weights)
        outputs = tuple(v.name for v in graph.output)
        ops: list[Op] = []
        names: list[str] = list(inputs)
        known = set(inputs) | weights | {""}
        for k, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                continue
            label = node.name or f"{node.op_type}_{k}"
            missing = [t for t in node.input if t not in known]
            if missing:
                raise EdgedError(f"{source}: node {label!r} reads {missing[0]!r} before any node "
                                 "produces it (graph not topologically sorted, or dangling input)")
            slots = tuple(None if t in weights or not t else t for t in node.input)
            ops.append(Op(node=k, name=label, op_type=node.op_type, domain=node.domain,
                          inputs=tuple(t for t in slots if t is not None),
                          outputs=tuple(t for t in node.output if t), slot_inputs=slots))
            known.update(node.output)
            names.extend(t for t in node.output if t)
        missing_outputs = [t for t in outputs if t not in known or t in weights]
        if missing_outputs:
            raise EdgedError(f"{source}: graph output {missing_outputs[0]!r} is not produced by "
                             "any node")
        tensors = _tensor_sizes(model, names, inputs, source)
        return cls(model, ops, tensors, inputs, outputs, source)


def load_graph(path: str | Path) -> OpGraph:
    """Read an ONNX file into an ``OpGraph``; any unreadable or unsupported file is an
    ``EdgedError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise EdgedError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx several others
        raise EdgedError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    return OpGraph.from_model(model, str(path))


def _static_shape(value: onnx.ValueInfoProto) -> tuple[tuple[int, ...], int] | None:
    """(shape, element type) of a tensor value with every dimension known, else ``None``."""
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value < 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims), tensor_type.elem_type


def _tensor_sizes(model: onnx.ModelProto, names: list[str], inputs: tuple[str, ...],
                  source: str) -> dict[str, Tensor]:
    """Shape every activation: ONNX shape inference first, one run of the model for the rest."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:
        raise EdgedError(f"{source}: ONNX shape inference failed ({first_line(exc)})") from None
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        static = _static_shape(value)
        if static is not None:
            shapes[value.name] = static
    for name in inputs:
        if name not in shapes:
            raise EdgedError(f"{source}: graph input {name!r} has no static shape (the scheduler "
                             "needs fixed sizes, batch 1)")
    unknown = [name for name in names if name not in shapes]
    if unknown:
        shapes.update(_shapes_by_running(model, unknown, shapes, source))
    tensors = {}
    for name in names:
        shape, elem_type = shapes[name]
        try:
            dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        except (KeyError, ValueError):
            raise EdgedError(f"{source}: tensor {name!r} has an unsupported element type "
                             f"{elem_type}") from None
        if dtype == np.dtype(object):
            raise EdgedError(f"{source}: tensor {name!r} is a string tensor (unsupported)")
        tensors[name] = Tensor(name, shape, dtype.name, int(np.prod(shape)) * dtype.itemsize)
    return tensors


def _shapes_by_running(model: onnx.ModelProto, names: list[str],
                       shapes: dict[str, tuple[tuple[int, ...], int]],
                       source: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """Size tensors ONNX cannot infer (ONNX Runtime's private ops) by running the model once on
    zeros with those tensors exposed as outputs."""
    import onnxruntime as ort  # only models saved by ONNX Runtime's optimizer get here

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {}
        for value in session.get_inputs():
            shape, elem_type = shapes[value.name]
            feeds[value.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(elem_type))
        arrays = session.run(names, feeds)
    except Exception as exc:  # ORT raises private exception types
        raise EdgedError(f"{source}: cannot infer the shape of tensor {names[0]!r} "
                         f"({first_line(exc)})") from None
    return {name: (tuple(a.shape), helper.np_dtype_to_tensor_dtype(a.dtype))
            for name, a in zip(names, arrays, strict=True)}


def reordered_model(graph: OpGraph, order: Sequence[int], plan: dict | None = None
                    ) -> onnx.ModelProto:
    """A copy of the model with its nodes re-sorted into ``order`` (weights-producing
    ``Constant`` nodes first); ``plan`` is recorded as JSON in the ``edged.plan`` metadata."""
    if not graph.is_topological(order):
        raise EdgedError(f"{graph.source}: the order to write is not a topological order")
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    nodes = list(graph.model.graph.node)
    scheduled = {op.node for op in graph.ops}
    constants = [node for k, node in enumerate(nodes) if k not in scheduled]
    del model.graph.node[:]
    model.graph.node.extend(constants + [nodes[graph.ops[i].node] for i in order])
    if plan is not None:
        kept = [p for p in model.metadata_props if p.key != PLAN_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key=PLAN_KEY, value=json.dumps(plan, sort_keys=True))
    return model
