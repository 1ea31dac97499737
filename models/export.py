"""Export a PyTorch network to an edged ONNX file (docs/model-format.md) and prove it right.

``export_model`` traces the network (opset 17, static shapes, batch 1), folds TensorFlow "SAME"
``Pad`` nodes into the following Conv's ``pads`` (a separate Pad costs about 25 % on ORT's CPU
provider), writes the metadata, runs ``onnx.checker``, compares ONNX Runtime with PyTorch on a
real photo - failing loudly - and only then renames the file into place.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from edged import __version__
from edged.catalog import InputSpec
from edged.errors import EdgedError, first_line
from edged.fetch import atomic_file
from edged.preprocess import Preprocessor

OPSET = 17
TOLERANCE = 1e-4  # max abs difference ORT vs PyTorch on float outputs
# Integer outputs (a segmentation argmax) may flip where two classes tie to within rounding.
MIN_INT_AGREEMENT = 0.999

Progress = Callable[[str, str], None]


def quiet(_step: str, _detail: str) -> None:
    """The default progress callback: say nothing."""


def input_tensor(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """An RGB uint8 photo (H x W x 3) as the network's input, preprocessed exactly as the
    daemon does it (a copy: the preprocessor reuses its buffer)."""
    tensor, _roi = Preprocessor(spec)(np.ascontiguousarray(image[..., ::-1]))
    return tensor.copy()


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace each node whose inputs are all constants by a ``Constant`` of its result.

    The tracer writes a padding's amounts as a small Slice/Concat/Reshape computation that its
    own constant folding leaves alone; evaluating it here lets ``fold_pads`` see the numbers.
    Returns how many nodes were folded.
    """
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant":
            if node.attribute[0].name == "value":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            nodes.append(node)
        elif inputs and all(name in values for name in inputs):
            results = ReferenceEvaluator(node).run(None, {name: values[name] for name in inputs})
            for name, value in zip(node.output, results, strict=True):
                values[name] = np.asarray(value)
                tensor = numpy_helper.from_array(values[name], name)
                nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            folded += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return folded


# --- static shapes (DeepLab's final Resize; added by the DeepLab helper) ---
def fold_shapes(model: onnx.ModelProto) -> int:
    """Make shapes static: each ``Shape`` of a tensor whose shape is known becomes a
    ``Constant`` (``fold_constants`` then folds what it feeds), and the graph outputs get their
    inferred dims. Returns how many Shape nodes were replaced.

    The tracer sizes a Resize from ``Shape`` of its input even when every size is fixed, which
    leaves the output's dims symbolic; shape inference with data propagation resolves them.
    """
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    replaced = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and not node.attribute and node.input[0] in shapes:
            value = numpy_helper.from_array(np.array(shapes[node.input[0]], np.int64))
            node.CopyFrom(helper.make_node("Constant", [], [node.output[0]], value=value))
            replaced += 1
    for output, inferred_output in zip(model.graph.output, inferred.output, strict=True):
        if output.name in shapes:
            output.type.CopyFrom(inferred_output.type)
    return replaced
# --- end static shapes ---


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold each zero-valued constant ``Pad`` that feeds only a Conv into the Conv's ``pads``.

    Returns how many were folded. Outputs are bit-identical; the graph loses a node and ORT its
    layout reorders around it.
    """
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        pads = consts.get(pad.input[1])
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        users = consumers.get(pad.output[0], [])
        if (attrs.get("mode", b"constant") != b"constant" or pads is None or value is None
                or np.any(value != 0) or pads.size != 8 or np.any(pads[[0, 1, 4, 5]] != 0)
                or len(users) != 1 or users[0].op_type != "Conv"):
            continue
        conv = users[0]
        conv_attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in conv_attrs and conv_attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(conv_attrs["pads"].ints) if "pads" in conv_attrs else [0, 0, 0, 0]
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]),
               old[2] + int(pads[6]), old[3] + int(pads[7])]
        if "pads" in conv_attrs:
            conv.attribute.remove(conv_attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    drop_unused_constants(graph)
    return len(folded)


def drop_unused_constants(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Set ``metadata_props``: every value stored as a JSON document."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key = key
        prop.value = json.dumps(value)


def _outputs(result: torch.Tensor | Sequence[torch.Tensor]) -> list[np.ndarray]:
    tensors = [result] if isinstance(result, torch.Tensor) else list(result)
    return [t.detach().numpy() for t in tensors]


def compare_outputs(names: Sequence[str], expected: Sequence[np.ndarray],
                    actual: Sequence[np.ndarray]) -> dict[str, float]:
    """Per output: max abs difference (float) or the share of differing elements (integer).

    Raises EdgedError on a shape change or a difference above the tolerance.
    """
    report = {}
    for name, want, got in zip(names, expected, actual, strict=True):
        if want.shape != got.shape:
            raise EdgedError(f"output {name!r}: ONNX Runtime gives shape {got.shape}, "
                             f"PyTorch {want.shape}")
        if np.issubdtype(want.dtype, np.floating):
            diff = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
            if not diff <= TOLERANCE:  # also catches NaN
                raise EdgedError(f"output {name!r}: ONNX Runtime differs from PyTorch by "
                                 f"{diff:.3g} (tolerance {TOLERANCE})")
            report[name] = diff
        else:
            mismatch = float(np.mean(want != got)) if want.size else 0.0
            if mismatch > 1 - MIN_INT_AGREEMENT:
                raise EdgedError(f"output {name!r}: ONNX Runtime and PyTorch differ on "
                                 f"{mismatch:.2%} of elements")
            report[name] = mismatch
    return report


def export_model(
    model: nn.Module,
    output: str | os.PathLike[str],
    *,
    output_names: Sequence[str],
    input_spec: InputSpec,
    metadata: dict[str, Any],
    verify_image: np.ndarray,
    verify_name: str,
    progress: Progress = quiet,
) -> dict[str, float]:
    """Export ``model`` (eval mode) to ``output`` with ``metadata`` (``edged.*`` keys).

    ``verify_image`` (RGB uint8) is the real photo both runtimes must agree on. Returns the
    per-output differences also stored as ``edged.verify``. Nothing is left at ``output``
    unless every check passed.
    """
    output = Path(output)
    model.eval()
    x = input_tensor(verify_image, input_spec)

    progress("export", f"tracing to ONNX opset {OPSET}")
    buffer = io.BytesIO()
    # The tracer's warnings (shapes taken as constants, unfoldable Slices) are expected here:
    # shapes are static by design and the constant parts are folded below.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _outputs(model(torch.from_numpy(x)))
        torch.onnx.export(model, (torch.from_numpy(x),), buffer, dynamo=False,
                          opset_version=OPSET, input_names=["image"],
                          output_names=list(output_names), do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    fold_constants(proto)
    folded = fold_pads(proto)
    if fold_shapes(proto):  # needs the pads known; then fold what the shapes feed
        fold_constants(proto)
        drop_unused_constants(proto.graph)
    if folded:
        progress("export", f"folded {folded} Pad nodes into Conv pads")
    set_metadata(proto, {"edged.format": 1, "edged.version": __version__,
                         "edged.input": input_spec.metadata(), **metadata})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise EdgedError(f"{output}: exported graph fails the ONNX checker: "
                         f"{first_line(exc)}") from None

    progress("verify", f"ONNX Runtime vs PyTorch on {verify_name}")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = session.run(list(output_names), {"image": x})
    try:
        diffs = compare_outputs(output_names, expected, actual)
    except EdgedError as exc:
        raise EdgedError(f"{output}: verification on {verify_name} failed: {exc}") from None
    set_metadata(proto, {"edged.verify": {"image": verify_name, "max_abs_diff": diffs}})

    progress("write", str(output))
    with atomic_file(output) as f:
        f.write(proto.SerializeToString())
    return diffs
