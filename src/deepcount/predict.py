"""Prediction: ``Counter``, the one object users count with.

>>> from deepcount import Counter
>>> counter = Counter.load("default")                       # checksummed weights, device="auto"
>>> result = counter.count("crowd.jpg")                     # backbone alone, any image size
>>> result = counter.count("crowd.jpg", density="48x64")    # plus branch 1's map, image coords

Models are named entries of ``deepcount.weights.REGISTRY`` (``"default"`` is the best bundled
one) or a path to a ``.safetensors`` file; pickles are never loaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .images import DEFAULT_MAX_PIXELS, load_image
from .model import MAP_SIZES, CSRNet, DeepCount, build
from .tiling import MODES, DensityMap, Runner, count_tiles, torch_runner
from .weights import (DEFAULT_MODEL, REGISTRY, infer_architecture, model_file, read_safetensors,
                      sha256_file)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return dev


def parse_density(density: int | str | None) -> int | None:
    """A branch number from ``1``..``5``, ``"1"``, or a map size such as ``"48x64"``."""
    if density is None or density is False:
        return None
    if isinstance(density, str) and "x" in density:
        for k, (h, w) in MAP_SIZES.items():
            if density == f"{h}x{w}":
                return k
        raise ValueError(f"density map size {density!r} is not one of "
                         f"{', '.join(f'{h}x{w}' for h, w in MAP_SIZES.values())}")
    k = int(density)
    if k not in MAP_SIZES:
        raise ValueError(f"density branch must be in 1..5, got {density!r}")
    return k


def load_network(name_or_path: str | os.PathLike = "default") -> tuple[nn.Module, dict]:
    """A registered model or a ``.safetensors`` file as an eval-mode network (float32, CPU)
    and its description (name, file, sha256, architecture, dataset, recipe, metrics, tiling)."""
    key = str(name_or_path)
    if key == "default" or key in REGISTRY:
        path, entry = model_file(key)
        info = entry.info()
        state, _ = read_safetensors(path)  # verified by model_file
        info["file"] = str(path)
    else:
        path = Path(name_or_path)
        state, meta = read_safetensors(path)
        info = {"name": path.stem, "file": str(path), "sha256": sha256_file(path)}
        sidecar = path.with_suffix(".json")
        described = json.loads(meta["deepcount"]) if "deepcount" in meta else (
            json.loads(sidecar.read_text()) if sidecar.is_file() else {})
        info.update({k: v for k, v in described.items() if k not in ("file", "sha256")})
        info.setdefault("architecture", infer_architecture(state))
        info.setdefault("tiling", "pad")
    model = build(info["architecture"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval(), info


@dataclass
class CountResult:
    """What ``Counter.count`` returns for one image."""

    source: str
    count: float
    image_size: tuple[int, int]
    tiles: int
    seconds: float
    density: DensityMap | None = None
    tile_counts: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "count": self.count, "height": self.image_size[0],
               "width": self.image_size[1], "tiles": self.tiles, "seconds": self.seconds}
        if self.density is not None:
            out["density_shape"] = list(self.density.values.shape)
        return out


class Counter:
    """Counts people in images of any size with a DeepCount (or the CSRNet baseline)."""

    def __init__(self, model: nn.Module | Runner, info: dict, device: torch.device,
                 tiling: str | None = None, batch_size: int = 8,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.model = model
        self.info = info
        self.device = device
        self.tiling = tiling or info.get("tiling", "pad")
        if self.tiling not in MODES:
            raise ValueError(f"tiling must be one of {MODES}, got {self.tiling!r}")
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, name_or_path: str | os.PathLike = "default", device: str = "auto",
             tiling: str | None = None, batch_size: int = 8,
             max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "Counter":
        """A registered model (``"default"``, ``"csrnet-baseline"``, ...) or a ``.safetensors``
        path, on ``device`` (``auto`` | ``cpu`` | ``cuda``)."""
        dev = resolve_device(device)
        model, info = load_network(name_or_path)
        return cls(model.to(dev), info, dev, tiling, batch_size, max_pixels)

    @property
    def name(self) -> str:
        return str(self.info.get("name", "?"))

    @property
    def description(self) -> str:
        """One line naming the model, saying plainly when it is a baseline or untrained."""
        text = self.info.get("description") or f"weights from {self.info.get('file')}"
        return f"{self.name}: {text}"

    def _branches(self) -> tuple[int, ...]:
        if isinstance(self.model, DeepCount):
            return self.model.attached
        if isinstance(self.model, CSRNet):
            return (1,)  # its density map has branch 1's stride (8)
        return tuple(self.info.get("branches", ()))

    def count(self, images: Any, density: int | str | None = None
              ) -> CountResult | list[CountResult]:
        """Count one image (path, PIL image, NumPy array, (3, H, W) uint8/float tensor) or a
        list of them (any sizes).  ``density`` asks for a map (branch 1..5 or ``"48x64"``)."""
        branch = parse_density(density)
        if branch is not None and branch not in self._branches():
            raise ValueError(f"model {self.name} has no density branch {branch}; "
                             f"available: {self._branches()}")
        if isinstance(images, (list, tuple)):
            return [self._count_one(im, branch) for im in images]
        return self._count_one(images, branch)

    def _count_one(self, source: Any, branch: int | None) -> CountResult:
        start = time.perf_counter()
        if isinstance(source, torch.Tensor):
            source = _tensor_to_array(source)
        image = load_image(source, max_pixels=self.max_pixels)
        total, dmap, per_tile = count_tiles(self.model, image, self.tiling, self.batch_size,
                                            branch, self.device)
        label = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
        return CountResult(label, total, image.shape[:2], len(per_tile),
                           time.perf_counter() - start, dmap, per_tile)


def _tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """A (3, H, W) or (H, W, 3) tensor -> (H, W, 3) array for ``load_image`` (uint8 as is,
    floats taken as 0..1)."""
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    return t.numpy()


__all__ = ["Counter", "CountResult", "DEFAULT_MODEL", "load_network", "parse_density",
           "resolve_device", "torch_runner"]
