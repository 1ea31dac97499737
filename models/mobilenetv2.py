"""MobileNetV2 (Sandler et al. 2018), state_dict-compatible with torchvision's ``mobilenet_v2``.

The network is the paper's Table 2: a stem conv, then rows of (t, c, n, s) inverted-residual
blocks, then a 1x1 conv to 1280 channels and a classifier. ``tf_padding=True`` pads stride-2
convolutions the way TensorFlow's "SAME" does (the extra pixel bottom/right), which TF-trained
checkpoints need to reproduce their outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (t, c, n, s): expansion factor, output channels, repeats, stride of the first repeat.
INVERTED_RESIDUAL_SETTING: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without going below 90 % of it."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class Conv2dTFSame(nn.Conv2d):
    """Conv2d padding like TensorFlow's "SAME": asymmetric, extra pixel bottom/right.

    The pad is computed from the (static) input size; the ONNX exporter's post-pass folds the
    resulting ``Pad`` into the Conv's ``pads`` attribute (see ``models.export``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
            reversed(self.dilation), strict=True,
        ):
            size = int(size)
            effective_k = (k - 1) * d + 1
            total = max((math.ceil(size / s) - 1) * s + effective_k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
           dilation: int = 1, bias: bool = False, tf_padding: bool = False) -> nn.Conv2d:
    """A Conv2d with "same" output size: symmetric padding, or TF's asymmetric one at stride 2."""
    if tf_padding and stride > 1:
        return Conv2dTFSame(in_ch, out_ch, kernel, stride, 0, dilation, groups, bias=bias)
    padding = (kernel - 1) // 2 * dilation
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=bias)


class ConvBNReLU6(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6 (torchvision's ``Conv2dNormActivation``: keys 0, 1, 2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1, tf_padding: bool = False) -> None:
        super().__init__(
            conv2d(in_ch, out_ch, kernel, stride, groups, dilation, tf_padding=tf_padding),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    """The paper's bottleneck: 1x1 expand (skipped when t=1) -> 3x3 depthwise -> 1x1 linear
    projection, with a residual connection when input and output shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int,
                 dilation: int = 1, tf_padding: bool = False) -> None:
        super().__init__()
        self.stride = stride
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden, dilation=dilation,
                        tf_padding=tf_padding),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier; ``features`` then ``classifier`` as in torchvision.

    Args:
        num_classes: 1000 (torchvision) or 1001 (TF checkpoints, index 0 = background).
        width_mult: the paper's width multiplier (0.35 to 1.4).
        tf_padding: pad stride-2 convs like TensorFlow "SAME" (for TF-trained weights).
        dropout: dropout before the classifier (inactive in eval / export).
        output_stride: stop downsampling at this stride (8, 16 or 32) and dilate the later
            depthwise convs instead, as DeepLab does (None = 32, the classifier).
        round_nearest: round channel counts to a multiple of this (1 = no rounding, as in
            DeepLab's width-0.5 checkpoint: 12 channels where 8-rounding gives 16).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 tf_padding: bool = False, dropout: float = 0.2,
                 output_stride: int | None = None, round_nearest: int = 8) -> None:
        super().__init__()
        if not 0.35 <= width_mult <= 1.4:
            raise ValueError(f"width_mult must be between 0.35 and 1.4, got {width_mult}")
        if output_stride not in (None, 8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        in_ch = make_divisible(32 * width_mult, round_nearest)
        # The last conv keeps 1280 channels for multipliers below 1 (paper, section 6.1).
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2, tf_padding=tf_padding)]
        current_stride, dilation = 2, 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride, block_dilation = (s if i == 0 else 1), dilation
                if current_stride == output_stride:
                    # Output stride reached: keep the resolution, widen later blocks instead
                    # (the block that would have strided keeps the old rate, as in DeepLab).
                    dilation *= stride
                    stride = 1
                current_stride *= stride
                features.append(InvertedResidual(in_ch, out_ch, stride, t, block_dilation,
                                                 tf_padding=tf_padding))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0,
                 tf_padding: bool = False) -> MobileNetV2:
    """Build MobileNetV2 (randomly initialised; load a checkpoint with an importer)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, tf_padding=tf_padding)


# Registry interface (models.convert): what this architecture does and how its outputs are named.
TASK = "classify"
OUTPUT_NAMES: tuple[str, ...] = ("logits",)


def build(arch: dict) -> MobileNetV2:
    """The network for a catalog ``arch`` dict (without ``"name"``), in eval mode."""
    return mobilenet_v2(**arch).eval()
