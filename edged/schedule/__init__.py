"""Memory-aware scheduling: the MobileNetV2 paper's memory-efficient inference (section 5.1).

``load_graph`` reads an ONNX model into an op DAG with tensor sizes; ``MemoryModel.simulate``
gives the live memory of every step of an order under the buffer rules ONNX Runtime applies
(``ORT_LEAN``); ``best_order`` finds a minimum-peak order; ``lean_session_options`` and
``optimize_for_lean`` make ONNX Runtime run an order exactly; ``run_plan`` is ``edged plan``.
Phase 2 rewrites the graph (``rewrite_split``, ``rewrite_stripes``, ``rewrite_segment``);
``plan_for_budget`` picks the cheapest rewrite that fits a budget; ``prepare`` makes a planned
model ready for the daemon.
"""

import importlib
from typing import Any

# Names resolved on first use: the daemon imports edged.schedule.session / prepare only, and
# must not pay for onnx (about 11 MB of resident memory) to do so.
_EXPORTS = {
    "OpGraph": "graph", "Tensor": "graph", "load_graph": "graph", "reordered_model": "graph",
    "NO_REUSE": "memory", "ORT_LEAN": "memory", "MemoryModel": "memory",
    "MemoryRules": "memory", "Simulation": "memory",
    "OrderResult": "order", "best_order": "order", "greedy_order": "order",
    "lower_bound": "order",
    "Plan": "plan", "plan_for_budget": "plan", "parse_size": "plan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edged.schedule' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edged.schedule.{_EXPORTS[name]}"), name)
