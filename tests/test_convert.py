"""``edged convert`` through the real command line: a catalog model into the cache, a user's
torchvision checkpoint round trip, and every bad input giving one line and no output file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data
from torch import nn

from edged.catalog import CATALOG, resolve_model
from edged.cli import main
from edged.errors import EdgedError
from models.convert import TORCHVISION_INPUT, build_model, importer
from models.export import compare_outputs, input_tensor
from models.mobilenetv2 import mobilenet_v2

LABELS = [f"class {i}" for i in range(10)]


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting failure; return its single error line (after any progress)."""
    assert main(argv) == 2
    *progress, error = capsys.readouterr().err.splitlines()
    assert error.startswith("edged: ") and all(line.startswith("[") for line in progress)
    return error


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A trained-looking torchvision-layout classifier (width 0.5, 10 classes) saved as .pth,
    with a labels file: (model, weights, labels)."""
    folder = tmp_path_factory.mktemp("custom")
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.5)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model.eval()
    weights = folder / "my.pth"
    torch.save(model.state_dict(), weights)
    labels = folder / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return model, weights, labels


def test_convert_catalog_model_into_cache(weights_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    argv = ["convert", "mobilenet_v2_imagenet", "--mirror", str(weights_dir),
            "--cache-dir", str(cache)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    steps = [line.split("]")[0] + "]" for line in captured.err.splitlines()]
    assert steps[0] == "[1/6]" and steps[-1] == "[6/6]"
    assert [f"[{i}/6]" for i in range(1, 7)] == sorted(set(steps))
    path = resolve_model("mobilenet_v2_imagenet", cache)
    assert captured.out.startswith(f"wrote {path} ")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = input_tensor(data.coffee(), CATALOG["mobilenet_v2_imagenet"].input)
    labels = json.loads(session.get_modelmeta().custom_metadata_map["edged.labels"])
    assert labels[int(np.argmax(session.run(None, {"image": x})[0]))] == "espresso"
    assert list(cache.rglob("*.part")) == []


def test_convert_torchvision_checkpoint(custom: tuple[nn.Module, Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, weights, labels = custom
    out = tmp_path / "custom.onnx"
    photo = tmp_path / "chelsea.png"
    cv2.imwrite(str(photo), cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
    argv = ["convert", "--arch", "mobilenet_v2", "--width-mult", "0.5", "--weights",
            str(weights), "--labels", str(labels), "-o", str(out), "--verify-image", str(photo)]
    assert main(argv) == 0, capsys.readouterr().err

    # The saved names load strictly into the bundled definition.
    reloaded = mobilenet_v2(num_classes=10, width_mult=0.5)
    reloaded.load_state_dict(torch.load(weights, weights_only=True), strict=True)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["edged.model"] == "custom" and meta["edged.labels"] == LABELS
    assert meta["edged.arch"] == {"name": "mobilenet_v2", "width_mult": 0.5, "num_classes": 10,
                                  "tf_padding": False}
    assert meta["edged.verify"]["image"] == "chelsea.png"
    x = input_tensor(data.astronaut(), TORCHVISION_INPUT)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    (actual,) = session.run(["logits"], {"image": x})
    assert np.max(np.abs(actual - expected)) <= 1e-4


@pytest.mark.parametrize("case", ["unknown name", "missing labels", "label count",
                                  "truncated", "other architecture", "wrong width",
                                  "tflite as pth", "bad verify image", "weights without arch",
                                  "sha mismatch"])
def test_bad_input_gives_one_line_and_no_file(
        case: str, custom: tuple[nn.Module, Path, Path], weights_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _model, weights, labels = custom
    out = tmp_path / "out.onnx"
    own = ["convert", "--arch", "mobilenet_v2", "--width-mult", "0.5", "-o", str(out)]
    argv = [*own, "--weights", str(weights), "--labels", str(labels)]
    if case == "unknown name":
        argv, expected = ["convert", "mobilenet_v3", "-o", str(out)], "unknown model"
    elif case == "missing labels":
        argv[-1], expected = str(tmp_path / "none.txt"), "no such label file"
    elif case == "label count":
        argv, expected = [*argv, "--num-classes", "5"], "10 labels but the model has 5 classes"
    elif case == "truncated":
        cut = tmp_path / "cut.pth"
        cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        argv[argv.index(str(weights))], expected = str(cut), "not a readable PyTorch checkpoint"
    elif case == "other architecture":
        other = tmp_path / "other.pth"
        torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
                   .state_dict(), other)
        argv[argv.index(str(weights))] = str(other)
        expected = "missing 'features.0.0.weight'.*not a checkpoint of this architecture"
    elif case == "wrong width":
        argv[argv.index("0.5")], expected = "1.0", "features.0.0.weight has shape"
    elif case == "tflite as pth":
        tflite = weights_dir / CATALOG["mobilenet_v2_imagenet"].checkpoint.mirror
        argv[argv.index(str(weights))] = str(tflite)
        expected = "not a readable PyTorch checkpoint"
    elif case == "bad verify image":
        argv, expected = [*argv, "--verify-image", str(labels)], "not a readable image"
    elif case == "weights without arch":
        argv = ["convert", "mobilenet_v2_imagenet", "--weights", str(weights), "-o", str(out)]
        expected = "--weights goes with --arch"
    else:
        mirror = tmp_path / "mirror"
        spec = CATALOG["mobilenet_v2_imagenet"]
        for artifact in spec.artifacts:
            (mirror / artifact.mirror).parent.mkdir(parents=True, exist_ok=True)
            (mirror / artifact.mirror).write_bytes((weights_dir / artifact.mirror).read_bytes())
        (mirror / spec.checkpoint.mirror).write_bytes(weights.read_bytes())  # another file
        argv = ["convert", "mobilenet_v2_imagenet", "--mirror", str(mirror), "-o", str(out)]
        expected = "sha256 mismatch.*refused"
    err = _fail(argv, capsys)
    assert re.search(expected, err), err
    assert not out.exists() and list(tmp_path.glob(".*.part")) == []


def test_tflite_checkpoint_of_another_architecture(weights_dir: Path, tmp_path: Path) -> None:
    model = build_model(CATALOG["mobilenet_v2_imagenet"].arch)
    load = importer("mobilenet_v2", "tflite")
    deeplab = weights_dir / CATALOG["deeplabv3_mnv2_voc"].checkpoint.mirror
    # DeepLab's backbone is MobileNetV2's up to the 320-channel block; then the head differs.
    with pytest.raises(EdgedError, match=r"convolution 51 .* has weight shape \[256, 320, 1, 1\]"
                                         r", the architecture needs \[1280, 320, 1, 1\]"):
        load(model, deeplab)
    cut = tmp_path / "cut.tflite"
    source = weights_dir / CATALOG["mobilenet_v2_imagenet"].checkpoint.mirror
    cut.write_bytes(source.read_bytes()[:100_000])
    with pytest.raises(EdgedError, match="cut.tflite: not a readable TFLite model"):
        load(model, cut)


def test_verification_fails_loudly_on_a_difference() -> None:
    model = mobilenet_v2(num_classes=10, width_mult=0.5).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(input_tensor(data.chelsea(), TORCHVISION_INPUT)))
    expected = [logits.numpy()]
    assert compare_outputs(["logits"], expected, [expected[0] + 5e-5])["logits"] <= 1e-4
    with pytest.raises(EdgedError, match="'logits': ONNX Runtime differs from PyTorch by 0.001"):
        compare_outputs(["logits"], expected, [expected[0] + 1e-3])
    with pytest.raises(EdgedError, match="shape"):
        compare_outputs(["logits"], expected, [expected[0][:, :5]])
