"""Ground-truth density maps (Section 3.2): a fixed Gaussian at full resolution, then sum pooling.

Each annotated head becomes a Gaussian of fixed ``sigma`` (5 in the paper; the authors' code
uses 10 with a 49x49 kernel).  Sum pooling by 8, 16, 32, 64 and 128 turns the full-resolution
map of a 384x512 crop into the five targets (48x64 ... 3x4), and the total is the count
target, so every map of a crop sums to the same count.

A Gaussian is separable, so the full-resolution density of a whole image is kept as one small
1-D kernel per head along each axis (:class:`HeadKernels`); spread over a region's rows and
columns they are two factors with ``density = ky.T @ kx``.  Sum pooling acts on the factors
(``pool(ky).T @ pool(kx)`` is exactly the sum pooling of the full-resolution map), so the
targets of a crop cost ``O(heads x cells)`` instead of touching every pixel.  The kernels are
what is cached on disk (:class:`GroundTruthCache`, keyed by the annotation content, the image
size and the settings).

Mass (``keep_mass``):
  * ``True`` (default, the paper's "sum is the ground truth count"): the region a target is
    made for (a whole image, or a training crop the network sees as its image) owns the heads
    whose pixel lies in it, and each such head's kernel is renormalised inside the region, so
    a head near a border keeps all its mass.  Every map then sums to the number of annotated
    heads in the region.  Heads annotated outside the image are clipped to its border pixel.
  * ``False`` (the authors' code): the whole image is blurred with the fixed, normalised
    kernel and crops are cut from it; mass falling outside the image or a crop is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .cache import atomic_path, cache_dir
from .config import OFFICIAL, PAPER, GroundTruthConfig  # noqa: F401 - their home is config; here for users of targets
from .model import INPUT_SIZE, MAP_STRIDES

POOL_FACTORS: tuple[int, ...] = tuple(MAP_STRIDES[k] for k in sorted(MAP_STRIDES))  # 8 .. 128




def gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    """A normalised 1-D Gaussian of length ``2 * radius + 1``."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def head_pixels(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 2) int64 (row, col) of the pixel holding each head, clipped into the image.

    Points are 0-based with pixel centres on integers, so the pixel is ``floor(v + 0.5)``.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    col = np.clip(np.floor(pts[:, 0] + 0.5), 0, width - 1).astype(np.int64)
    row = np.clip(np.floor(pts[:, 1] + 0.5), 0, height - 1).astype(np.int64)
    return np.stack([row, col], 1)


def _axis_windows(centres: np.ndarray, length: int, g: np.ndarray) -> np.ndarray:
    """(N, 2r+1) float64: the kernel ``g`` around each centre, zero where it falls outside
    ``0 .. length - 1`` (not renormalised here)."""
    radius = len(g) // 2
    idx = centres[:, None] + np.arange(-radius, radius + 1)[None, :]
    return np.where((idx >= 0) & (idx < length), g[None, :], 0.0)


def _dense(windows: np.ndarray, starts: np.ndarray, offset: int, length: int) -> np.ndarray:
    """(N, length) float64: each head's window placed on the axis of a region that begins at
    ``offset`` (parts outside the region dropped)."""
    n, k = windows.shape
    out = np.zeros((n, length), dtype=np.float64)
    idx = starts[:, None] - offset + np.arange(k)[None, :]
    valid = (idx >= 0) & (idx < length)
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    out[rows[valid], idx[valid]] = windows[valid]
    return out


class Targets(NamedTuple):
    """The six training targets of one crop: five density maps (branch 1..5, float32) and the count."""

    maps: tuple[np.ndarray, ...]
    count: float


@dataclass
class HeadKernels:
    """The full-resolution density of one image in separable form.

    ``pixels`` (N, 2) is each head's (row, col); ``wy`` and ``wx`` (N, 2r+1) are its 1-D
    kernels along each axis, centred on that pixel and cut at the image border (not
    renormalised).  The density is ``sum_n outer(wy_n, wx_n)`` placed at the heads' pixels,
    i.e. ``ky.T @ kx`` with the windows spread over the image axes; only the O(N r) windows
    are stored.
    """

    height: int
    width: int
    pixels: np.ndarray
    wy: np.ndarray
    wx: np.ndarray
    config: GroundTruthConfig

    @classmethod
    def from_points(cls, points: np.ndarray, height: int, width: int,
                    config: GroundTruthConfig = PAPER) -> "HeadKernels":
        pixels = head_pixels(points, height, width)
        g = gaussian_1d(config.sigma, config.radius)
        return cls(height, width, pixels, _axis_windows(pixels[:, 0], height, g),
                   _axis_windows(pixels[:, 1], width, g), config)

    def __len__(self) -> int:
        return len(self.pixels)

    def _factors(self, top: int, left: int, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(n, height) and (n, width) kernels over a region (zero outside the image), with the
        mass rule applied; only heads that put mass in the region are kept."""
        r, c, radius = self.pixels[:, 0], self.pixels[:, 1], self.config.radius
        if self.config.keep_mass:  # the region owns the heads whose pixel lies in it
            keep = (r >= top) & (r < top + height) & (c >= left) & (c < left + width)
        else:  # every head whose kernel reaches into the region
            keep = ((r + radius >= top) & (r - radius < top + height)
                    & (c + radius >= left) & (c - radius < left + width))
        ky = _dense(self.wy[keep], r[keep] - radius, top, height)
        kx = _dense(self.wx[keep], c[keep] - radius, left, width)
        if self.config.keep_mass:
            # A head's own pixel is in the region, so both sums are > 0.
            ky /= ky.sum(1, keepdims=True)
            kx /= kx.sum(1, keepdims=True)
        return ky, kx

    def density(self, top: int = 0, left: int = 0, height: int | None = None,
                width: int | None = None) -> np.ndarray:
        """The full-resolution density map of a region (default: the whole image), float32."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        ky, kx = self._factors(top, left, height, width)
        return (ky.T @ kx).astype(np.float32)

    def _windows(self, top: int, left: int, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What :meth:`_factors` spreads over the region, kept sparse: each kept head's window
        positions along y and x, relative to the region ((n, 2r+1) int64), and its weights
        there ((n, 2r+1) float64, zero outside the region and the image), mass rule applied."""
        r, c, radius = self.pixels[:, 0], self.pixels[:, 1], self.config.radius
        if self.config.keep_mass:
            keep = (r >= top) & (r < top + height) & (c >= left) & (c < left + width)
        else:
            keep = ((r + radius >= top) & (r - radius < top + height)
                    & (c + radius >= left) & (c - radius < left + width))
        offsets = np.arange(-radius, radius + 1)
        py = r[keep, None] - top + offsets
        px = c[keep, None] - left + offsets
        wy = np.where((py >= 0) & (py < height), self.wy[keep], 0.0)
        wx = np.where((px >= 0) & (px < width), self.wx[keep], 0.0)
        if self.config.keep_mass:
            wy /= wy.sum(1, keepdims=True)
            wx /= wx.sum(1, keepdims=True)
        return py, wy, px, wx

    def pyramid(self, top: int = 0, left: int = 0, height: int | None = None,
                width: int | None = None, factors: tuple[int, ...] = POOL_FACTORS,
                flip: bool = False) -> Targets:
        """Sum-pooled maps of a region (default: the whole image, padded with zeros to a
        multiple of each factor) and its count; ``flip`` mirrors left-right.

        Equal to sum pooling the dense factors of :meth:`density` (``pool(ky).T @ pool(kx)``),
        but each head's window is pooled where it lies (a bincount over its 2r+1 taps) and
        every coarser factor that is a multiple of a finer one is pooled from it, so the cost
        is O(heads x cells) and not O(heads x pixels)."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        py, wy, px, wx = self._windows(top, left, height, width)
        if flip:
            px = width - 1 - px
        pooled: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for f in sorted(set(factors)):
            finer = max((g for g in pooled if f % g == 0), default=None)
            if finer is None:
                pooled[f] = (_pool_windows(py, wy, height, f), _pool_windows(px, wx, width, f))
            else:
                pooled[f] = tuple(_pool_cells(a, f // finer) for a in pooled[finer])  # type: ignore[assignment]
        maps = tuple((pooled[f][0].T @ pooled[f][1]).astype(np.float32) for f in factors)
        return Targets(maps, float(wy.sum(1) @ wx.sum(1)))

    def crop(self, top: int, left: int, flip: bool = False) -> Targets:
        """The six targets of the 384x512 training crop at (top, left) (may overhang the image:
        the overhang is padding with zero targets)."""
        return self.pyramid(top, left, *INPUT_SIZE, flip=flip)


def _pool_windows(pos: np.ndarray, weights: np.ndarray, length: int, factor: int) -> np.ndarray:
    """(n, ceil(length / factor)) float64: each row's weights summed into the cell of
    ``factor`` positions that holds them (weights outside 0..length-1 must be zero)."""
    n = len(pos)
    cells = -(-length // factor)
    idx = np.clip(pos, 0, length - 1) // factor + (np.arange(n) * cells)[:, None]
    return np.bincount(idx.ravel(), weights=weights.ravel(), minlength=n * cells).reshape(n, cells)


def _pool_cells(k: np.ndarray, ratio: int) -> np.ndarray:
    """Sum ``ratio`` neighbouring cells along the last axis (zero-padded): pooling by
    ``f * ratio`` of a map already pooled by ``f``."""
    return sum_pool_axis(k, ratio) if ratio > 1 else k


def sum_pool_axis(k: np.ndarray, factor: int) -> np.ndarray:
    """Sum pooling along the last axis (zero-padded to a multiple of ``factor``)."""
    n, length = k.shape
    cells = -(-length // factor)
    if cells * factor != length:
        k = np.concatenate([k, np.zeros((n, cells * factor - length), k.dtype)], 1)
    return k.reshape(n, cells, factor).sum(2)


def sum_pool(density: np.ndarray, factor: int) -> np.ndarray:
    """Sum pooling of a 2-D map (Section 3.2, Figure 3): each output cell is the sum of a
    ``factor x factor`` window; the map is zero-padded to a multiple of ``factor``."""
    h, w = density.shape
    ch, cw = -(-h // factor), -(-w // factor)
    padded = np.zeros((ch * factor, cw * factor), dtype=np.float64)
    padded[:h, :w] = density
    return padded.reshape(ch, factor, cw, factor).sum((1, 3)).astype(density.dtype)


def density_map(points: np.ndarray, height: int, width: int,
                config: GroundTruthConfig = PAPER) -> np.ndarray:
    """The full-resolution ground-truth density of an image, float32 (H, W)."""
    return HeadKernels.from_points(points, height, width, config).density()


# ----------------------------------------------------------------------------- cache
_CACHE_VERSION = 1


class GroundTruthCache:
    """Head kernels computed once per image and kept on disk.

    The key is the sha256 of the annotation (the points' bytes), the image size and the
    ground-truth settings, so an edited annotation or another sigma never reads a stale entry.
    Entries are small (``.npz`` of the per-head 1-D kernels, not a dense H x W map);
    :meth:`pyramid` also keeps an image's whole-image targets (``pyramid-*.npy``).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_dir("targets")
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(points: np.ndarray, height: int, width: int, config: GroundTruthConfig) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(points, dtype=np.float64).tobytes())
        h.update(json.dumps([_CACHE_VERSION, height, width, asdict(config)], sort_keys=True).encode())
        return h.hexdigest()

    def get(self, points: np.ndarray, height: int, width: int,
            config: GroundTruthConfig = PAPER) -> HeadKernels:
        path = self.root / f"{self.key(points, height, width, config)}.npz"
        if path.exists():
            try:
                return self._read(path, height, width, config)
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # a torn write: recompute
        kernels = HeadKernels.from_points(points, height, width, config)
        self._write(path, kernels)
        return kernels

    def pyramid(self, points: np.ndarray, height: int, width: int,
                config: GroundTruthConfig = PAPER, factors: tuple[int, ...] = POOL_FACTORS) -> Targets:
        """The whole-image targets (:meth:`HeadKernels.pyramid`) of an annotated image,
        computed once and kept on disk: one float32 ``.npy`` per image (the maps and the
        float64 count), so a cached read is a single small file."""
        key = hashlib.sha256(f"{self.key(points, height, width, config)}:{list(factors)}".encode())
        path = self.root / f"pyramid-{key.hexdigest()}.npy"
        shapes = [(-(-height // f), -(-width // f)) for f in factors]
        if path.exists():
            try:
                flat = np.load(path, allow_pickle=False)
                sizes = [h * w for h, w in shapes]
                if flat.dtype == np.float32 and flat.shape == (2 + sum(sizes),):
                    bounds = np.cumsum([2, *sizes])
                    maps = tuple(flat[a:b].reshape(shape) for a, b, shape in zip(bounds[:-1], bounds[1:], shapes))
                    return Targets(maps, float(flat[:2].view(np.float64)[0]))
            except (OSError, ValueError):
                pass
            path.unlink(missing_ok=True)  # torn or foreign: recompute
        targets = HeadKernels.from_points(points, height, width, config).pyramid(factors=factors)
        flat = np.concatenate([np.array([targets.count], np.float64).view(np.float32),
                               *(m.ravel() for m in targets.maps)])
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, flat, allow_pickle=False)
        return targets

    @staticmethod
    def _write(path: Path, k: HeadKernels) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, pixels=k.pixels, wy=k.wy, wx=k.wx)

    @staticmethod
    def _read(path: Path, height: int, width: int, config: GroundTruthConfig) -> HeadKernels:
        with np.load(path) as z:
            return HeadKernels(height, width, z["pixels"], z["wy"], z["wx"], config)
