"""SSD and SSDLite detectors on a MobileNetV2 backbone (Sandler et al. 2018, section 6.2).

Six feature maps feed the predictors: block 14's expansion output (stride 16), the 1280-channel
last conv (stride 32), then four extra layers that halve the resolution each. ``lite=False`` is
the layout of the TF Object Detection API's ssd_mobilenet_v2 (extra layers: 1x1 conv then a full
3x3 stride-2 conv; predictors: 1x1 convs). ``lite=True`` is the paper's SSDLite: every 3x3 conv
of the extra layers and every predictor is depthwise-separable (3x3 depthwise + BN + ReLU6, then
1x1). Outputs follow docs/model-format.md: ``box_encodings [1, A, 4]`` and
``class_logits [1, A, C]``, anchors ordered per map, row-major cells, anchors within a cell.
"""

from __future__ import annotations

import torch
from torch import nn

from models.mobilenetv2 import ConvBNReLU6, MobileNetV2

TASK = "detect"
OUTPUT_NAMES = ("box_encodings", "class_logits")

# The four extra layers at width 1.0: (1x1 bottleneck channels, 3x3 stride-2 output channels).
EXTRA_LAYERS: list[tuple[int, int]] = [(256, 512), (128, 256), (128, 256), (64, 128)]
# Anchors per cell of each of the six feature maps (the first map uses the reduced 3-box set).
ANCHORS_PER_CELL: tuple[int, ...] = (3, 6, 6, 6, 6, 6)
# The backbone block whose expansion output is the first feature map (TF: expanded_conv_13).
FIRST_MAP_BLOCK = 14
# The extra layers never go below this many channels when a width multiplier shrinks them.
MIN_EXTRA_DEPTH = 16


def extra_layer(in_ch: int, mid_ch: int, out_ch: int, lite: bool,
                tf_padding: bool) -> nn.Sequential:
    """1x1 conv to ``mid_ch``, then a stride-2 3x3 to ``out_ch`` (separable when ``lite``)."""
    layers = [ConvBNReLU6(in_ch, mid_ch, kernel=1)]
    if lite:
        layers += [ConvBNReLU6(mid_ch, mid_ch, stride=2, groups=mid_ch, tf_padding=tf_padding),
                   ConvBNReLU6(mid_ch, out_ch, kernel=1)]
    else:
        layers.append(ConvBNReLU6(mid_ch, out_ch, stride=2, tf_padding=tf_padding))
    return nn.Sequential(*layers)


def predictor(in_ch: int, out_ch: int, lite: bool) -> nn.Sequential:
    """A prediction head: 1x1 conv with bias, preceded by a 3x3 depthwise when ``lite``."""
    layers: list[nn.Module] = []
    if lite:
        layers.append(ConvBNReLU6(in_ch, in_ch, groups=in_ch))
    layers.append(nn.Conv2d(in_ch, out_ch, 1, bias=True))
    return nn.Sequential(*layers)


class SSDMobileNetV2(nn.Module):
    """SSD / SSDLite with a MobileNetV2 feature extractor.

    Args:
        num_classes: score columns including background (91 for COCO, 2 for person-only).
        width_mult: MobileNetV2's width multiplier, also applied to the extra layers.
        lite: SSDLite (separable extra layers and predictors) instead of SSD.
        input_size: the square input side the model is built for (300 or 320).
        tf_padding: pad stride-2 convs like TensorFlow "SAME" (the TF-trained checkpoints).
    """

    def __init__(self, num_classes: int = 91, width_mult: float = 1.0, lite: bool = False,
                 input_size: int = 300, tf_padding: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_size = input_size
        self.features = MobileNetV2(width_mult=width_mult, tf_padding=tf_padding).features
        expansion = self.features[FIRST_MAP_BLOCK].conv[0]
        channels = [expansion.out_channels, self.features[-1].out_channels]
        self.extras = nn.ModuleList()
        for mid, out in EXTRA_LAYERS:
            mid_ch = max(int(mid * width_mult), MIN_EXTRA_DEPTH)
            out_ch = max(int(out * width_mult), MIN_EXTRA_DEPTH)
            self.extras.append(extra_layer(channels[-1], mid_ch, out_ch, lite, tf_padding))
            channels.append(out_ch)
        self.box_heads = nn.ModuleList(
            predictor(c, k * 4, lite) for c, k in zip(channels, ANCHORS_PER_CELL, strict=True))
        self.class_heads = nn.ModuleList(
            predictor(c, k * num_classes, lite)
            for c, k in zip(channels, ANCHORS_PER_CELL, strict=True))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six predictor inputs, finest first."""
        block = self.features[FIRST_MAP_BLOCK]
        x = self.features[:FIRST_MAP_BLOCK](x)
        first = block.conv[0](x)
        # Block 14 strides, so it has no residual: finishing its layers is the whole block.
        x = self.features[FIRST_MAP_BLOCK + 1:](block.conv[1:](first))
        maps = [first, x]
        for extra in self.extras:
            maps.append(extra(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            # The anchors (edged.detect metadata) are laid out for the grids of input_size.
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model is built for "
                             f"{self.input_size}x{self.input_size}")
        boxes, logits = [], []
        for fmap, box_head, class_head in zip(self.feature_maps(x), self.box_heads,
                                              self.class_heads, strict=True):
            # NCHW -> NHWC puts each cell's anchors next to each other, as the anchors are ordered.
            boxes.append(box_head(fmap).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
            logits.append(class_head(fmap).permute(0, 2, 3, 1)
                          .reshape(x.shape[0], -1, self.num_classes))
        return torch.cat(boxes, dim=1), torch.cat(logits, dim=1)


def ssd_mobilenet_v2(num_classes: int = 91, width_mult: float = 1.0, lite: bool = False,
                     input_size: int = 300, tf_padding: bool = True) -> SSDMobileNetV2:
    """Build SSD (or SSDLite) MobileNetV2, randomly initialised, in eval mode."""
    return SSDMobileNetV2(num_classes, width_mult, lite, input_size, tf_padding).eval()


def build(arch: dict) -> nn.Module:
    """Build from a catalog arch dict (without ``name``), e.g. ``{"lite": true, ...}``."""
    return ssd_mobilenet_v2(**arch)
