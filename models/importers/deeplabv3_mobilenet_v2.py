"""Load DeepLabv3-MobileNetV2 checkpoints into ``models.deeplabv3.DeepLabV3``.

- ``tflite``: deeplabv3_mnv2[_dm05]_pascal_quant.tflite, BatchNorm folded into conv biases:
  55 convolutions in execution order - the backbone's 51 (stem, then each block's expand /
  depthwise / project), then aspp0, image_pooling, concat_projection and logits/semantic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from edged.errors import EdgedError
from models.deeplabv3 import DeepLabV3
from models.importers import expect_model
from models.importers.tflite import conv_bn_pairs, load_convolutions


def load_tflite(model: nn.Module, path: Path) -> None:
    """Copy the float (dequantized) weights of a DeepLab TFLite checkpoint into ``model``."""
    model = expect_model(model, DeepLabV3, path)
    aspp = model.aspp
    if len(aspp.branches) > 1:
        raise EdgedError(f"{path}: the checkpoint has no atrous ASPP branches (aspp_rates must "
                         "be empty)")
    # The checkpoint runs aspp0 before the image-pooling branch, unlike their concat order.
    modules = [*model.backbone.modules(), *aspp.branches[0].modules(),
               *aspp.image_pooling.modules(), *aspp.project.modules(), model.classifier]
    load_convolutions(path, conv_bn_pairs(modules))


IMPORTERS: dict[str, Callable[[nn.Module, Path], None]] = {"tflite": load_tflite}
