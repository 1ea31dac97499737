"""Load MobileNetV2 classifier checkpoints into ``models.mobilenetv2.MobileNetV2``.

- ``tflite``: TF-trained checkpoints with BatchNorm folded into conv biases (e.g. the quantized
  mobilenet_v2_1.0_224_quant.tflite): 53 convolutions in execution order - stem, each block's
  expand / depthwise / project, the 1280-channel conv, then the classifier as a 1x1 conv.
- ``torchvision``: a PyTorch ``state_dict`` saved with ``torch.save`` (torchvision's names).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edged.errors import EdgedError
from models.importers import expect_model
from models.importers.tflite import conv_bn_pairs, load_convolutions
from models.mobilenetv2 import MobileNetV2


def load_tflite(model: nn.Module, path: Path) -> None:
    """Copy the float (dequantized) weights of a MobileNetV2 TFLite checkpoint into ``model``."""
    model = expect_model(model, MobileNetV2, path)
    load_convolutions(path, conv_bn_pairs([*model.features.modules(),
                                           *model.classifier.modules()]))


def load_torchvision(model: nn.Module, path: Path) -> None:
    """Load a torchvision-style ``state_dict`` (``torch.save(model.state_dict(), path)``), strict.

    A dict wrapping it under ``"state_dict"`` or ``"model"`` (training checkpoints) is accepted.
    """
    model = expect_model(model, MobileNetV2, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EdgedError(f"{path}: no such checkpoint file") from None
    except pickle.UnpicklingError:
        # Also what a foreign file gives: torch.load falls back to reading it as a pickle.
        raise EdgedError(f"{path}: not a readable PyTorch checkpoint (not written by "
                         "torch.save, or it holds objects other than tensors)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        # The first sentence: torch appends paragraphs of advice that do not fit one line.
        first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() \
            else type(exc).__name__
        raise EdgedError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise EdgedError(f"{path}: holds no state_dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise EdgedError(f"{path}: {what} ({len(missing)} missing, {len(unexpected)} "
                         "unexpected names): not a checkpoint of this architecture")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise EdgedError(f"{path}: {key} has shape {list(state[key].shape)}, the "
                             f"architecture needs {list(value.shape)} (check --width-mult and "
                             "--num-classes)")
    model.load_state_dict(state, strict=True)


IMPORTERS: dict[str, Callable[[nn.Module, Path], None]] = {
    "tflite": load_tflite,
    "torchvision": load_torchvision,
}
