"""Parameter and multiply-add counts, counted the way the MobileNetV2 paper does.

Multiply-adds are those of convolutions and fully connected layers (one per weight per output
position); BatchNorm, activations, additions and resizes are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Summary:
    params: int
    madds: int
    input_size: tuple[int, int]

    def __str__(self) -> str:
        h, w = self.input_size
        return (f"{self.params / 1e6:.2f}M parameters, {self.madds / 1e6:.0f}M multiply-adds "
                f"at {h}x{w}")


def count_params(model: nn.Module) -> int:
    """Learnable parameters (BatchNorm running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters())


def count_madds(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-adds of one forward pass at ``input_size`` (H, W), batch 1."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def summarize(model: nn.Module, input_size: tuple[int, int]) -> Summary:
    """Parameters and multiply-adds of ``model`` at ``input_size`` (H, W)."""
    return Summary(count_params(model), count_madds(model, input_size), input_size)
