"""Prediction: ``Counter``, the one object users count with.

>>> from deepcount import Counter
>>> counter = Counter.load("default")                       # checksummed weights, device="auto"
>>> result = counter.count("crowd.jpg")                     # backbone alone, any image size
>>> result = counter.count("crowd.jpg", density="48x64")    # plus branch 1's map, image coords
>>> plain = Counter.load("default", engine="eager")          # force the plain PyTorch path

Models are named entries of ``deepcount.weights.REGISTRY`` (``"default"`` is the best bundled
one) or a path to a ``.safetensors`` file; pickles are never loaded.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from .engines import ENGINES, Engine, Runner, default_batch_size, engine_runner, resolve_device, resolve_engine
from .model import parse_density
from .tiling import MODES, DensityMap, TilingWarning, count_tiles, tiling_mismatch
from .weights import DEFAULT_MODEL, load_network

BACKENDS = ("auto", "torch", "onnxruntime")  # onnxruntime: a `deepcount export` file


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
    # counting inside regions (deepcount.regions): per region name, "scaled" (its share of the
    # density map times ``count``: the region's count) and "map" (the map summed inside it)
    regions: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "count": self.count, "height": self.image_size[0],
               "width": self.image_size[1], "tiles": self.tiles, "seconds": self.seconds}
        if self.density is not None:
            out["density_shape"] = list(self.density.values.shape)
        if self.regions is not None:
            out["regions"] = self.regions
        return out


class Counter:
    """Counts people in images of any size with a DeepCount (or the CSRNet baseline).

    ``engine`` is how a network runs its tiles (:mod:`deepcount.engines`): ``auto`` (default)
    is the fastest path of the device whose counts equal the plain path's within float32
    tolerance (``channels_last`` on the CPU, measured in docs/PERFORMANCE.md); ``eager``
    forces the plain PyTorch path; ``compile``, ``bf16``, ``tf32`` and ``cudagraphs`` are
    opt-in.  ``auto`` can also be set for a whole process with ``$DEEPCOUNT_ENGINE`` (e.g.
    ``DEEPCOUNT_ENGINE=eager deepcount count ...``).  An exported (onnxruntime) model has no
    engine to choose.
    """

    def __init__(self, model: nn.Module | Runner, info: dict, device: torch.device,
                 tiling: str | None = None, batch_size: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, engine: str | Engine = "auto"):
        self.model = model
        self.info = info
        self.device = device
        self.tiling = tiling or info.get("tiling", "pad")
        if self.tiling not in MODES:
            raise ValueError(f"tiling must be one of {MODES}, got {self.tiling!r}")
        mismatch = tiling_mismatch(info.get("tiling"), self.tiling, str(info.get("name", "this model")))
        if mismatch is not None:
            warnings.warn(mismatch, TilingWarning, stacklevel=3)
        # tiling `features` cuts the frontend where the model was trained from (its sidecar's
        # feature_level); a DeepCount trained on pixels is cut after conv4_3
        self.level: str | None = None
        if self.tiling == "features" and getattr(model, "level", None):  # an exported one
            self.level = model.level
        elif self.tiling == "features":
            if not getattr(model, "feature_levels", ()):
                raise ValueError(f"tiling 'features' needs a DeepCount; {info.get('name', 'this model')} "
                                 f"is {'a CSRNet' if getattr(model, 'arch_name', None) == 'csrnet' else 'an exported model'}: "
                                 "use tiling 'pad' or 'grid'")
            self.level = info.get("feature_level") or "conv4_3"
        self.batch_size = default_batch_size(device) if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) < 1):
            raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")
        self.max_pixels = max_pixels
        self._engine = None
        if isinstance(model, nn.Module):
            self._engine = resolve_engine(_engine_choice(engine), device)
            self.engine = self._engine.name
        elif engine in ("auto", None):
            self.engine = str(info.get("backend", "runner"))
        else:
            raise ValueError(f"engine {engine!r} applies to a PyTorch model, not to "
                             f"{info.get('backend', 'a runner')}; leave engine='auto'")
        self._runner: tuple[nn.Module, Runner] | None = None

    @property
    def runner(self) -> Runner:
        """What runs a batch of tiles: the model through its engine (built once per model)."""
        if not isinstance(self.model, nn.Module):
            return self.model
        if self._runner is None or self._runner[0] is not self.model:
            self._runner = (self.model, engine_runner(self.model, self._engine, self.device, self.level))
        return self._runner[1]

    @staticmethod
    def available() -> list[dict]:
        """The registered models (what ``Counter.load`` takes by name): name, default, what
        each was trained on, its test MAE/RMSE, tiling, size and whether it is here already
        (``deepcount.weights.available_models``; ``deepcount models`` prints the same)."""
        from .weights import available_models

        return available_models()

    @classmethod
    def load(cls, name_or_path: str | os.PathLike = "default", device: str = "auto",
             tiling: str | None = None, batch_size: int | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, backend: str = "auto",
             engine: str | Engine = "auto") -> "Counter":
        """A registered model (``"default"``, ``"csrnet-baseline"``, ...) or a ``.safetensors``
        path, on ``device`` (``auto`` | ``cpu`` | ``cuda``), run by ``engine`` (see the class:
        ``auto`` is the device's fastest float32-exact path, ``eager`` the plain one).

        ``backend``: ``"torch"``; ``"onnxruntime"`` runs a file written by ``deepcount export``
        (a registry name or ``.safetensors`` is exported into the user cache on first use,
        count only); ``"auto"`` (default): onnxruntime for a ``.onnx`` path, else torch."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnxruntime" or (backend == "auto" and str(name_or_path).lower().endswith(".onnx")):
            from .export import cached_onnx, load_onnx_runner
            path = name_or_path if str(name_or_path).lower().endswith(".onnx") else cached_onnx(name_or_path)
            runner, info = load_onnx_runner(path, device)
            return cls(runner, info, torch.device("cpu"), tiling, batch_size, max_pixels,  # feeds numpy
                       engine)
        dev = resolve_device(device)
        if not isinstance(engine, Engine) and engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        model, info = load_network(name_or_path)
        return cls(model.to(dev), info, dev, tiling, batch_size, max_pixels, engine)

    @property
    def name(self) -> str:
        return str(self.info.get("name", "?"))

    @property
    def description(self) -> str:
        """One line naming the model, saying plainly when it is a baseline or untrained."""
        text = self.info.get("description") or f"weights from {self.info.get('file')}"
        return f"{self.name}: {text}"

    @property
    def density_branches(self) -> tuple[int, ...]:
        """The density maps ``count(..., density=k)`` can give (1 = 48x64 per 384x512 tile)."""
        # a registered network says (a CSRNet's one map has branch 1's size); a runner's file does
        return tuple(getattr(self.model, "density_branches", None) or self.info.get("branches", ()))

    @property
    def picture_branch(self) -> int | None:
        """The finest density map this model gives (what pictures and ``density=True`` use;
        a bundled model may carry one branch only), or None."""
        branches = self.density_branches
        return min(branches) if branches else None

    def count(self, images: Any, density: int | str | None = None, deadline: float | None = None,
              regions: Any = None) -> CountResult | list[CountResult]:
        """Count one image or a list (or tuple) of them, of any sizes (a list gives a list).

        An image is a path (``str`` / ``os.PathLike``), encoded bytes, a binary file object,
        a PIL image, a NumPy array ((H, W) or (H, W, 1|3|4); uint8, uint16 or float in 0..1)
        or a torch tensor ((3, H, W) or (H, W, 3); uint8 or float in 0..1).  EXIF
        orientation is applied and alpha dropped (see ``deepcount.images.load_image``).
        ``density`` asks for a density map: ``True`` for the model's own (:attr:`picture_branch`,
        the one a bundled model carries), or a branch 1..5 or its size, ``"48x64"``; without it
        only the backbone runs.  An unusable image raises ``ImageLoadError`` naming it.
        ``deadline`` (a ``time.monotonic()`` value): past it, counting stops before its next
        batch of tiles with ``deepcount.tiling.CountTimeout`` (a ``TimeoutError``).
        ``regions`` (a region file's path, a :class:`deepcount.regions.Region` or a list of them)
        also counts inside each, from the density map (``density``'s branch, else the model's
        finest): ``result.regions[name]["scaled"]`` is the region's count.
        """
        if density is True:
            if self.picture_branch is None:
                raise ValueError(f"model {self.name} has no density branch")
            density = self.picture_branch
        branch = parse_density(density)
        if regions is not None:
            from .regions import as_regions

            regions = as_regions(regions)
            branch = branch if branch is not None else self.picture_branch
            if branch is None:
                raise ValueError(f"model {self.name} has no density map to count regions with")
        if branch is not None and branch not in self.density_branches:
            raise ValueError(f"model {self.name} has no density branch {branch}; "
                             f"available: {self.density_branches}")
        if isinstance(images, (list, tuple)):
            return [self._count_one(im, branch, deadline, regions) for im in images]
        return self._count_one(images, branch, deadline, regions)

    def read(self, source: Any) -> np.ndarray:
        """The (H, W, 3) uint8 RGB array ``count`` would see for ``source`` (upright, alpha
        dropped, under this counter's ``max_pixels``)."""
        label = _label(source)
        if isinstance(source, torch.Tensor):
            source = _tensor_to_array(source, label)
        if isinstance(source, np.ndarray):
            _check_float_range(source, label)
            try:
                return load_image(source, max_pixels=self.max_pixels)
            except ImageLoadError as e:  # name the caller's object, not the converted array
                raise ImageLoadError(label, e.reason) from e
        return load_image(source, max_pixels=self.max_pixels)

    def _count_one(self, source: Any, branch: int | None, deadline: float | None = None,
                   regions: list | None = None) -> CountResult:
        start = time.perf_counter()
        image = self.read(source)
        total, maps, per_tile = count_tiles(self.runner, image, self.tiling, self.batch_size,
                                            (branch,) if branch is not None else (), self.device,
                                            deadline=deadline)
        dmap = maps.get(branch) if branch is not None else None
        inside = None
        if regions is not None:
            from .regions import region_counts

            inside = region_counts(dmap, regions, total)
        return CountResult(_label(source), total, tuple(image.shape[:2]), len(per_tile),
                           time.perf_counter() - start, dmap, per_tile, inside)

    def __repr__(self) -> str:
        level = f", level={self.level!r}" if self.level else ""
        return (f"Counter({self.name!r}, device={str(self.device)!r}, tiling={self.tiling!r}{level}, "
                f"batch_size={self.batch_size})")


def _engine_choice(engine: str | Engine | None) -> str | Engine:
    """``auto`` becomes ``$DEEPCOUNT_ENGINE`` when that is set (a process-wide switch for the
    command line); any other choice is kept."""
    if engine in (None, "auto"):
        return os.environ.get("DEEPCOUNT_ENGINE") or "auto"
    return engine


def _label(source: Any) -> str:
    """How results and errors name an image source."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(os.fspath(source))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        kind = "numpy.ndarray" if isinstance(source, np.ndarray) else "torch.Tensor"
        return f"<{kind} shape={tuple(source.shape)} dtype={str(source.dtype).removeprefix('torch.')}>"
    filename = getattr(source, "filename", None) or getattr(source, "name", None)
    if isinstance(filename, (str, os.PathLike)) and os.fspath(filename):
        return os.fsdecode(os.fspath(filename))
    return f"<{type(source).__name__}>"


def _tensor_to_array(t: torch.Tensor, label: str) -> np.ndarray:
    """A (3, H, W) / (1, H, W) / (H, W, 3) / (H, W) tensor -> a channels-last array for
    ``load_image`` (uint8 as is, floats taken as 0..1)."""
    t = t.detach().cpu()
    if t.ndim == 4:
        raise ImageLoadError(label, "a batch of images (4-D tensor); pass list(tensor) to "
                                    "count each image, or tensor[i] for one")
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # float16 / bfloat16 (NumPy has no bfloat16)
    return t.numpy()


def _check_float_range(a: np.ndarray, label: str) -> None:
    """Float pixels are read as 0..1; 0..255 floats or mean/std-normalised tensors would be
    clipped into a white or black picture and counted as such, so they are refused."""
    if a.dtype.kind != "f" or a.size == 0 or np.isnan(a).any():  # NaN: load_image refuses it
        return
    lo, hi = float(a.min()), float(a.max())
    if hi > 1.5 or lo < -0.5:
        raise ImageLoadError(label, f"float pixel values must lie in 0..1, these span {lo:.3g}.."
                                    f"{hi:.3g} (divide 0..255 values by 255; undo any "
                                    "mean/std normalisation: Counter normalises by itself)")


__all__ = ["Counter", "CountResult", "DEFAULT_MODEL", "load_network", "parse_density",
           "resolve_device"]
