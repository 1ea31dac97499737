"""Loading edged ONNX models (edged.model): the real converted models, and every kind of bad file
giving one clear line that names the file and the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edged.detection import SsdAnchorParams, generate_ssd_anchors
from edged.errors import EdgedError
from edged.model import load_model


@pytest.fixture(scope="module")
def classifier(converted_model: Callable[..., Path]) -> Path:
    return converted_model("mobilenet_v2_imagenet")


@pytest.fixture(scope="module")
def detector(converted_model: Callable[..., Path]) -> Path:
    return converted_model("ssd_mobilenet_v2_coco")


def test_real_classifier(classifier: Path) -> None:
    model = load_model(classifier, threads=1)
    info = model.info
    assert (info.task, info.name, info.path) == ("classify", "mobilenet_v2_imagenet", classifier)
    assert len(info.labels) == 1001 and info.labels[0] == "background"
    assert (info.input.width, info.input.height) == (224, 224)
    assert info.detect is None and info.arch["name"] == "mobilenet_v2"
    outputs = model.run(np.zeros((1, 3, 224, 224), np.float32))
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (1, 1001)


def test_run_rejects_a_wrong_tensor(classifier: Path) -> None:
    model = load_model(classifier)
    with pytest.raises(EdgedError, match="inference failed: Got invalid dimensions") as caught:
        model.run(np.zeros((1, 3, 10, 10), np.float32))
    assert "\n" not in str(caught.value)


def test_session_options(classifier: Path) -> None:
    options = load_model(classifier, threads=2, arena=False).session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena is False
    assert load_model(classifier).session.get_session_options().enable_cpu_mem_arena is True


def test_real_detector(detector: Path) -> None:
    info = load_model(detector).info
    assert info.task == "detect" and len(info.labels) == 91 and info.labels[1] == "person"
    assert info.detect.anchors.shape == (1917, 4)
    np.testing.assert_allclose(info.detect.anchors, generate_ssd_anchors(SsdAnchorParams()),
                               atol=1e-4)
    assert info.detect.box_scales == (10.0, 10.0, 5.0, 5.0)
    assert (info.detect.nms_iou, info.detect.max_detections) == (0.6, 20)


def test_real_segmenter(converted_model: Callable[..., Path]) -> None:
    model = load_model(converted_model("deeplabv3_mnv2_voc"))
    assert model.info.task == "segment" and len(model.info.labels) == 21
    assert (model.info.input.width, model.info.input.height) == (513, 513)


class Raw(str):
    """A metadata value written as is, not as a JSON document."""


def _with_metadata(source: Path, target: Path, **changes: object) -> Path:
    """Copy an ONNX file with metadata entries replaced (value None: removed)."""
    proto = onnx.load(str(source))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        key = "edged." + key
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, Raw) else json.dumps(value)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(target))
    return target


def _metadata(path: Path, key: str) -> object:
    proto = onnx.load(str(path), load_external_data=False)
    return json.loads(next(p.value for p in proto.metadata_props if p.key == "edged." + key))


def _assert_one_line_error(path: Path, pattern: str) -> None:
    with pytest.raises(EdgedError, match=pattern) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EdgedError, match="model file not found: .*nope.onnx"):
        load_model(tmp_path / "nope.onnx")


def test_bad_thread_count(classifier: Path) -> None:
    with pytest.raises(EdgedError, match="threads must be at least 1, got 0"):
        load_model(classifier, threads=0)


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", "half"])
def test_not_onnx_or_truncated(classifier: Path, tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "bad.onnx"
    data = classifier.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "half" else content)
    _assert_one_line_error(path, "not a readable ONNX model")


def test_onnx_without_edged_metadata(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["image"], ["logits"])], "plain",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(path))
    _assert_one_line_error(path, "ONNX file without edged metadata")


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"format": 2}, "unsupported edged.format 2"),
    ({"input": None}, "metadata lacks edged.input"),
    ({"task": "track"}, "edged.task must be one of classify, detect, segment, got 'track'"),
    ({"task": ["classify"]}, r"edged.task must be one of .*, got \['classify'\]"),
    ({"labels": Raw("[not json")}, "metadata edged.labels is not valid JSON"),
    ({"labels": []}, "edged.labels must be a non-empty list of strings"),
    ({"labels": ["background", "cat"]}, "2 labels but logits has 1001 classes"),
    ({"input": {"name": "image", "width": 300, "height": 300, "mean": [128] * 3,
                "std": [128] * 3}}, r"input shape \[1, 3, 224, 224\] does not match edged.input"),
    ({"input": {"name": "pixels", "width": 224, "height": 224, "mean": [128] * 3,
                "std": [128] * 3}}, "graph has no input 'pixels'"),
    ({"input": {"name": "image", "width": 224}}, "edged.input is incomplete or malformed"),
    ({"input": {"name": "image", "width": 224, "height": 224, "mean": [128] * 3,
                "std": [0, 1, 1]}}, "std > 0"),
    ({"input": {"name": "image", "width": 224, "height": 224, "mean": [float("nan")] * 3,
                "std": [128] * 3}}, "mean/std must be 3 finite values"),
    ({"input": {"name": "image", "width": 224, "height": 224, "mean": [128] * 3,
                "std": [float("inf"), 1, 1]}}, "mean/std must be 3 finite values"),
    ({"task": "segment"}, "segment model lacks output"),
])
def test_metadata_inconsistent_with_graph(classifier: Path, tmp_path: Path,
                                          changes: dict, pattern: str) -> None:
    path = _with_metadata(classifier, tmp_path / "edited.onnx", **changes)
    _assert_one_line_error(path, pattern)


def test_detect_metadata_checked(detector: Path, tmp_path: Path) -> None:
    detect = _metadata(detector, "detect")
    few = _with_metadata(detector, tmp_path / "few.onnx",
                         detect={**detect, "anchors": [[0.5, 0.5, 0.1, 0.1]] * 10})
    _assert_one_line_error(few, "10 anchors in edged.detect but the graph predicts 1917 boxes")
    odd = _with_metadata(detector, tmp_path / "odd.onnx",
                         detect={**detect, "anchors": {"generator": "ssd", "stride": 16}})
    _assert_one_line_error(odd, "edged.detect: unknown anchor generator parameter.*stride")
    one_layer = _with_metadata(detector, tmp_path / "one_layer.onnx", detect={
        **detect, "anchors": {**detect["anchors"], "num_layers": 1, "feature_map_sizes": [19]}})
    _assert_one_line_error(one_layer, "edged.detect: anchor generator: num_layers must be an "
                                      "integer >= 2, got 1")
    none = _with_metadata(detector, tmp_path / "none.onnx", detect=None)
    _assert_one_line_error(none, "detect model without edged.detect anchors")
    coder = _with_metadata(detector, tmp_path / "coder.onnx",
                           detect={**detect, "box_coder": [10, 10, 5, 5]})
    _assert_one_line_error(coder, "edged.detect is malformed")
    labels = _with_metadata(detector, tmp_path / "labels.onnx", labels=["background", "person"])
    _assert_one_line_error(labels, "2 labels but class_logits has 91 columns")
