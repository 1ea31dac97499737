"""Phase 2 of the memory scheduler: rewrites equal the originals, budgets, planned sessions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edged.config import parse_config
from edged.errors import EdgedError
from edged.model import load_model
from edged.schedule.blocks import find_blocks
from edged.schedule.graph import PLAN_KEY, OpGraph, load_graph
from edged.schedule.memory import MemoryModel
from edged.schedule.plan import (
    MAX_ABS_DIFF,
    Plan,
    apply_plan,
    check_equivalent,
    parse_size,
    plan_file,
    plan_for_budget,
    verify_feed,
)
from edged.schedule.rewrite_split import split_blocks

REPO = Path(__file__).resolve().parent.parent
MEASURE = REPO / "benchmarks" / "memory" / "measure.py"


@pytest.fixture(scope="module")
def mobilenet(converted_model) -> Path:
    return converted_model("mobilenet_v2_imagenet")


@pytest.fixture(scope="module")
def mobilenet_graph(mobilenet: Path) -> OpGraph:
    return load_graph(mobilenet)


def _peak(model: onnx.ModelProto) -> int:
    graph = OpGraph.from_model(model)
    return MemoryModel(graph).simulate(graph.file_order).peak


def test_blocks_found_by_pattern(mobilenet_graph: OpGraph) -> None:
    blocks = find_blocks(mobilenet_graph)
    # The stem with block 1 (no expansion of its own), then the 16 bottlenecks of Table 2.
    assert len(blocks) == 17
    assert blocks[0].expand.kernel == 3 and blocks[0].expand.stride == 2
    assert [b.add is not None for b in blocks].count(True) == 10
    assert blocks[1].inner == 96 and blocks[1].depthwise.out_shape == (1, 96, 56, 56)


def test_rows_needed_keep_asymmetric_padding(mobilenet_graph: OpGraph) -> None:
    # The stem: 3x3 stride 2 with TF-style "same" padding, 0 rows on top and 1 at the bottom.
    stem = find_blocks(mobilenet_graph)[0].expand
    assert stem.pads[0] == 0 and stem.pads[2] == 1
    assert stem.rows_needed(0, 14) == (0, 29, 0, 0)
    assert stem.rows_needed(14, 28) == (28, 57, 0, 0)
    assert stem.rows_needed(98, 112) == (196, 224, 0, 1)  # the bottom band keeps its pad row


def test_split_equals_original(mobilenet_graph: OpGraph) -> None:
    blocks = find_blocks(mobilenet_graph)
    split = split_blocks(mobilenet_graph, blocks, {b.index: 3 for b in blocks})
    feed = verify_feed(mobilenet_graph)
    figures = check_equivalent(mobilenet_graph.model, split, feed, "split")
    assert figures["logits"]["max_abs_diff"] <= MAX_ABS_DIFF
    assert _peak(split) < 0.75 * _peak(mobilenet_graph.model)
    # Weights are sliced, not copied: the file hardly grows.
    assert split.ByteSize() < 1.01 * mobilenet_graph.model.ByteSize()


def test_stripes_equal_original_and_fit_under_a_megabyte(mobilenet_graph: OpGraph) -> None:
    rest = tuple((index, 3) for index in range(4, 17))  # the blocks after the stride-8 cut
    striped = apply_plan(mobilenet_graph, Plan(stripes=8, piece_bytes=300 * 1024, pieces=rest))
    feed = verify_feed(mobilenet_graph)
    figures = check_equivalent(mobilenet_graph.model, striped, feed, "stripes")
    assert figures["logits"]["max_abs_diff"] <= MAX_ABS_DIFF
    assert _peak(striped) < 1_000_000
    assert _peak(striped) * 6 < _peak(mobilenet_graph.model)


def test_check_rejects_a_wrong_rewrite(mobilenet_graph: OpGraph) -> None:
    blocks = find_blocks(mobilenet_graph)
    wrong = split_blocks(mobilenet_graph, blocks, {3: 2})
    # A 1 % error in one projection: the check must catch it before anything is written.
    weight = next(i for i in wrong.graph.initializer if i.name == blocks[5].project.weight)
    array = onnx.numpy_helper.to_array(weight).copy()
    array *= 1.01
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    with pytest.raises(EdgedError, match="rewritten output 'logits' differs by"):
        check_equivalent(mobilenet_graph.model, wrong, verify_feed(mobilenet_graph), "wrong")


def test_budget_picks_cheapest_plan_that_fits(mobilenet_graph: OpGraph) -> None:
    loose, _ = plan_for_budget(mobilenet_graph, 4_000_000)
    assert not loose.plan.stripes and loose.peak <= 4_000_000  # a split suffices
    tight, model = plan_for_budget(mobilenet_graph, 1_000_000)
    assert tight.plan.stripes and tight.peak <= 1_000_000
    assert len(tight.graph) > len(loose.graph)
    record = json.loads({p.key: p.value for p in model.metadata_props}[PLAN_KEY])
    assert record["version"] == 2 and record["peak_bytes"] == tight.peak
    assert record["check"]["logits"]["max_abs_diff"] <= MAX_ABS_DIFF


def test_budget_that_cannot_be_met_is_one_clear_line(converted_model) -> None:
    # SSDLite's floor is its first head on the 19x19x576 expansion, which no rewrite splits.
    model = converted_model("ssdlite_mobilenet_v2_person")
    done = subprocess.run([sys.executable, "-m", "edged", "plan", str(model), "--budget", "1MB"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    found = re.search(r"no plan fits a budget of 1\.00 MB; the lowest peak reached is "
                      r"(\d+\.\d\d) MB \(4 row stripes", done.stderr)
    assert found and 1.0 < float(found.group(1)) < 4.0, done.stderr
    with pytest.raises(EdgedError, match="'2 parsecs' is not a size"):
        parse_size("2 parsecs")
    assert parse_size("1.5MB") == 1_500_000 and parse_size("800KiB") == 800 * 1024


def test_planned_model_measured_within_ten_percent(mobilenet: Path) -> None:
    done = subprocess.run([sys.executable, str(MEASURE), str(mobilenet), "--config",
                           "planned:1MB", "--json", "--runs", "3"], capture_output=True,
                          text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["computed"] <= 1_100_000  # optimized offline, it may differ a little
    assert abs(row["run_peak"] - row["computed"]) <= 0.10 * row["computed"], row


def test_daemon_runs_planned_model_lean(mobilenet: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "planned.onnx"
    done = subprocess.run([sys.executable, "-m", "edged", "plan", str(mobilenet), "--budget",
                           "2MB", "-o", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "plan for a budget of 2.00 MB" in done.stdout
    planned = load_model(out)
    prepared = list((tmp_path / "cache" / "lean").glob("planned-*.onnx"))
    assert len(prepared) == 1  # optimized on this machine, in the planned order, cached
    assert PLAN_KEY in planned.session.get_modelmeta().custom_metadata_map
    plain = load_model(mobilenet, memory="default")
    assert not list((tmp_path / "cache" / "lean").glob("mobilenet*"))
    frame = verify_feed(load_graph(mobilenet))["image"]
    np.testing.assert_allclose(planned.run(frame)["logits"], plain.run(frame)["logits"],
                               atol=MAX_ABS_DIFF)


def test_memory_setting_in_config(bikes_clip: Path) -> None:
    stream = {"name": "cam", "task": "classify", "source": {"uri": str(bikes_clip)}}
    config = parse_config({"device": "d", "stdout": True, "memory": "lean",
                           "streams": [dict(stream, memory="default"), dict(stream, name="b")]})
    assert config.memory == "lean"
    assert [s.memory for s in config.streams] == ["default", None]
    with pytest.raises(EdgedError, match=r"streams\[0\]\.memory: must be one of auto, lean, "):
        parse_config({"device": "d", "stdout": True,
                      "streams": [dict(stream, memory="small")]})


def test_detector_fits_four_megabytes(converted_model) -> None:
    graph = load_graph(converted_model("ssdlite_mobilenet_v2_person"))
    planned, model = plan_for_budget(graph, 4_000_000)
    assert planned.peak <= 4_000_000 < MemoryModel(graph).simulate(graph.file_order).peak
    record = json.loads({p.key: p.value for p in model.metadata_props}[PLAN_KEY])
    assert set(record["check"]) == {"box_encodings", "class_logits"}


def test_segmentation_labels_in_bands(converted_model) -> None:
    graph = load_graph(converted_model("deeplabv3_mnv2_voc"))
    banded = apply_plan(graph, Plan(label_bands=16))
    figures = check_equivalent(graph.model, banded, verify_feed(graph), "bands")
    assert figures["labels"]["agreement"] >= 0.999
    resized = (1, 21, 513, 513)  # the float logits at full resolution: 22 MB
    assert any(t.shape == resized for t in graph.tensors.values())
    banded_graph = OpGraph.from_model(banded)
    assert not any(t.shape == resized for t in banded_graph.tensors.values())
    bands = [t for name, t in banded_graph.tensors.items() if "/labels/resized" in name]
    assert len(bands) == 16 and max(t.nbytes for t in bands) < 1.5e6


def test_convert_memory_budget_rewrites_the_file(mobilenet: Path, tmp_path: Path) -> None:
    # `edged convert --memory-budget` ends in plan_file on the converted model.
    path = tmp_path / "converted.onnx"
    path.write_bytes(mobilenet.read_bytes())
    line = plan_file(path, 2_000_000)
    record = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[PLAN_KEY])
    assert record["peak_bytes"] <= 2_000_000
    assert line.startswith("planned for 2.00 MB: ")
    assert f"-> {record['peak_bytes'] / 1e6:.2f} MB" in line
    assert not list(tmp_path.glob(".*planning"))  # written in place, atomically


# ---------------------------------------------------------------------------------------------
# int8 (QDQ) models: planned on the graph ONNX Runtime runs, kernel scratch included


@pytest.fixture(scope="module")
def mobilenet_int8(converted_model) -> Path:
    return converted_model("mobilenet_v2_imagenet", precision="int8")


def test_int8_computed_peak_matches_measured_heap(mobilenet_int8: Path) -> None:
    done = subprocess.run([sys.executable, str(MEASURE), str(mobilenet_int8), "--config",
                           "lean-optimized", "--json", "--runs", "3"], capture_output=True,
                          text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    # uint8 tensors plus the integer kernels' scratch: megabytes, far below fp32's 6 MB
    assert 1e6 < row["computed"] < 4e6, row
    assert abs(row["run_peak"] - row["computed"]) <= 0.05 * row["computed"], row


def test_int8_kernel_scratch_follows_the_cpu_family(mobilenet_int8: Path) -> None:
    from edged.schedule.memory import kernel_scratch
    from edged.schedule.session import runtime_graph

    graph = runtime_graph(load_graph(mobilenet_int8))
    convs = [op for op in graph.ops if op.op_type == "QLinearConv"]
    stem, depthwise, expand = convs[0], convs[1], convs[3]  # 3(+1)->32 s2, dw 32, 1x1 16->96
    out = {op.name: graph.tensors[op.outputs[0]] for op in convs}
    pixels = 112 * 112
    # x86: the direct kernel takes all three (the stem's input has a zero fourth channel): one
    # pointer per tap and pixel where the kernel is not a plain 1x1, nothing for 1x1.
    assert kernel_scratch(graph, stem, arm64=False) == 8 * 9 * pixels
    assert kernel_scratch(graph, depthwise, arm64=False) == 8 * 9 * pixels
    assert kernel_scratch(graph, expand, arm64=False) == 0
    # ARM64 runs 1x1 and shallow convolutions as a general GEMM: int32 accumulators (+ im2col).
    assert kernel_scratch(graph, expand, arm64=True) == 4 * out[expand.name].nbytes
    assert kernel_scratch(graph, stem, arm64=True) == 4 * out[stem.name].nbytes + 36 * pixels


def test_int8_plan_reorders_and_runs_lean(mobilenet_int8: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "planned-int8.onnx"
    done = subprocess.run([sys.executable, "-m", "edged", "plan", str(mobilenet_int8),
                           "--budget", "3MB", "-o", str(out)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "reorder only" in done.stdout
    written = onnx.load(str(out))
    assert any(n.op_type == "DequantizeLinear" for n in written.graph.node)  # portable QDQ
    record = json.loads({p.key: p.value for p in written.metadata_props}[PLAN_KEY])
    assert 1e6 < record["peak_bytes"] <= 3e6, record
    planned = load_model(out)
    assert planned.session.get_session_options().enable_mem_reuse is False  # lean
    plain = load_model(mobilenet_int8, memory="default")
    frame = verify_feed(load_graph(mobilenet_int8))["image"]
    np.testing.assert_array_equal(planned.run(frame)["logits"], plain.run(frame)["logits"])
    small = subprocess.run([sys.executable, "-m", "edged", "plan", str(mobilenet_int8),
                            "--budget", "1MB"], capture_output=True, text=True, cwd=REPO)
    assert small.returncode == 2
    assert small.stderr.count("\n") == 1 and "int8 model is only reordered" in small.stderr
