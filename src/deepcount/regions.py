"""Counting inside a region of the picture: a polygon (a doorway, a platform, a camera's zone)
or a mask.

A region's count is the density map summed inside it: the map (of the branch asked for, or the
model's finest) is resampled to the image's pixels keeping its sum
(:meth:`~deepcount.tiling.DensityMap.to_pixels`), and the pixels whose centres fall inside the
region are added up.  Regions that split the image add up to the map's total.  A DeepCount's
map total is its branch's count, which is not its backbone's count (Table 7: the backbone is
the better counter), so each region also gets ``scaled``: its share of the map times the
backbone's count, which is what the models here are most accurate with (docs/RESULTS.md says
by how much, on annotated points inside polygons).

Region files:

- JSON: a list of ``[x, y]`` vertices in image pixels (one region, named after the file), or
  ``{"name": [[x, y], ...], ...}`` (several), or ``{"regions": [{"name": ..., "polygon": [...]}]}``;
- an image (PNG, ...): a mask of the image's size, non-zero inside.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tiling import DensityMap


class RegionError(ValueError):
    """A region file or region that cannot be used (the message says why)."""


@dataclass
class Region:
    """A named polygon (``(K, 2)`` ``x, y`` vertices in image pixels, pixel centres at integers
    as for annotated points) or a boolean mask of the image's size."""

    name: str
    polygon: np.ndarray | None = None
    mask_array: np.ndarray | None = field(default=None, repr=False)
    _rasters: dict = field(default_factory=dict, repr=False, compare=False)  # the last polygon mask drawn

    def __post_init__(self) -> None:
        if (self.polygon is None) == (self.mask_array is None):
            raise RegionError(f"region {self.name!r}: give a polygon or a mask")
        if self.polygon is not None:
            poly = np.asarray(self.polygon, dtype=np.float64)
            if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3 or not np.isfinite(poly).all():
                raise RegionError(f"region {self.name!r}: a polygon needs at least 3 finite [x, y] vertices")
            self.polygon = poly

    def inside(self, points: np.ndarray, height: int, width: int) -> np.ndarray:
        """Which of the ``(N, 2)`` ``x, y`` points lie inside (points on the image's pixels)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.polygon is not None:
            from matplotlib.path import Path as MplPath

            return MplPath(self.polygon).contains_points(points)
        mask = self.mask(height, width)
        col = np.clip(np.round(points[:, 0]).astype(int), 0, width - 1)
        row = np.clip(np.round(points[:, 1]).astype(int), 0, height - 1)
        return mask[row, col]

    def mask(self, height: int, width: int) -> np.ndarray:
        """Boolean ``(height, width)``: the pixels whose centres are inside."""
        if self.mask_array is not None:
            if self.mask_array.shape != (height, width):
                raise RegionError(f"region {self.name!r}: the mask is {self.mask_array.shape[1]}x"
                                  f"{self.mask_array.shape[0]} pixels, the image {width}x{height}")
            return self.mask_array
        if self._rasters.get("size") != (height, width):  # video: the same size frame after frame
            rows, cols = np.mgrid[0:height, 0:width]
            centres = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float64)
            self._rasters = {"size": (height, width),
                             "mask": self.inside(centres, height, width).reshape(height, width)}
        return self._rasters["mask"]


def as_regions(regions: "str | os.PathLike | Region | list[Region]") -> list[Region]:
    """What ``Counter.count(regions=...)`` and ``VideoRun(regions=...)`` take, as a list: a
    region file's path, one :class:`Region`, or several."""
    if isinstance(regions, Region):
        return [regions]
    if isinstance(regions, (str, os.PathLike)):
        return load_regions(regions)
    return list(regions)


def load_regions(path: str | os.PathLike) -> list[Region]:
    """The regions of a JSON polygon file or a mask image (see the module)."""
    path = Path(path)
    if not path.is_file():
        raise RegionError(f"{path}: no such region file")
    if path.suffix.lower() == ".json":
        try:
            return parse_regions(path.read_text(encoding="utf-8"), path.stem)
        except UnicodeDecodeError as e:
            raise RegionError(f"{path}: not valid JSON ({e})") from e
        except RegionError as e:
            raise RegionError(f"{path}: {e}") from e
    from .images import ImageLoadError, load_image

    try:
        mask = load_image(path)
    except ImageLoadError as e:
        raise RegionError(f"{path}: not a JSON polygon file nor a readable mask image ({e.reason})") from e
    return [Region(path.stem, mask_array=np.asarray(mask).max(axis=-1) > 0)]


def parse_regions(text: str, name: str = "region") -> list[Region]:
    """Polygons from JSON text, in the forms a region file holds (see the module); a bare
    vertex list is one region called ``name``."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RegionError(f"not valid JSON ({e})") from e
    if isinstance(doc, dict) and isinstance(doc.get("regions"), list):
        items = [(r.get("name", f"region{i + 1}"), r.get("polygon")) for i, r in enumerate(doc["regions"])
                 if isinstance(r, dict)]
    elif isinstance(doc, dict):
        items = list(doc.items())
    else:
        items = [(name, doc)]
    if not items:
        raise RegionError("no regions in it")
    try:
        regions = [Region(str(key), polygon=np.asarray(poly, dtype=np.float64)) for key, poly in items]
    except (TypeError, ValueError) as e:
        raise RegionError(str(e)) from e
    if len({r.name for r in regions}) != len(regions):
        raise RegionError("two regions share a name")
    return regions


def region_counts(density: DensityMap, regions: list[Region], count: float | None = None
                  ) -> dict[str, dict[str, float]]:
    """Per region: ``map`` (the density map summed inside it) and, given the image's
    ``count`` (a DeepCount's backbone count), ``scaled`` (the region's share of the map times
    ``count``)."""
    h, w = density.image_size
    pixels = density.to_pixels().astype(np.float64)
    total = float(pixels.sum())
    out = {}
    for region in regions:
        inside = float(pixels[region.mask(h, w)].sum())
        row = {"map": inside}
        if count is not None:
            row["scaled"] = count * inside / total if total > 1e-12 else 0.0
        out[region.name] = row
    return out


def draw_regions(picture: np.ndarray, regions: list[Region], counts: dict[str, dict[str, float]] | None = None,
                 key: str = "scaled") -> np.ndarray:
    """``picture`` (whose left part is the photo) with each region's outline (a mask's where it
    ends) and, given ``counts``, its name and count at its centre."""
    from PIL import Image, ImageDraw, ImageFont

    out = Image.fromarray(np.asarray(picture))
    draw = ImageDraw.Draw(out)
    size = max(12, out.height // 32)
    font = ImageFont.load_default(size=size)
    h = out.height
    for region in regions:
        if region.polygon is not None:
            xy = [tuple(p) for p in region.polygon.tolist()]
            draw.line(xy + [xy[0]], fill=(0, 255, 255), width=max(2, h // 250), joint="curve")
            anchor = tuple(region.polygon.mean(axis=0))
        else:
            mask = region.mask_array
            edge = mask & ~(np.pad(mask, 1)[2:, 1:-1] & np.pad(mask, 1)[:-2, 1:-1]
                            & np.pad(mask, 1)[1:-1, 2:] & np.pad(mask, 1)[1:-1, :-2])
            edge_rgba = np.zeros((*mask.shape, 4), np.uint8)
            edge_rgba[edge] = (0, 255, 255, 255)
            out.paste(Image.fromarray(edge_rgba, "RGBA"), (0, 0), Image.fromarray(edge_rgba, "RGBA"))
            rows, cols = np.nonzero(mask)
            anchor = (float(cols.mean()), float(rows.mean())) if rows.size else (0.0, 0.0)
        if counts is not None and region.name in counts:
            value = counts[region.name].get(key, counts[region.name]["map"])
            text = f"{region.name}: {value:.1f}"
            box = draw.textbbox(anchor, text, font=font, anchor="mm")
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text(anchor, text, fill=(0, 255, 255), font=font, anchor="mm")
    return np.asarray(out)
