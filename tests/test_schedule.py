"""The memory-aware scheduler: simulation, exact order search, lean sessions, edged plan."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edged.errors import EdgedError
from edged.schedule import (
    NO_REUSE,
    ORT_LEAN,
    MemoryModel,
    OpGraph,
    best_order,
    load_graph,
)
from edged.schedule.session import lean_session_options

REPO = Path(__file__).resolve().parent.parent
MEASURE = REPO / "benchmarks" / "memory" / "measure.py"


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vec(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, width])


def _all_orders(graph: OpGraph):
    """Every topological order (brute force)."""
    def extend(order: list[int], done: set[int]):
        if len(order) == len(graph):
            yield list(order)
            return
        for i in graph.file_order:
            if i not in done and graph.preds[i] <= done:
                order.append(i)
                done.add(i)
                yield from extend(order, done)
                done.remove(i)
                order.pop()
    yield from extend([], set())


def _random_branchy(seed: int, n_ops: int = 8) -> onnx.ModelProto:
    """A random DAG of Concat / Relu / Sigmoid / Add / Flatten / ReduceSum over [1, w] tensors:
    sizes change, branches fork and join, in-place and aliasing both occur."""
    rng = random.Random(seed)
    widths = {"x": rng.randint(1, 8) * 100}
    nodes = []
    for k in range(n_ops):
        name = f"t{k}"
        pool = list(widths)
        a = rng.choice(pool[-4:])
        kind = rng.choice(["Concat", "Relu", "Sigmoid", "Add", "Flatten", "ReduceSum"])
        if kind == "Concat":
            b = rng.choice(pool)
            nodes.append(helper.make_node("Concat", [a, b], [name], axis=1))
            widths[name] = widths[a] + widths[b]
        elif kind == "Add":
            same = [t for t in pool if widths[t] == widths[a] and t != a] or [a]
            nodes.append(helper.make_node("Add", [a, rng.choice(same)], [name]))
            widths[name] = widths[a]
        elif kind == "ReduceSum":
            nodes.append(helper.make_node("ReduceSum", [a], [name], keepdims=1))
            widths[name] = 1
        else:
            nodes.append(helper.make_node(kind, [a], [name]))
            widths[name] = widths[a]
    read = {t for node in nodes for t in node.input}
    outputs = [_vec(t, w) for t, w in widths.items() if t not in read and t != "x"]
    return _model(nodes, [_vec("x", widths["x"])], outputs)


@pytest.mark.parametrize("seed", range(12))
def test_exact_search_matches_brute_force(seed: int) -> None:
    graph = OpGraph.from_model(_random_branchy(seed), f"random-{seed}")
    memory = MemoryModel(graph)
    brute = min(memory.simulate(order).peak for order in _all_orders(graph))
    result = best_order(graph, time_limit=30)
    assert result.exact
    assert graph.is_topological(result.order)
    assert memory.simulate(result.order).peak == result.peak == brute
    assert result.lower_bound <= brute


def test_search_beats_file_order_on_two_branches() -> None:
    # x -> u (2x) -> us (sum), x -> v (2x) -> vs (sum), Concat(us, vs): the file runs both
    # wide tensors at once; finishing one branch first keeps one alive.
    nodes = [
        helper.make_node("Concat", ["x", "x"], ["u"], axis=1),
        helper.make_node("Concat", ["x", "x"], ["v"], axis=1),
        helper.make_node("ReduceSum", ["u"], ["us"], keepdims=1),
        helper.make_node("ReduceSum", ["v"], ["vs"], keepdims=1),
        helper.make_node("Concat", ["us", "vs"], ["y"], axis=1),
    ]
    graph = OpGraph.from_model(_model(nodes, [_vec("x", 1000)], [_vec("y", 2)]))
    memory = MemoryModel(graph)
    assert memory.simulate(graph.file_order).peak == 8000 + 8000 + 4
    result = best_order(graph)
    assert result.exact and result.method != "file"
    assert result.peak == 8000 + 4 + 4
    assert memory.simulate(result.order).peak_tensor in ("u", "v")


def test_simulation_of_hand_made_chain() -> None:
    # x (caller's, not counted) -> a = x + 1 -> b = relu(a) (in place) -> r = reshape(b)
    # (alias) -> d = concat(r, r) -> y = sum(d)
    nodes = [
        helper.make_node("Add", ["x", "one"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Reshape", ["b", "shape"], ["r"]),
        helper.make_node("Concat", ["r", "r"], ["d"], axis=1),
        helper.make_node("ReduceSum", ["d"], ["y"], keepdims=0),
    ]
    weights = [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
               helper.make_tensor("shape", TensorProto.INT64, [2], [1, 1000])]
    model = _model(nodes, [_vec("x", 1000)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], weights)
    graph = OpGraph.from_model(model)
    lean = MemoryModel(graph, ORT_LEAN).simulate(graph.file_order)
    assert [s.during for s in lean.steps] == [4000, 4000, 4000, 12000, 8004]
    assert [s.after for s in lean.steps] == [4000, 4000, 4000, 8000, 4]
    peak = lean.steps[lean.peak_step]
    assert (lean.peak, lean.peak_tensor, peak.name) == (12000, "d", "Concat_3")
    plain = MemoryModel(graph, NO_REUSE).simulate(graph.file_order)
    assert [s.during for s in plain.steps] == [4000, 8000, 8000, 12000, 8004]
    counted = MemoryModel(graph, type(ORT_LEAN)(ORT_LEAN.inplace, ORT_LEAN.alias, True))
    assert counted.simulate(graph.file_order).peak == 16000


@pytest.fixture(scope="module")
def mobilenet(converted_model) -> Path:
    return converted_model("mobilenet_v2_imagenet")


@pytest.mark.parametrize("config", ["lean", "lean-optimized"])
def test_computed_peak_matches_measured_heap(mobilenet: Path, config: str) -> None:
    done = subprocess.run([sys.executable, str(MEASURE), str(mobilenet), "--config", config,
                           "--json", "--runs", "3"], capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["computed"] > 5e6  # MobileNetV2-224's first expansion: megabytes, not bytes
    assert abs(row["run_peak"] - row["computed"]) <= 0.10 * row["computed"], row


def test_plan_command_writes_equivalent_reordered_model(mobilenet: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "planned.onnx", tmp_path / "plan.png"
    done = subprocess.run([sys.executable, "-m", "edged", "plan", str(mobilenet), "-o", str(out),
                           "--plot", str(plot)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    graph = load_graph(mobilenet)
    peak = MemoryModel(graph).simulate(graph.file_order)
    assert f"peak {peak.peak / 1024:,.1f} KB in file order" in done.stdout
    assert peak.peak_tensor in done.stdout
    image = cv2.imread(str(plot))
    assert image is not None and image.shape[0] > 100
    planned = onnx.load(str(out))
    record = json.loads({p.key: p.value for p in planned.metadata_props}["edged.plan"])
    assert record["peak_bytes"] <= record["file_order_peak_bytes"] == peak.peak
    name = graph.inputs[0]
    feed = {name: np.random.default_rng(1).standard_normal(graph.tensors[name].shape,
                                                               dtype=np.float32)}
    runs = [ort.InferenceSession(str(path), lean_session_options(1),
                                 providers=["CPUExecutionProvider"]).run(None, feed)
            for path in (mobilenet, out)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


def _one_error_line(path: Path, expected: str) -> None:
    with pytest.raises(EdgedError, match=expected) as caught:
        load_graph(path)
    assert "\n" not in str(caught.value)
    done = subprocess.run([sys.executable, "-m", "edged", "plan", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"edged: {path}")


def test_malformed_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 3)
    _one_error_line(path, "not a readable ONNX model")


def test_dynamic_shape_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "dynamic.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), str(path))
    _one_error_line(path, "graph input 'x' has no static shape")


def test_subgraph_op_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "branch.onnx"
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [_vec("z", 4)])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    onnx.save(_model([node], [cond, _vec("x", 4)], [_vec("y", 4)]), str(path))
    _one_error_line(path, "is a If with a subgraph")
