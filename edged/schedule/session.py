"""ONNX Runtime sessions that run a model's ops in the file's order, allocating as simulated.

``lean_session_options``: graph optimizations off (no node is fused, added or moved), execution
order ``PRIORITY_BASED`` (which, with optimizations off, is the file's node order), and every
allocator-level pooling off: the CPU arena (``enable_cpu_mem_arena``), the memory pattern
(``enable_mem_pattern``) and the planner's pooling of dead buffers for later tensors of equal
size (``enable_mem_reuse``). Buffers are then allocated when a tensor is made and freed after its
last reader, which is what ``edged.schedule.memory`` simulates.

Optimizations off make the plain graph about 3x slower (no fusions, no blocked-layout kernels),
so ``optimize_for_lean`` first optimizes the model offline at ``ORT_ENABLE_ALL``, saves it, and
re-sorts the saved nodes into a reference order (fused nodes keep the names of the original
tensors they produce). The saved model is specific to the CPU's vector width: build it on the
target machine.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from edged.domain import usable_cores
from edged.errors import EdgedError, first_line

if TYPE_CHECKING:  # the daemon imports this module for its options only: no onnx there
    import numpy as np
    import onnx

    from edged.schedule.graph import OpGraph


def lean_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options under which ONNX Runtime runs the file's node order with no buffer pooling."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.enable_mem_reuse = False
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def run_model(model: onnx.ModelProto, feed: dict[str, np.ndarray],
              options: ort.SessionOptions) -> dict[str, np.ndarray]:
    """Every output of ``model`` on ``feed``, by name."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed), strict=True))
    except Exception as exc:  # ORT raises private exception types
        raise EdgedError(f"ONNX Runtime cannot run the model ({first_line(exc)})") from None


def optimize_offline(model: onnx.ModelProto, threads: int | None = None) -> onnx.ModelProto:
    """The model as ONNX Runtime's optimizer (``ORT_ENABLE_ALL``) saves it on this machine."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or usable_cores()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="edged-optimize-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises private exception types
            raise EdgedError(f"ONNX Runtime cannot optimize the model ({first_line(exc)})"
                             ) from None
        import onnx

        return onnx.load(options.optimized_model_filepath)


def resort_like(graph: OpGraph, reference: Sequence[str]) -> list[int]:
    """A topological order of ``graph`` following ``reference``, a list of tensor names in the
    order they should be made. An op runs at the rank of the earliest reference tensor it makes
    (or whose name its node carries, as the optimizer's fused nodes do); an op with neither
    runs as soon as its inputs are ready."""
    rank = {name: k for k, name in enumerate(reference)}
    ranks = []
    for op in graph.ops:
        known = [rank[t] for t in op.outputs if t in rank]
        known += [rank[t] for t in rank.keys() & {op.name, op.name.removesuffix("_nchwc")}]
        ranks.append(min(known) if known else None)
    waiting = [len(p) for p in graph.preds]
    effective = [0.0] * len(graph)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order: list[int] = []
    while ready:
        for i in ready:
            inherited = max((effective[p] for p in graph.preds[i]), default=-1.0)
            effective[i] = float(ranks[i]) if ranks[i] is not None else inherited + 0.5
        ready.sort(key=lambda i: (effective[i], i))
        i = ready.pop(0)
        order.append(i)
        for s in graph.succs[i]:
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    return order


def is_quantized(graph: OpGraph) -> bool:
    """Whether ``graph`` is a QDQ (int8) model."""
    return any(op.op_type in ("QuantizeLinear", "DequantizeLinear") for op in graph.ops)


@functools.lru_cache(maxsize=4)  # ``edged plan`` asks for it more than once per graph
def runtime_graph(graph: OpGraph) -> OpGraph:
    """The graph whose memory a plan is about: ``graph`` itself, or for a QDQ (int8) model the
    graph ONNX Runtime's optimizer makes of it on this machine. Its QuantizeLinear /
    DequantizeLinear pairs exist only on paper: they are fused with their ops into integer
    kernels over uint8 tensors, so simulating the QDQ form would count float tensors that are
    never made (6.0 MB instead of 2.5 MB for MobileNetV2)."""
    from edged.schedule.graph import OpGraph

    if not is_quantized(graph):
        return graph
    return OpGraph.from_model(optimize_offline(graph.model),
                              f"{graph.source} (as ONNX Runtime runs it here)")


def optimize_for_lean(graph: OpGraph, order: Sequence[int],
                      threads: int | None = None) -> onnx.ModelProto:
    """Optimize ``graph``'s model offline, then sort the optimized nodes into ``order`` (an order
    of ``graph``'s ops), ready to run under ``lean_session_options``."""
    from edged.schedule.graph import OpGraph, reordered_model

    reference = [t for i in order for t in graph.ops[i].outputs]
    optimized = optimize_offline(graph.model, threads)
    saved = OpGraph.from_model(optimized, f"{graph.source} (optimized)")
    return reordered_model(saved, resort_like(saved, reference))
