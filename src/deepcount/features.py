"""The frontend's features of whole images: frozen-frontend training and feature-level tiling.

With the VGG16 frontend frozen up to a level (``pool3`` ... ``conv4_3``, all at stride 8,
:data:`deepcount.model.FRONTEND_LEVELS`), the frontend's output for an image never changes, so:

* **training** computes each training image's features (and its mirror's: a mirrored image's
  features are not its features mirrored) once, keeps them on disk in float16
  (:class:`FeatureCache`, memory-mapped, so a dataset's cache may exceed RAM) and cuts training
  crops from them at offsets that are multiples of 8 pixels (:class:`FeatureCrops`): only the
  layers after the frozen level and the five branches run per step;
* **inference** (tiling mode ``features``, :mod:`deepcount.tiling`) runs the frozen part over
  the whole image and the rest on 48x64 tiles of its features, exactly as such a model was
  trained: no seams between tiles, and no frontend work spent on padding.

The frontend runs over a large image in overlapping windows (:func:`frontend_features`) whose
halo covers the receptive field of the level, so the stitched features equal the whole-image
features while memory stays bounded.  An image is used up to the last whole 8-pixel cell
(``H // 8 * 8`` rows, ``W // 8 * 8`` columns: the max-pools drop the rest); annotated heads in
the dropped rows or columns count in the border cells (:class:`deepcount.targets.HeadKernels`
clips them there), so a crop's count target still adds up to the number of annotations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .cache import atomic_path, cache_dir
from .crops import crop_offsets, draw_crop
from .images import DEFAULT_MAX_PIXELS, load_image, to_tensor
from .model import FEATURE_SIZE, FEATURE_STRIDE, FRONTEND_LEVELS, INPUT_SIZE, frontend_split
from .weights import sha256_file

FEATURE_PRECISIONS = ("fp32", "bf16")
WINDOW = 1024  # pixels per side of a frontend window (before its halo): ~1.7 GB of activations


def receptive_radius(frontend: nn.Sequential | None, level: str) -> int:
    """How many pixels beyond a stride-8 cell's own 8x8 block its features at ``level`` see:
    a window halo of at least this makes windowed features equal whole-image features
    (``frontend`` None: VGG16's layout, whatever the width)."""
    if frontend is None:
        from .model import make_frontend

        frontend = make_frontend(1 / 64)
    radius, stride = 0, 1
    for layer in list(frontend)[:frontend_split(level)]:
        if isinstance(layer, nn.Conv2d):
            radius += (layer.kernel_size[0] // 2) * layer.dilation[0] * stride
        elif isinstance(layer, nn.MaxPool2d):
            stride *= 2
    return radius + FEATURE_STRIDE  # + a cell: pooling windows never straddle the halo's edge


def _frontend(net: nn.Module) -> nn.Sequential:
    """The frontend of a DeepCount / CSRNet, or ``net`` itself when it is one (or its start)."""
    if isinstance(net, nn.Sequential):
        return net
    return net.frontend


def usable_size(height: int, width: int) -> tuple[int, int]:
    """The part of an image the stride-8 features cover: whole 8x8 cells (an image thinner
    than a cell gets one cell, padded, along that side: see :func:`windowed_features`)."""
    return height // FEATURE_STRIDE * FEATURE_STRIDE, width // FEATURE_STRIDE * FEATURE_STRIDE


@torch.inference_mode()
def frontend_features(net: nn.Module, image: np.ndarray, level: str, *, precision: str = "fp32",
                      window: int = WINDOW, device: str | torch.device | None = None) -> Tensor:
    """The frontend's features at ``level`` of an (H, W, 3) uint8 image of any size: a float32
    (C, H // 8, W // 8) tensor on ``device`` (default: the network's).

    The image is processed in windows of ``window`` pixels (a multiple of 8) plus a halo of
    :func:`receptive_radius` (rounded up to a multiple of 8) on each inner side, so the result
    equals running the frontend over the whole image at once (up to float rounding) while
    memory stays bounded by the window.  ``precision``: ``fp32`` or ``bf16`` (autocast)."""
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"feature precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
    frontend = _frontend(net)
    device = torch.device(device) if device is not None else next(frontend.parameters()).device
    part = frontend[:frontend_split(level)]

    def run(x: Tensor) -> Tensor:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return part(x).float()
    return windowed_features(run, image, receptive_radius(frontend, level), window)


def windowed_features(run: Callable[[Tensor], Tensor], image: np.ndarray, radius: int,
                      window: int = WINDOW) -> Tensor:
    """Stride-8 features of an (H, W, 3) uint8 image from ``run`` (a normalised (1, 3, h, w)
    float32 batch -> (1, C, h/8, w/8) features: a frontend, or an exported one), computed in
    windows of ``window`` pixels with a halo of ``radius`` pixels (rounded up to whole cells)
    and stitched: equal to one run over the whole image when ``radius`` covers the receptive
    field.  Returns (C, H // 8, W // 8) float32 on the device ``run`` returns."""
    if window < FEATURE_STRIDE or window % FEATURE_STRIDE:
        raise ValueError(f"window must be a positive multiple of {FEATURE_STRIDE}, got {window}")
    h8, w8 = usable_size(*image.shape[:2])
    if h8 == 0 or w8 == 0:  # thinner than a cell: one cell of it, padded with the mean (0)
        x = to_tensor(image)
        padded = torch.zeros(1, 3, max(x.shape[1], FEATURE_STRIDE), max(x.shape[2], FEATURE_STRIDE))
        padded[0, :, :x.shape[1], :x.shape[2]] = x
        f = run(padded)[0]
        return f[:, :max(h8 // FEATURE_STRIDE, 1), :max(w8 // FEATURE_STRIDE, 1)]
    halo = -(-radius // FEATURE_STRIDE) * FEATURE_STRIDE
    s = FEATURE_STRIDE
    out: Tensor | None = None
    for top in range(0, h8, window):
        for left in range(0, w8, window):
            bottom, right = min(top + window, h8), min(left + window, w8)
            t0, l0 = max(top - halo, 0), max(left - halo, 0)
            t1, l1 = min(bottom + halo, h8), min(right + halo, w8)
            f = run(to_tensor(image[t0:t1, l0:l1])[None])[0]
            if out is None:
                out = torch.empty(f.shape[0], h8 // s, w8 // s, device=f.device)
            out[:, top // s:bottom // s, left // s:right // s] = \
                f[:, (top - t0) // s:(bottom - t0) // s, (left - l0) // s:(right - l0) // s]
    assert out is not None
    return out


def frontend_digest(net: nn.Module, level: str) -> str:
    """sha256 of the frontend weights up to ``level``: cached features are keyed by it."""
    h = hashlib.sha256(level.encode())
    for name, t in _frontend(net)[:frontend_split(level)].state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Frontend features of images on disk: one float16 ``(H/8, W/8, C)`` ``.npy`` per
    (frontend weights, image content, level, mirror flag, precision), read memory-mapped.

    The key holds the sha256 of the frontend's weights up to the level and of the image file's
    bytes, so a changed image or frontend never gets stale features.  Writes go through a
    temporary file and a rename (a killed run leaves no torn entry)."""

    def __init__(self, net: nn.Module, level: str, root: str | os.PathLike | None = None,
                 precision: str = "bf16", device: str | torch.device | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if level not in FRONTEND_LEVELS:
            raise ValueError(f"frontend level must be one of {list(FRONTEND_LEVELS)}, got {level!r}")
        if precision not in FEATURE_PRECISIONS:
            raise ValueError(f"feature precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
        self.net, self.level, self.precision, self.max_pixels = net, level, precision, max_pixels
        self.device = device
        self.root = Path(root) if root is not None else cache_dir("features")
        self.root.mkdir(parents=True, exist_ok=True)
        self.frontend = frontend_digest(net, level)
        self._digests: dict[Path, str] = {}
        self.computed = 0  # entries this object computed (the rest were read from disk)

    def path(self, image: str | os.PathLike, mirror: bool = False) -> Path:
        image = Path(image)
        digest = self._digests.get(image)
        if digest is None:
            digest = self._digests[image] = sha256_file(image)
        key = json.dumps([self.frontend, digest, self.level, bool(mirror), self.precision])
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.npy"

    def get(self, image: str | os.PathLike, mirror: bool = False) -> np.ndarray:
        """The (h, w, C) float16 features of ``image`` (left-right mirrored first when
        ``mirror``), memory-mapped; computed and stored on first use."""
        path = self.path(image, mirror)
        if path.exists():
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                path.unlink(missing_ok=True)  # torn or foreign: recompute
        pixels = load_image(image, max_pixels=self.max_pixels)
        h8, w8 = usable_size(*pixels.shape[:2])
        pixels = pixels[:h8, :w8]
        if mirror:
            pixels = np.ascontiguousarray(pixels[:, ::-1])
        f = frontend_features(self.net, pixels, self.level, precision=self.precision, device=self.device)
        arr = f.permute(1, 2, 0).to(torch.float16).cpu().numpy()
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            np.save(out, arr, allow_pickle=False)
        self.computed += 1
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def tensor(self, image: str | os.PathLike) -> Tensor:
        """``image``'s features as the network takes them: a (C, h, w) float32 tensor."""
        return torch.from_numpy(self.get(image).astype(np.float32)).permute(2, 0, 1)

    def build(self, images: Sequence[str | os.PathLike], mirror: bool = True, desc: str = "frontend features",
              progress: bool = True) -> None:
        """Make sure every image (and its mirror when ``mirror``) is cached, with a progress bar."""
        from .progress import progress_bar

        jobs = [(p, m) for p in images for m in ((False, True) if mirror else (False,))]
        todo = [(p, m) for p, m in jobs if not self.path(p, m).exists()]
        for p, m in progress_bar(todo, enabled=progress and bool(todo), unit="image",
                                 desc=f"{desc} ({self.level}, {self.precision})"):
            self.get(p, m)


def feature_tile(features: np.ndarray | Tensor, top: int, left: int) -> Tensor:
    """The 48x64-cell crop of (h, w, C) features at cell (top, left) as a (C, 48, 64) float32
    tensor (channels_last strides); cells outside the features are zero (padding holds
    nobody: post-ReLU features of nothing)."""
    fh, fw = FEATURE_SIZE
    src = features[max(top, 0):top + fh, max(left, 0):left + fw]
    if not isinstance(src, Tensor):
        src = torch.from_numpy(np.array(src))  # a copy: memory-mapped cache entries are read-only
    out = torch.zeros(fh, fw, src.shape[-1], dtype=torch.float32, device=src.device)
    out[:src.shape[0], :src.shape[1]] = src
    return out.permute(2, 0, 1)


class FeatureCrops(torch.utils.data.Dataset):
    """Training samples of a frozen-frontend DeepCount: a 48x64 crop of an image's cached
    features (= a 384x512 crop at a pixel offset that is a multiple of 8) and the same six
    targets :class:`deepcount.crops.CrowdCrops` gives the pixel crop at that offset.

    Sample ``(i, seed)`` (what the training sampler yields) draws the crop from a generator
    seeded with ``seed``: its offset, a mirror with probability 1/2 (the mirrored image's own
    features), and with probability ``overhang_probability`` an offset anywhere in the image,
    so the crop may overhang its right or bottom edge into zero padding (what feature-level
    tiling pads with): the network learns that padding holds nobody.  Images smaller than a
    crop are always padded so.
    """

    def __init__(self, dataset, cache: FeatureCache, ground_truth=None, crops_per_image: int | Sequence[int] = 1,
                 mirror: bool = True, overhang_probability: float = 0.0, targets_cache=None):
        from .targets import PAPER

        self.dataset, self.cache = dataset, cache
        self.ground_truth = ground_truth if ground_truth is not None else PAPER
        self.offsets, self.mirror = crop_offsets(crops_per_image, len(dataset)), bool(mirror)
        self.overhang_probability = float(overhang_probability)
        self.targets_cache = targets_cache
        self._kernels: dict[int, object] = {}
        self._cells: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def features(self, index: int, mirror: bool = False) -> np.ndarray:
        return self.cache.get(self.dataset[index].image, mirror)

    def cells(self, index: int) -> tuple[int, int]:
        """(rows, cols) of image ``index``'s feature map (read once per image)."""
        size = self._cells.get(index)
        if size is None:
            size = self._cells[index] = tuple(self.features(index).shape[:2])  # type: ignore[assignment]
        return size

    def kernels(self, index: int):
        """The ground truth of image ``index`` over the part its features cover."""
        from .targets import HeadKernels

        k = self._kernels.get(index)
        if k is None:
            h, w = self.cells(index)
            points = self.dataset[index].points
            size = (h * FEATURE_STRIDE, w * FEATURE_STRIDE)
            k = (self.targets_cache.get(points, *size, self.ground_truth) if self.targets_cache is not None
                 else HeadKernels.from_points(points, *size, self.ground_truth))
            self._kernels[index] = k
        return k

    def draw(self, i: int | tuple[int, int]) -> tuple[int, int, int, bool]:
        """Image index, crop top-left in cells of the (mirrored when flip) features, mirror:
        :func:`deepcount.crops.draw_crop` in cells."""
        return draw_crop(i, self.offsets, self.cells, FEATURE_SIZE, self.overhang_probability,
                         self.mirror)[:4]

    def targets(self, index: int, top: int, left: int, flip: bool = False) -> tuple[Tensor, ...]:
        """The six targets of the crop at cell (top, left) of the (mirrored when ``flip``)
        features: those of the pixel crop at (8 top, 8 left) of the (mirrored) image."""
        k = self.kernels(index)
        y, x = top * FEATURE_STRIDE, left * FEATURE_STRIDE
        if flip:  # the mirrored image's crop at x is the original's crop at W - x - 512, mirrored
            x = k.width - x - INPUT_SIZE[1]
        t = k.crop(y, x, flip=flip)
        return (*(torch.from_numpy(m)[None] for m in t.maps), torch.tensor(t.count, dtype=torch.float32))

    def sample(self, index: int, top: int, left: int, flip: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
        return feature_tile(self.features(index, flip), top, left), self.targets(index, top, left, flip)

    def __getitem__(self, i: int | tuple[int, int]):
        return self.sample(*self.draw(i))


__all__ = ["FEATURE_PRECISIONS", "FeatureCache", "FeatureCrops", "feature_tile", "frontend_digest",
           "frontend_features", "receptive_radius", "usable_size"]
