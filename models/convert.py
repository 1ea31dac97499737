"""Convert a checkpoint into an edged ONNX file: fetch, build, import, export, verify, write.

The registry ties the pieces together. Each architecture module (``ARCHITECTURES``) exposes
``TASK``, ``OUTPUT_NAMES`` and ``build(arch) -> nn.Module``; its checkpoint importers live in
``models/importers/<architecture>.py`` as ``IMPORTERS[format](model, path)``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from edged.catalog import (
    InputSpec,
    converted_path,
    get_model,
    read_label_file,
    read_labels,
)
from edged.errors import EdgedError
from edged.fetch import FetchProgress, locate, no_progress, sha256_file
from edged.preprocess import verification_photo
from models.export import Progress, export_model, quiet
from models.quantize import check_precision, quantize_model, skip_write

ARCHITECTURES: dict[str, str] = {
    "mobilenet_v2": "models.mobilenetv2",
    "ssd_mobilenet_v2": "models.ssd",
    "deeplabv3_mobilenet_v2": "models.deeplabv3",
}

STEPS: tuple[str, ...] = ("fetch", "build", "import", "export", "verify", "write")
INT8_STEPS: tuple[str, ...] = (*STEPS[:-1], "quantize", "agree", "write")  # --int8

# A user's torchvision classifier: torchvision's ImageNet preprocessing (pixel in 0..255).
TORCHVISION_INPUT = InputSpec(224, 224, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def architecture(name: str) -> ModuleType:
    """The module defining architecture ``name``."""
    if name not in ARCHITECTURES:
        raise EdgedError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(ARCHITECTURES[name])


def build_model(arch: dict[str, Any]) -> nn.Module:
    """The network (eval mode, random weights) for an ``arch`` dict holding ``"name"``."""
    args = {k: v for k, v in arch.items() if k != "name"}
    try:
        return architecture(arch["name"]).build(args)
    except (TypeError, ValueError) as exc:
        raise EdgedError(f"architecture {arch['name']!r}: bad arguments {args}: {exc}") from None


def importer(arch_name: str, checkpoint_format: str) -> Callable[[nn.Module, Path], None]:
    """The function loading a ``checkpoint_format`` checkpoint into an ``arch_name`` model."""
    module = importlib.import_module(f"models.importers.{arch_name}")
    try:
        return module.IMPORTERS[checkpoint_format]
    except KeyError:
        raise EdgedError(f"no {checkpoint_format!r} importer for {arch_name!r} (have: "
                         f"{', '.join(module.IMPORTERS)})") from None


def convert_catalog_model(
    name: str,
    output: str | os.PathLike[str] | None = None,
    *,
    mirror: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verify_image: str | os.PathLike[str] | None = None,
    progress: Progress = quiet,
    fetch_progress: FetchProgress = no_progress,
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert catalog model ``name`` to ``output`` (default: the model cache, where
    ``edged.catalog.resolve_model`` finds it). Returns the written path.

    ``precision="int8"``: see ``models.quantize.quantize_model`` (``calibration``: a clip or a
    folder of frames, required for checkpoints without trained quantization).
    """
    spec = get_model(name)
    check_precision(precision, spec.checkpoint_format, calibration)
    output = Path(output) if output is not None else converted_path(name, cache_dir)
    progress("fetch", ", ".join(a.file for a in spec.artifacts))
    files = {a.file: locate(a, cache_dir, mirror=mirror, progress=fetch_progress)
             for a in spec.artifacts}
    checkpoint = files[spec.checkpoint.file]
    metadata = {
        "edged.model": name,
        "edged.source": {"file": spec.checkpoint.file, "sha256": spec.checkpoint.sha256,
                         "upstream": spec.checkpoint.upstream},
    }
    if spec.detect is not None:
        metadata["edged.detect"] = spec.detect
    return _convert(spec.arch, checkpoint, spec.checkpoint_format, read_labels(spec.labels, files),
                    spec.input, metadata, output, verify_image, progress, precision, calibration)


def convert_torchvision(
    weights: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    width_mult: float = 1.0,
    num_classes: int | None = None,
    verify_image: str | os.PathLike[str] | None = None,
    progress: Progress = quiet,
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert a user's torchvision MobileNetV2 classifier (a saved ``state_dict``).

    ``num_classes`` defaults to the number of labels; giving both and having them differ is an
    error. ``precision="int8"`` needs ``calibration`` frames (a clip or a folder).
    """
    check_precision(precision, "torchvision", calibration)
    weights, labels = Path(weights), Path(labels)
    progress("fetch", f"{weights}, {labels}")
    names = read_label_file(labels)
    if not weights.is_file():
        raise EdgedError(f"{weights}: no such checkpoint file")
    arch = {"name": "mobilenet_v2", "width_mult": width_mult,
            "num_classes": len(names) if num_classes is None else num_classes,
            "tf_padding": False}
    metadata = {
        "edged.model": "custom",
        "edged.source": {"file": weights.name, "sha256": sha256_file(weights),
                         "upstream": "local"},
    }
    return _convert(arch, weights, "torchvision", names, TORCHVISION_INPUT, metadata,
                    Path(output), verify_image, progress, precision, calibration)


def _convert(arch: dict[str, Any], checkpoint: Path, checkpoint_format: str, labels: list[str],
             input_spec: InputSpec, metadata: dict[str, Any], output: Path,
             verify_image: str | os.PathLike[str] | None, progress: Progress,
             precision: str = "fp32",
             calibration: str | os.PathLike[str] | None = None) -> Path:
    classes = arch.get("num_classes")
    if classes is not None and classes != len(labels):
        raise EdgedError(f"{len(labels)} labels but the model has {classes} classes")
    image, image_name = verification_photo(verify_image)  # fail on a bad photo before the work

    module = architecture(arch["name"])
    progress("build", f"{arch['name']} {({k: v for k, v in arch.items() if k != 'name'})}")
    model = build_model(arch)
    progress("import", f"{checkpoint.name} ({checkpoint_format})")
    importer(arch["name"], checkpoint_format)(model, checkpoint)
    model.eval()

    metadata = {"edged.task": module.TASK, "edged.arch": arch, "edged.labels": labels,
                **metadata}
    export = {"output_names": module.OUTPUT_NAMES, "input_spec": input_spec,
              "metadata": metadata, "verify_image": image, "verify_name": image_name}
    if precision == "fp32":
        export_model(model, output, progress=progress, **export)
        return output
    # --- int8 (models.quantize): quantize the verified float export, check it, compare ---
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "fp32.onnx"
        export_model(model, float_path, progress=skip_write(progress), **export)
        quantize_model(float_path, output, checkpoint=checkpoint,
                       checkpoint_format=checkpoint_format, calibration=calibration,
                       progress=progress)
    # --- end int8 ---
    return output
