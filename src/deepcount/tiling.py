"""Division and combination (Section 3.1): any image through a network that takes 384x512 crops.

Three ways to divide an image into 384x512 tiles:

* ``pad`` (default): the image keeps its scale; it is padded right and bottom to whole tiles
  (the padding is the ImageNet mean, i.e. zero after normalisation) and density-map cells
  that lie wholly in the padding are discarded.
* ``grid`` (the authors' code): the image is resized to the nearest grid of whole tiles,
  ``round(H / 384) x round(W / 512)`` (at least 1 x 1), and cut without padding.
* ``features`` (DeepCount models trained on a frozen frontend, :mod:`deepcount.features`):
  the frozen part of the frontend runs over the whole image (in overlapping windows for big
  images), and the rest of the network on 48x64 tiles of its stride-8 features (= 384x512
  pixels), padded with zero features; the image is used up to its last whole 8x8 cell.  This
  is how such models are trained: no seams, no frontend work spent on padding.

Tiles go through the model a batch at a time, so memory stays bounded for huge images;
counts add up and density maps are stitched back to image coordinates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .images import IMAGENET_MEAN, IMAGENET_STD
from .engines import Engine, Runner, engine_runner
from .model import INPUT_SIZE

TILE_HEIGHT, TILE_WIDTH = INPUT_SIZE
MODES = ("pad", "grid", "features")


class TilingWarning(UserWarning):
    """A tiling that the model was not trained for and that biases its count."""


def tiling_mismatch(trained: str | None, chosen: str, name: str = "this model") -> str | None:
    """Why counting in tiling ``chosen`` misleads a model trained in tiling ``trained`` (None
    when it does not).  A model trained on whole-image frontend features (``features``) saw zero
    features beyond the image; in ``pad`` a tile's padding goes through the frontend as grey
    pixels, whose features are not zero, and the count head reads them as people."""
    if trained == "features" and chosen == "pad":
        return (f"{name} was trained on whole-image frontend features (tiling features); in tiling pad its count "
                "head reads the padding's grey-pixel features as people, so an image that is not whole 384x512 "
                "tiles is over-counted (docs/RESULTS.md measures each tiling); leave the tiling to the model")
    return None
STRIDE = 8  # the frontend's stride: one feature cell is 8x8 pixels


@dataclass(frozen=True)
class TilePlan:
    """How one ``height x width`` image is divided: ``rows x cols`` tiles of 384x512 over the
    working image (the image itself for ``pad``; the image resized to exactly
    ``rows*384 x cols*512`` for ``grid``)."""

    height: int
    width: int
    mode: str
    rows: int
    cols: int

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def working_size(self) -> tuple[int, int]:
        if self.mode == "grid":
            return self.rows * TILE_HEIGHT, self.cols * TILE_WIDTH
        if self.mode == "features":  # whole 8x8 cells (at least one, padded)
            return max(self.height // STRIDE, 1) * STRIDE, max(self.width // STRIDE, 1) * STRIDE
        return self.height, self.width

    def box(self, index: int) -> tuple[int, int]:
        """(top, left) of tile ``index`` (row-major) in the working image."""
        r, c = divmod(index, self.cols)
        return r * TILE_HEIGHT, c * TILE_WIDTH

    def map_shape(self, stride: int) -> tuple[int, int]:
        """Cells of a stitched map at ``stride`` that cover the image (padding-only cells dropped)."""
        h, w = self.working_size
        return math.ceil(h / stride), math.ceil(w / stride)

    def cell_size(self, stride: int) -> tuple[float, float]:
        """A stitched map's cell in original-image pixels (height, width)."""
        if self.mode != "grid":
            return float(stride), float(stride)
        h, w = self.working_size
        return stride * self.height / h, stride * self.width / w


def plan_tiles(height: int, width: int, mode: str = "pad") -> TilePlan:
    if mode not in MODES:
        raise ValueError(f"tiling mode must be one of {MODES}, got {mode!r}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if mode == "pad":
        return TilePlan(height, width, mode, math.ceil(height / TILE_HEIGHT), math.ceil(width / TILE_WIDTH))
    if mode == "features":
        return TilePlan(height, width, mode, math.ceil(max(height // STRIDE, 1) * STRIDE / TILE_HEIGHT),
                        math.ceil(max(width // STRIDE, 1) * STRIDE / TILE_WIDTH))
    return TilePlan(height, width, mode, max(1, round(height / TILE_HEIGHT)),
                    max(1, round(width / TILE_WIDTH)))


def working_image(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """The image the tiles are cut from: the image itself (pad) or resized to the grid (grid)."""
    if plan.mode == "grid" and plan.working_size != image.shape[:2]:
        h, w = plan.working_size
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return image


def tile_batches(image: np.ndarray, plan: TilePlan, batch_size: int = 8,
                 channels_last: bool = True) -> Iterator[tuple[Tensor, list[int]]]:
    """Normalised (b, 3, 384, 512) float32 batches of tiles and their indices; only one batch
    of tiles exists at a time.

    The tiles are made in ``channels_last`` memory (NHWC strides, the layout the image already
    has and the one oneDNN / cuDNN convolutions run fastest in, see docs/PERFORMANCE.md), so
    any caller feeding them to a network gets the fast path; ``channels_last=False`` gives
    contiguous NCHW tensors.  The values are the same either way (``images.to_tensor``'s)."""
    if image.shape[:2] != (plan.height, plan.width):
        raise ValueError(f"plan is for {plan.height}x{plan.width}, image is {image.shape[:2]}")
    work = working_image(image, plan)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for start in range(0, len(plan), batch_size):
        indices = list(range(start, min(start + batch_size, len(plan))))
        nhwc = torch.zeros(len(indices), TILE_HEIGHT, TILE_WIDTH, 3)  # zero = the mean after normalising
        for j, i in enumerate(indices):
            top, left = plan.box(i)
            patch = work[top:top + TILE_HEIGHT, left:left + TILE_WIDTH]
            region = nhwc[j, :patch.shape[0], :patch.shape[1]]
            pixels = np.ascontiguousarray(patch)
            if not pixels.flags.writeable:  # torch warns on read-only buffers
                pixels = pixels.copy()
            region.copy_(torch.from_numpy(pixels))  # uint8 -> float32
            region.div_(255.0).sub_(mean).div_(std)  # exactly to_tensor's arithmetic
        batch = nhwc.permute(0, 3, 1, 2)  # (b, 3, H, W) in channels_last memory
        yield (batch if channels_last else batch.contiguous()), indices


def stitch(plan: TilePlan, tile_maps: np.ndarray | Tensor) -> np.ndarray:
    """Put per-tile maps (n_tiles, h, w), row-major, back together in image coordinates and
    drop the cells that lie wholly in the padding."""
    maps = tile_maps.detach().cpu().numpy() if isinstance(tile_maps, Tensor) else np.asarray(tile_maps)
    maps = maps.reshape(len(plan), maps.shape[-2], maps.shape[-1])
    th, tw = maps.shape[1:]
    if TILE_HEIGHT % th or TILE_WIDTH // tw != TILE_HEIGHT // th:
        raise ValueError(f"a {th}x{tw} map does not tile a {TILE_HEIGHT}x{TILE_WIDTH} crop evenly")
    full = maps.reshape(plan.rows, plan.cols, th, tw).transpose(0, 2, 1, 3).reshape(plan.rows * th, plan.cols * tw)
    ch, cw = plan.map_shape(TILE_HEIGHT // th)
    return np.ascontiguousarray(full[:ch, :cw])


@dataclass
class DensityMap:
    """A predicted density map in image coordinates: ``values[i, j]`` counts the people in the
    cell of ``cell`` pixels (height, width) at row i, column j of the original image."""

    values: np.ndarray
    cell: tuple[float, float]
    image_size: tuple[int, int]

    @property
    def count(self) -> float:
        return float(self.values.sum())

    def to_pixels(self) -> np.ndarray:
        """Per-pixel density of the original image's size (sums to the same count), for pictures."""
        h, w = self.image_size
        t = torch.from_numpy(np.ascontiguousarray(self.values, dtype=np.float32))[None, None]
        ch, cw = self.values.shape
        # The stitched cells may overhang the image (partial last cell): resample the covered part.
        cover_h, cover_w = ch * self.cell[0], cw * self.cell[1]
        up = torch.nn.functional.interpolate(t, size=(max(1, round(cover_h)), max(1, round(cover_w))),
                                             mode="bilinear", align_corners=False)[0, 0, :h, :w]
        total, got = float(t.sum()), float(up.sum())
        out = np.zeros((h, w), np.float32)  # cells may cover less (features: whole 8x8 cells)
        out[:up.shape[0], :up.shape[1]] = (up * (total / got if abs(got) > 1e-12 else 0.0)).numpy()
        return out


class CountTimeout(TimeoutError):
    """Counting passed its deadline (``count_tiles(..., deadline=...)``) and stopped."""


def feature_batches(features: Tensor, plan: TilePlan, batch_size: int = 8
                    ) -> Iterator[tuple[Tensor, list[int]]]:
    """(b, C, 48, 64) batches of tiles of (C, h, w) frontend features (zero beyond them) and
    their indices, channels_last; the feature counterpart of :func:`tile_batches`."""
    from .features import feature_tile

    hwc = features.permute(1, 2, 0)
    for start in range(0, len(plan), batch_size):
        indices = list(range(start, min(start + batch_size, len(plan))))
        tiles = [feature_tile(hwc, *(v // STRIDE for v in plan.box(i))) for i in indices]
        yield torch.stack(tiles).contiguous(memory_format=torch.channels_last), indices


@torch.inference_mode()
def count_tiles(model: nn.Module | Runner, image: np.ndarray | None, mode: str = "pad", batch_size: int = 8,
                branches: Sequence[int] = (), device: str | torch.device | None = None,
                engine: str | Engine | None = "auto", level: str | None = None,
                features: Tensor | np.ndarray | None = None, deadline: float | None = None
                ) -> tuple[float, dict[int, DensityMap], list[float]]:
    """Count the people in an (H, W, 3) uint8 image of any size: the one tile loop that
    :class:`~deepcount.predict.Counter` (and so video and the service), evaluation and
    validation run.

    ``model`` is a network of :data:`deepcount.model.ARCHITECTURES` (on ``device``, default:
    where its parameters are) or a :class:`~deepcount.engines.Runner` (e.g. an exported model's
    session).  Returns the image's count (the sum of its tiles' backbone counts), the density
    map of each of ``branches`` stitched in image coordinates (only the branches asked for run;
    none: the backbone alone), and the per-tile counts.  ``engine`` (see
    :mod:`deepcount.engines`) is how a network runs: ``auto`` (default) is the fastest
    float32-exact path of the device, ``eager`` the plain one; a runner ignores it.

    Mode ``features`` needs the frontend ``level`` the model was trained at (a runner made
    with one carries it); ``features`` (C, H/8, W/8), e.g. from a
    :class:`deepcount.features.FeatureCache`, skips the frontend (``image`` may then be None).
    ``deadline`` (a ``time.monotonic()`` value): past it, :class:`CountTimeout` is raised
    before the next batch of tiles, so abandoned work ends within one batch.
    """
    branches = tuple(int(b) for b in branches)
    if features is not None:
        features = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features)
        height, width = features.shape[-2] * STRIDE, features.shape[-1] * STRIDE
        mode = "features"
    else:
        assert image is not None, "an image or its features"
        height, width = image.shape[:2]
    plan = plan_tiles(height, width, mode)
    if isinstance(model, nn.Module):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        run = engine_runner(model, engine, device, level if mode == "features" else None)
    else:
        device, run = torch.device(device or "cpu"), model
    if mode == "features":
        if getattr(run, "level", None) is None:
            raise ValueError("tiling mode 'features' needs a DeepCount and the frontend level it was "
                             "trained at (level=...)")
        feats = run.frontend(image) if features is None else features.to(device, torch.float32)
        batches = feature_batches(feats, plan, batch_size)
    else:
        batches = tile_batches(image, plan, batch_size)
    # A runner whose network counts by its density map (CSRNet, or its export) says so with
    # `counts_by_map`: its count is then the map's sum without the cells in the padding.
    by_map = bool(getattr(run, "counts_by_map", False))
    ask = branches or ((1,) if by_map else ())
    counts = torch.empty(len(plan), dtype=torch.float64)
    maps: dict[int, Tensor] = {}
    for batch, indices in batches:
        if deadline is not None and time.monotonic() > deadline:
            raise CountTimeout(f"counting stopped at its deadline after {indices[0]} of {len(plan)} tiles")
        c, tile_maps = run(batch.to(device), ask)
        for k, m in tile_maps.items():
            m = m.float().cpu()
            if k not in maps:
                maps[k] = torch.empty(len(plan), *m.shape[1:])
            maps[k][indices] = m
        if by_map:
            m = tile_maps[ask[0]].double().cpu()
            c = (m * _inside(plan, indices, m.shape[-2:])).sum((1, 2))
        counts[indices] = c.double().cpu()
    density = {k: DensityMap(stitch(plan, maps[k]), plan.cell_size(TILE_HEIGHT // maps[k].shape[1]),
                             (plan.height, plan.width)) for k in branches}
    return float(counts.sum()), density, counts.tolist()


def _inside(plan: TilePlan, indices: list[int], shape: torch.Size) -> Tensor:
    """(b, h, w) float64 masks of the map cells of tiles ``indices`` that are not wholly padding."""
    h, w = shape
    stride = TILE_HEIGHT // h
    ch, cw = plan.map_shape(stride)
    mask = torch.zeros(len(indices), h, w, dtype=torch.float64)
    for j, i in enumerate(indices):
        r, c = divmod(i, plan.cols)
        mask[j, :max(0, min(h, ch - r * h)), :max(0, min(w, cw - c * w))] = 1
    return mask
