"""Checkpoint importers: generic readers (``tflite``, ``tf_graphdef``) and, per architecture, the
mapping of checkpoint tensors onto the PyTorch model (``IMPORTERS[format](model, path)``)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from torch import nn

from edged.errors import EdgedError

M = TypeVar("M", bound=nn.Module)


def expect_model(model: nn.Module, cls: type[M], path: Path) -> M:
    """``model`` as a ``cls``, or a one-line error: an importer was given another architecture."""
    if not isinstance(model, cls):
        raise EdgedError(f"{path}: the {cls.__name__} importer needs a {cls.__name__} model, "
                         f"not {type(model).__name__}")
    return model
