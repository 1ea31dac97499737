"""Loading an edged ONNX model: its metadata (docs/model-format.md) and one ONNX Runtime session.

``load_model`` checks everything it can before the first frame: the file, the format version,
the metadata against the graph (input shape, outputs, label count), so a wrong model is one clear
error at start-up rather than a broken result later.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.catalog import InputSpec
from edged.config import Task
from edged.detection import SsdAnchorParams, generate_ssd_anchors
from edged.domain import usable_cores
from edged.errors import EdgedError

FORMAT_VERSION = 1
OUTPUTS: dict[str, tuple[str, ...]] = {
    "classify": ("logits",),
    "detect": ("box_encodings", "class_logits"),
    "segment": ("labels",),
}
_REQUIRED_KEYS = ("edged.format", "edged.task", "edged.labels", "edged.input")


@dataclass(frozen=True)
class DetectParams:
    """How to turn SSD outputs into boxes: anchors ``[A, 4]`` ``(yc, xc, h, w)``, coder, NMS."""

    anchors: np.ndarray
    box_scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    background: int = 0
    nms_iou: float = 0.6
    max_detections: int = 20


@dataclass(frozen=True)
class ModelInfo:
    """Everything the runtime knows about a model, from its metadata."""

    path: Path
    task: Task
    name: str
    labels: tuple[str, ...]
    input: InputSpec
    detect: DetectParams | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    version: str = ""


def session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    """Session options for small ARM CPUs: one inter-op thread and sequential execution (the
    graph is a chain, parallel branches buy nothing), all graph optimizations, intra-op threads
    = ``threads`` or the usable cores. The CPU arena is faster but holds on to its peak memory;
    ``arena=False`` trades some speed for a smaller footprint."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3  # ORT's warnings are not the user's problem
    return options


class Model:
    """A loaded model: ``info`` and ``run(tensor) -> {output name: array}``."""

    def __init__(self, info: ModelInfo, session: ort.InferenceSession) -> None:
        self.info = info
        self.session = session
        self._output_names = list(OUTPUTS[info.task])

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Run one preprocessed ``[1, 3, H, W]`` float32 tensor through the network."""
        try:
            outputs = self.session.run(self._output_names, {self.info.input.name: tensor})
        except Exception as exc:  # ORT's error types are private; keep the one useful line
            raise EdgedError(f"{self.info.path}: inference failed: {_ort_reason(exc)}") from None
        return dict(zip(self._output_names, outputs, strict=True))


def _ort_reason(exc: Exception) -> str:
    """ORT's message without its code prefix and on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from .* failed: ?", "", text)[:300]


def load_model(path: str | Path, threads: int | None = None, arena: bool = True,
               memory: str = "auto") -> Model:
    """Open an edged ONNX file, validate its metadata against the graph, create the session.

    ``memory``: ``auto`` runs a planned model (``edged.plan`` metadata, see docs/memory.md)
    lean and any other as it is, ``lean`` runs every model lean, ``default`` none."""
    path = Path(path)
    if not path.is_file():
        raise EdgedError(f"model file not found: {path}")
    if threads is not None and threads < 1:
        raise EdgedError(f"{path}: threads must be at least 1, got {threads}")
    # --- memory plan (owned by edged/schedule): lean sessions for planned models ---
    run_path, options = path, session_options(threads, arena)
    if memory != "default":
        from edged.catalog import default_cache_dir
        from edged.schedule.prepare import lean_model
        from edged.schedule.session import lean_session_options

        lean = lean_model(path, default_cache_dir(), any_model=memory == "lean")
        if lean is not None:
            run_path, options = lean, lean_session_options(threads)
    # --- end memory plan ---
    try:
        session = ort.InferenceSession(str(run_path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private types for unreadable files
        raise EdgedError(f"{path}: not a readable ONNX model ({_ort_reason(exc)})") from None
    info = _read_info(path, session)
    _check_graph(path, info, session)
    return Model(info, session)


def _meta_value(path: Path, meta: dict[str, str], key: str, default: Any = None) -> Any:
    """One metadata entry, decoded from JSON."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise EdgedError(f"{path}: metadata {key} is not valid JSON ({exc.msg})") from None


def _read_info(path: Path, session: ort.InferenceSession) -> ModelInfo:
    meta = session.get_modelmeta().custom_metadata_map
    if not any(key.startswith("edged.") for key in meta):
        raise EdgedError(f"{path}: ONNX file without edged metadata (convert it with "
                         "'edged convert')")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise EdgedError(f"{path}: metadata lacks {', '.join(missing)}")
    version = _meta_value(path, meta, "edged.format")
    if version != FORMAT_VERSION:
        raise EdgedError(f"{path}: unsupported edged.format {version!r} (this edged reads "
                         f"{FORMAT_VERSION})")
    task = _meta_value(path, meta, "edged.task")
    if not isinstance(task, str) or task not in OUTPUTS:
        raise EdgedError(f"{path}: edged.task must be one of {', '.join(OUTPUTS)}, got {task!r}")
    labels = _meta_value(path, meta, "edged.labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise EdgedError(f"{path}: edged.labels must be a non-empty list of strings")
    spec = _input_spec(path, _meta_value(path, meta, "edged.input"))
    detect = _detect_params(path, _meta_value(path, meta, "edged.detect"), spec) \
        if task == "detect" else None
    return ModelInfo(
        path=path, task=task, name=str(_meta_value(path, meta, "edged.model", path.stem)),
        labels=tuple(labels), input=spec, detect=detect,
        arch=_meta_value(path, meta, "edged.arch", {}),
        source=_meta_value(path, meta, "edged.source", {}),
        version=str(_meta_value(path, meta, "edged.version", "")),
    )


def _input_spec(path: Path, data: Any) -> InputSpec:
    try:
        spec = InputSpec(name=str(data["name"]), width=int(data["width"]),
                         height=int(data["height"]),
                         mean=tuple(float(v) for v in data["mean"]),
                         std=tuple(float(v) for v in data["std"]))
    except (TypeError, KeyError, ValueError) as exc:
        raise EdgedError(f"{path}: edged.input is incomplete or malformed ({exc!r})") from None
    if data.get("layout", "NCHW") != "NCHW" or data.get("color", "RGB") != "RGB":
        raise EdgedError(f"{path}: edged.input must be NCHW RGB, got "
                         f"{data.get('layout')} {data.get('color')}")
    # JSON's NaN and Infinity parse as floats: they would turn every input into NaN.
    if (len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0
            or not all(math.isfinite(v) for v in spec.mean + spec.std)):
        raise EdgedError(f"{path}: edged.input mean/std must be 3 finite values each, std > 0")
    if spec.width < 1 or spec.height < 1:
        raise EdgedError(f"{path}: edged.input size must be positive")
    return spec


def _detect_params(path: Path, data: Any, spec: InputSpec) -> DetectParams:
    if not isinstance(data, dict) or "anchors" not in data:
        raise EdgedError(f"{path}: detect model without edged.detect anchors")
    try:
        params = DetectParams(
            anchors=_anchors(data["anchors"], spec),
            box_scales=tuple(float(s) for s in data.get("box_coder", {}).get("scales",
                                                                           [10, 10, 5, 5])),
            background=int(data.get("background", 0)),
            nms_iou=float(data.get("nms_iou", 0.6)),
            max_detections=int(data.get("max_detections", 20)),
        )
    except EdgedError as exc:
        raise EdgedError(f"{path}: edged.detect: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise EdgedError(f"{path}: edged.detect is malformed ({exc})") from None
    if data.get("score", "sigmoid") != "sigmoid" or len(params.box_scales) != 4:
        raise EdgedError(f"{path}: edged.detect needs sigmoid scores and 4 box coder scales")
    if params.max_detections < 1 or not 0.0 < params.nms_iou <= 1.0:
        raise EdgedError(f"{path}: edged.detect needs max_detections >= 1 and 0 < nms_iou <= 1")
    return params


def _anchors(anchors: Any, spec: InputSpec) -> np.ndarray:
    """``edged.detect.anchors``: an explicit ``[A][4]`` list or SSD generator parameters."""
    if isinstance(anchors, dict):
        if anchors.get("generator") != "ssd":
            raise EdgedError(f"unknown anchor generator {anchors.get('generator')!r}")
        return generate_ssd_anchors(SsdAnchorParams.from_dict(anchors, spec.width))
    array = np.asarray(anchors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 4:
        raise EdgedError(f"anchors must be [A][4], got shape {list(array.shape)}")
    return array


def _check_graph(path: Path, info: ModelInfo, session: ort.InferenceSession) -> None:
    """The metadata must describe this graph: input name and shape, outputs and their sizes."""
    inputs = {i.name: i for i in session.get_inputs()}
    spec = info.input
    if spec.name not in inputs:
        raise EdgedError(f"{path}: graph has no input {spec.name!r} (inputs: "
                         f"{', '.join(inputs)})")
    expected = [1, 3, spec.height, spec.width]
    if list(inputs[spec.name].shape) != expected:
        raise EdgedError(f"{path}: input shape {inputs[spec.name].shape} does not match "
                         f"edged.input {expected}")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    missing = [name for name in OUTPUTS[info.task] if name not in outputs]
    if missing:
        raise EdgedError(f"{path}: {info.task} model lacks output(s) {', '.join(missing)}")
    n = len(info.labels)
    if info.task == "classify" and outputs["logits"][-1] != n:
        raise EdgedError(f"{path}: {n} labels but logits has {outputs['logits'][-1]} classes")
    if info.task == "detect":
        boxes, logits = outputs["box_encodings"], outputs["class_logits"]
        if len(boxes) != 3 or len(logits) != 3:
            raise EdgedError(f"{path}: box_encodings {boxes} and class_logits {logits} must be "
                             "[1, A, 4] and [1, A, C]")
        anchors = info.detect.anchors.shape[0]
        if logits[-1] != n:
            raise EdgedError(f"{path}: {n} labels but class_logits has {logits[-1]} columns")
        if not 0 <= info.detect.background < n:
            raise EdgedError(f"{path}: edged.detect background {info.detect.background} is not "
                             f"a class column")
        if boxes[1] != anchors or logits[1] != anchors:
            raise EdgedError(f"{path}: {anchors} anchors in edged.detect but the graph predicts "
                             f"{boxes[1]} boxes")
    # Any class-map resolution works (postprocess maps it onto the frame); only the rank counts.
    if info.task == "segment" and len(outputs["labels"]) != 3:
        raise EdgedError(f"{path}: labels output must be [1, H, W], got {outputs['labels']}")
