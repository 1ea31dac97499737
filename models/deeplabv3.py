"""DeepLabv3 on a MobileNetV2 backbone: the MobileNetV2 paper's segmentation model.

The paper's "MNet V2*, OS=16" (section 6.3): MobileNetV2 features up to the 320-channel block
(no 1280 conv) kept at output stride 16 by dilating the last blocks, then a reduced ASPP head:
a 1x1 branch and an image-pooling branch, concatenated, projected to 256 channels, a 1x1
classifier, bilinear upsampling to the input size and the per-pixel argmax. The full ASPP's
atrous 3x3 branches (rates 6, 12, 18 at output stride 16) are available through ``aspp_rates``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.mobilenetv2 import MobileNetV2, conv2d

TASK = "segment"
OUTPUT_NAMES: tuple[str, ...] = ("labels",)

HEAD_CHANNELS = 256


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``x.shape`` as Python ints: the exported graph then holds constants, not Shape ops."""
    return tuple(int(size) for size in x.shape)


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, the head's layer (the backbone uses ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> None:
        super().__init__(
            conv2d(in_ch, out_ch, kernel, dilation=dilation),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ImagePooling(nn.Module):
    """Global average -> 1x1 conv -> back to the feature map's size (image-level features)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        # Bilinear (align_corners) upsampling of a 1x1 map is a broadcast: say so directly.
        return y.expand(*static_shape(y)[:2], *static_shape(x)[2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, in the checkpoint's concat order: image pooling, the 1x1
    branch (aspp0), then one atrous 3x3 branch per rate; a 1x1 projection merges them."""

    def __init__(self, in_ch: int, out_ch: int = HEAD_CHANNELS,
                 rates: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.image_pooling = ImagePooling(in_ch, out_ch)
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, out_ch)]
            + [ConvBNReLU(in_ch, out_ch, kernel=3, dilation=rate) for rate in rates]
        )
        self.project = ConvBNReLU((len(rates) + 2) * out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.image_pooling(x), *(branch(x) for branch in self.branches)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3(nn.Module):
    """DeepLabv3-MobileNetV2; ``forward`` gives int64 labels ``[N, H, W]`` at the input size.

    Args:
        num_classes: output classes (21 for PASCAL VOC, index 0 = background).
        width_mult: the backbone's width multiplier (1.0 and 0.5 checkpoints exist).
        output_stride: 16 (the paper's model) or 8 (dilates from block 8 on; far more work).
        aspp_rates: atrous 3x3 ASPP branches; () is the paper's reduced MNet V2* head.
        tf_padding: TensorFlow "SAME" stride-2 padding. It only differs from symmetric padding
            when a strided layer's input size is even; at 513x513 every one is odd.
        round_nearest: the backbone's channel rounding (the width-0.5 checkpoint needs 1).
    """

    def __init__(self, num_classes: int = 21, width_mult: float = 1.0, output_stride: int = 16,
                 aspp_rates: tuple[int, ...] = (), tf_padding: bool = True,
                 round_nearest: int = 8) -> None:
        super().__init__()
        mobilenet = MobileNetV2(width_mult=width_mult, tf_padding=tf_padding,
                                output_stride=output_stride, round_nearest=round_nearest)
        self.backbone = mobilenet.features[:-1]  # no 1280-channel conv
        self.aspp = ASPP(self.backbone[-1].out_channels, HEAD_CHANNELS, tuple(aspp_rates))
        self.classifier = nn.Conv2d(HEAD_CHANNELS, num_classes, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores upsampled to the input size, float ``[N, num_classes, H, W]``."""
        y = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=static_shape(x)[2:], mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def deeplabv3_mobilenet_v2(num_classes: int = 21, width_mult: float = 1.0,
                           output_stride: int = 16, aspp_rates: tuple[int, ...] = (),
                           tf_padding: bool = True, round_nearest: int = 8) -> DeepLabV3:
    """Build DeepLabv3-MobileNetV2 in eval mode (randomly initialised; load with an importer)."""
    return DeepLabV3(num_classes, width_mult, output_stride, aspp_rates, tf_padding,
                     round_nearest).eval()


def build(arch: dict) -> nn.Module:
    """The registry's builder: ``arch`` is the catalog's arch dict without ``name``."""
    return deeplabv3_mobilenet_v2(**arch)
