"""Load SSD / SSDLite MobileNetV2 checkpoints of the TF Object Detection API into
``models.ssd.SSDMobileNetV2``.

Both checkpoint kinds keep the API's variable scopes (``FeatureExtractor/MobilenetV2/...``,
``BoxPredictor_<k>/...``), so each layer of the model is matched to its checkpoint layer by
name, shapes checked:

- ``tflite``: the COCO SSD file, BatchNorm folded into conv biases, uint8 weights dequantized.
- ``tf_graphdef``: a TF1 frozen graph with BatchNorm kept (gamma, beta, moving mean / variance
  and the op's epsilon), as the person-only SSDLite; every conv must use "SAME" padding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edged.errors import EdgedError
from models.importers import expect_model
from models.importers.tf_graphdef import GraphDef, conv_weight
from models.importers.tflite import TFLiteModel, conv_weights, load_folded
from models.mobilenetv2 import ConvBNReLU6
from models.ssd import SSDMobileNetV2

BACKBONE = "FeatureExtractor/MobilenetV2"

# (TF scope, conv, the BatchNorm after it or None when the conv has its own bias)
Layer = tuple[str, nn.Conv2d, nn.BatchNorm2d | None]


def _conv_bn(scope: str, block: nn.Sequential) -> Layer:
    """A ConvBNReLU6 (or a conv + BatchNorm pair) as one layer."""
    return scope, block[0], block[1]


def _backbone_layers(features: nn.Sequential) -> list[Layer]:
    layers = [_conv_bn(f"{BACKBONE}/Conv", features[0])]
    for i, block in enumerate(features[1:-1]):
        scope = f"{BACKBONE}/expanded_conv" + (f"_{i}" if i else "")
        convs = list(block.conv)
        if len(convs) == 4:  # blocks with expansion factor 1 have no expand conv
            layers.append(_conv_bn(f"{scope}/expand", convs.pop(0)))
        layers.append(_conv_bn(f"{scope}/depthwise", convs[0]))
        layers.append((f"{scope}/project", convs[1], convs[2]))
    layers.append(_conv_bn(f"{BACKBONE}/Conv_1", features[-1]))
    return layers


def _extra_layers(extras: nn.ModuleList) -> list[Layer]:
    layers = []
    for i, extra in enumerate(extras, start=2):
        first, *rest = extra
        out = rest[-1].out_channels
        layers.append(_conv_bn(f"{BACKBONE}/layer_19_1_Conv2d_{i}_1x1_{first.out_channels}",
                               first))
        scope = f"{BACKBONE}/layer_19_2_Conv2d_{i}_3x3_s2_{out}"
        if len(rest) == 2:  # SSDLite: separable 3x3
            layers.append(_conv_bn(f"{scope}_depthwise", rest[0]))
        layers.append(_conv_bn(scope, rest[-1]))
    return layers


def _head_layers(heads: nn.ModuleList, kind: str) -> list[Layer]:
    layers = []
    for k, head in enumerate(heads):
        scope = f"BoxPredictor_{k}/{kind}"
        if isinstance(head[0], ConvBNReLU6):  # SSDLite: depthwise before the 1x1
            layers.append(_conv_bn(f"{scope}_depthwise", head[0]))
        layers.append((scope, head[-1], None))
    return layers


def tf_layers(model: SSDMobileNetV2) -> list[Layer]:
    """Every conv of ``model`` with its TF Object Detection API scope."""
    return (_backbone_layers(model.features) + _extra_layers(model.extras)
            + _head_layers(model.box_heads, "BoxEncodingPredictor")
            + _head_layers(model.class_heads, "ClassPredictor"))


def _check_shape(path: Path, scope: str, conv: nn.Conv2d, shape: tuple[int, ...]) -> None:
    if tuple(conv.weight.shape) != shape:
        raise EdgedError(f"{path}: {scope} has weight shape {list(shape)}, the architecture "
                         f"needs {list(conv.weight.shape)}: not a checkpoint of this "
                         "SSD MobileNetV2 configuration")


def _missing(path: Path, scope: str, model: SSDMobileNetV2) -> EdgedError:
    kind = "SSDLite" if isinstance(model.box_heads[0][0], ConvBNReLU6) else "SSD"
    return EdgedError(f"{path}: no layer {scope!r}: not an {kind} MobileNetV2 checkpoint")


def load_tflite(model: nn.Module, path: Path) -> None:
    """Copy the dequantized weights of a TF Object Detection API SSD TFLite file into ``model``."""
    model = expect_model(model, SSDMobileNetV2, path)
    ops = {}
    for op in TFLiteModel(path).ops("CONV_2D", "DEPTHWISE_CONV_2D"):
        # Weight tensors are named "<scope>/weights_quant/..." (quantized) or "<scope>/weights".
        ops[op.inputs[1].name.split("/weights")[0]] = op
    layers = tf_layers(model)
    for scope, conv, bn in layers:
        op = ops.pop(scope, None)
        if op is None:
            raise _missing(path, scope, model)
        weight, bias = conv_weights(op)
        _check_shape(path, scope, conv, weight.shape)
        if bias is None:
            raise EdgedError(f"{path}: {scope} has no bias (BatchNorm not folded?)")
        load_folded(conv, bn, weight, bias)
    if ops:
        raise EdgedError(f"{path}: {len(ops)} convolutions the architecture lacks, first "
                         f"{next(iter(ops))!r}: not a checkpoint of this SSD configuration")


def _is_depthwise(graph: GraphDef, scope: str, conv: nn.Conv2d) -> bool:
    """Whether the conv of ``scope`` is depthwise; checks its TF "SAME" padding and stride."""
    for node in graph.children(scope):
        if node.op in ("Conv2D", "DepthwiseConv2dNative"):
            padding = node.attr["padding"].s.decode()
            strides = tuple(node.attr["strides"].list.i)[1:3]
            if padding != "SAME" or strides != conv.stride:
                raise EdgedError(f"{graph.path}: {scope} uses {padding} padding, strides "
                                 f"{list(strides)}; the architecture needs SAME, "
                                 f"{list(conv.stride)}: not a checkpoint of this SSD "
                                 "MobileNetV2 configuration")
            return node.op == "DepthwiseConv2dNative"
    raise EdgedError(f"{graph.path}: no convolution in {scope!r}")


def _load_batchnorm(graph: GraphDef, scope: str, bn: nn.BatchNorm2d) -> None:
    """Copy a TF (Fused)BatchNorm's statistics, affine parameters and epsilon."""
    norm = f"{scope}/BatchNorm"
    ops = [n for n in graph.children(norm) if n.op.startswith("FusedBatchNorm")]
    if not ops:
        raise EdgedError(f"{graph.path}: no FusedBatchNorm in {norm!r}")
    bn.eps = ops[0].attr["epsilon"].f
    values = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
              "running_var": "moving_variance"}
    with torch.no_grad():
        for attr, name in values.items():
            value = torch.from_numpy(graph.constant(f"{norm}/{name}"))
            target = getattr(bn, attr)
            if value.shape != target.shape:
                raise EdgedError(f"{graph.path}: {norm}/{name} has shape {list(value.shape)}, "
                                 f"the architecture needs {list(target.shape)}")
            target.copy_(value)


def load_graphdef(model: nn.Module, path: Path) -> None:
    """Copy the weights and BatchNorms of a TF1 Object Detection API frozen graph into ``model``."""
    model = expect_model(model, SSDMobileNetV2, path)
    graph = GraphDef(path)
    for scope, conv, bn in tf_layers(model):
        if not graph.children(scope):
            raise _missing(path, scope, model)
        depthwise = _is_depthwise(graph, scope, conv)
        name = f"{scope}/depthwise_weights" if depthwise else f"{scope}/weights"
        weight = conv_weight(graph.constant(name), depthwise)
        _check_shape(path, scope, conv, weight.shape)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight))
            if bn is None:
                conv.bias.copy_(torch.from_numpy(graph.constant(f"{scope}/biases")))
        if bn is not None:
            _load_batchnorm(graph, scope, bn)


IMPORTERS: dict[str, Callable[[nn.Module, Path], None]] = {
    "tflite": load_tflite,
    "tf_graphdef": load_graphdef,
}
