"""Memory-aware scheduling: the MobileNetV2 paper's memory-efficient inference (section 5.1).

``load_graph`` reads an ONNX model into an op DAG with tensor sizes; ``MemoryModel.simulate``
gives the live memory of every step of an order under the buffer rules ONNX Runtime applies
(``ORT_LEAN``); ``best_order`` finds a minimum-peak order; ``lean_session_options`` and
``optimize_for_lean`` make ONNX Runtime run an order exactly; ``run_plan`` is ``edged plan``.
A rewrite of the graph is a new ``ModelProto``: ``OpGraph.from_model`` reads it the same way.
"""

from edged.schedule.graph import OpGraph, Tensor, load_graph, reordered_model
from edged.schedule.memory import NO_REUSE, ORT_LEAN, MemoryModel, MemoryRules, Simulation
from edged.schedule.order import OrderResult, best_order, greedy_order, lower_bound

__all__ = [
    "NO_REUSE", "ORT_LEAN", "MemoryModel", "MemoryRules", "OpGraph", "OrderResult",
    "Simulation", "Tensor", "best_order", "greedy_order", "load_graph", "lower_bound",
    "reordered_model",
]
