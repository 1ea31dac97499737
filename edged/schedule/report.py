"""``edged plan``: the live-memory table (and plot) of a model's order and of the best order."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edged.errors import EdgedError
from edged.fetch import atomic_file
from edged.schedule.graph import load_graph, reordered_model
from edged.schedule.memory import MemoryModel, Simulation
from edged.schedule.order import OrderResult, best_order
from edged.schedule.plan import plan_for_budget
from edged.schedule.session import runtime_graph

_COLORS = {"file order": (160, 110, 40), "best order": (40, 40, 210),
           "planned": (40, 40, 210)}  # BGR


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_table(title: str, simulation: Simulation) -> str:
    """One line per step: live KB while the op runs and after it, the largest live tensor; the
    peak step is marked ``*``."""
    peak = simulation.peak_step
    lines = [f"{title}: peak {_kb(simulation.peak)} KB at step {peak} "
             f"({simulation.steps[peak].name}), largest tensor {simulation.peak_tensor}",
             f"{'step':>5}  {'op':<40} {'type':<18} {'live KB':>10} {'after KB':>10}  "
             "largest live tensor"]
    for k, step in enumerate(simulation.steps):
        mark = "*" if k == peak else " "
        lines.append(f"{k:>5}{mark} {step.name[-40:]:<40} {step.op_type[:18]:<18} "
                     f"{_kb(step.during):>10} {_kb(step.after):>10}  {step.largest} "
                     f"({_kb(step.largest_bytes)} KB)")
    return "\n".join(lines)


def draw_plot(path: Path, curves: dict[str, Simulation]) -> None:
    """Live memory per step for each order, drawn with OpenCV into an image file."""
    width, height, margin = 1200, 600, 70
    image = np.full((height, width, 3), 255, np.uint8)
    top = max(sim.peak for sim in curves.values()) * 1.1 or 1
    steps = max(len(sim.steps) for sim in curves.values())
    x_of = lambda k: int(margin + k * (width - 2 * margin) / max(steps - 1, 1))  # noqa: E731
    y_of = lambda b: int(height - margin - b * (height - 2 * margin) / top)  # noqa: E731
    cv2.line(image, (margin, height - margin), (width - margin, height - margin), (0, 0, 0), 1)
    cv2.line(image, (margin, margin), (margin, height - margin), (0, 0, 0), 1)
    for tick in np.linspace(0, top, 6):
        y = y_of(tick)
        cv2.line(image, (margin - 5, y), (margin, y), (0, 0, 0), 1)
        cv2.putText(image, f"{tick / 1e6:.1f}", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "MB live", (5, margin - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(image, "step", (width - margin - 30, height - margin + 35),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for row, (label, sim) in enumerate(curves.items()):
        color = _COLORS.get(label, (0, 0, 0))
        points = np.array([(x_of(k), y_of(s.during)) for k, s in enumerate(sim.steps)], np.int32)
        cv2.polylines(image, [points], False, color, 2 - row, cv2.LINE_AA)
        k = sim.peak_step
        cv2.circle(image, (x_of(k), y_of(sim.peak)), 5, color, -1, cv2.LINE_AA)
        text = f"{label}: peak {sim.peak / 1e6:.2f} MB ({sim.peak_tensor[-50:]})"
        cv2.putText(image, text, (margin + 10, 25 + 20 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    color, 1, cv2.LINE_AA)
    try:
        written = cv2.imwrite(str(path), image)
    except cv2.error:
        written = False
    if not written:
        raise EdgedError(f"{path}: cannot write the plot (use a .png or .jpg path in an "
                         "existing folder)")


def plan_record(result: OrderResult, file_peak: int) -> dict:
    """What the ``edged.plan`` metadata of a reordered model records."""
    return {"version": 1, "rules": "ort-lean", "method": result.method, "exact": result.exact,
            "peak_bytes": result.peak, "file_order_peak_bytes": file_peak,
            "lower_bound_bytes": result.lower_bound,
            "session": "lean (see edged.schedule.session)"}


def run_plan(model: Path, output: Path | None = None, plot: Path | None = None,
             time_limit: float = 10.0, budget: int | None = None,
             verify_image: Path | None = None) -> str:
    """Plan ``model``: the report text; writes the planned model and the plot if asked. With a
    ``budget`` (bytes) the model is rewritten by the first plan that fits (``plan``)."""
    graph = load_graph(model)
    view = runtime_graph(graph)  # an int8 model: the graph ONNX Runtime makes of it here
    memory = MemoryModel(view)
    as_is = memory.simulate(view.file_order)
    inputs = _kb(sum(graph.tensors[t].nbytes for t in graph.inputs))
    if budget is not None:
        planned, written = plan_for_budget(graph, budget, verify_image)
        best = MemoryModel(planned.graph).simulate(planned.order.order)
        added = len(planned.graph) - len(view)
        summary = (f"{model}: plan for a budget of {budget / 1e6:.2f} MB: "
                   f"{planned.plan.describe()}; peak {as_is.peak / 1e6:.2f} MB -> "
                   f"{best.peak / 1e6:.2f} MB; {len(planned.graph)} ops ({added:+d}, session "
                   f"heap about {planned.session_bytes / 1e6:+.2f} MB); graph inputs (held by "
                   f"the caller, not counted): {inputs} KB")
    else:
        result = best_order(view, time_limit=time_limit)
        best = memory.simulate(result.order)
        proof = "proven minimal" if result.exact else f"not proven minimal within {time_limit:g} s"
        summary = (f"{model}: {len(view)} ops; peak {_kb(as_is.peak)} KB in file order, "
                   f"{_kb(best.peak)} KB in the best order ({result.method}, {proof}; "
                   f"lower bound {_kb(result.lower_bound)} KB); graph inputs (held by the "
                   f"caller, not counted): {inputs} KB")
        # An int8 file keeps its portable QDQ form; the daemon orders ORT's graph on its CPU.
        order = graph.file_order if view is not graph else result.order
        written = reordered_model(graph, order, plan_record(result, as_is.peak))
    if output is not None:
        with atomic_file(Path(output)) as f:
            f.write(written.SerializeToString())
    label = "planned" if budget is not None else "best order"
    if plot is not None:
        draw_plot(plot, {"file order": as_is, label: best})
    return "\n\n".join([summary, format_table("file order", as_is), format_table(label, best)])
