"""Density-map pictures (Figure 4) that a person can put in a report.

:func:`overlay` draws a predicted :class:`~deepcount.tiling.DensityMap` over the photo: the
photo is left unchanged where the density is near zero, and the density is shown with a
perceptually ordered colour map (``inferno`` by default) whose opacity follows it.  A colour bar
beside the photo gives the scale in people per cell of the map (the cell's size in pixels is
written under it), and the count sits in the top-left corner.  ``side_by_side=True`` puts the
photo and the map alone next to each other instead.  Everything is drawn with NumPy and Pillow
at the photo's own resolution (the map is resampled bilinearly, keeping its sum).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tiling import DensityMap

DEFAULT_CMAP = "inferno"  # perceptually ordered; dark where sparse, bright where dense
NEAR_ZERO = 0.03  # below this fraction of the map's peak the photo is left as it is
MAX_OPACITY = 0.8


def heatmap(values: np.ndarray, cmap: str = DEFAULT_CMAP, peak: float | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 colours of ``values`` scaled to ``peak`` (default: their maximum), and the
    0..1 scaled values."""
    from matplotlib import colormaps

    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    peak = (v.max() if v.size else 0.0) if peak is None else peak
    scaled = np.clip(v / peak, 0, 1) if peak > 0 else np.zeros_like(v)
    rgb = (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)
    return rgb, scaled


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(picture: Image.Image, text: str) -> None:
    """``text`` in white on a black box in the top-left corner."""
    draw = ImageDraw.Draw(picture)
    size = max(14, picture.height // 32)  # small enough to hide little of the map under it
    font = _font(size)
    box = draw.textbbox((0, 0), text, font=font)
    pad = size // 3
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)


def _tick(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def colorbar(height: int, peak: float, cell: tuple[float, float], cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """A white panel ``height`` pixels high: a vertical colour bar from 0 (bottom) to ``peak``
    people per cell, ticks at 0, 1/2 and the peak, the unit above and the cell size below."""
    from matplotlib import colormaps

    size = max(11, height // 40)
    width = max(8 * size, height // 6)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = _font(size)
    top, bottom = 3 * size, height - 3 * size
    bar_x0, bar_x1 = size, size + max(8, width // 6)
    if bottom - top > 2:
        ramp = np.linspace(1, 0, bottom - top)[:, None]  # the peak at the top
        colours = (colormaps[cmap](ramp)[..., :3] * 255).round().astype(np.uint8)
        panel.paste(Image.fromarray(np.repeat(colours, bar_x1 - bar_x0, axis=1)), (bar_x0, top))
        draw.rectangle((bar_x0, top, bar_x1 - 1, bottom - 1), outline=(0, 0, 0))
        for frac in (0.0, 0.5, 1.0):
            y = round(bottom - 1 - frac * (bottom - top - 1))
            draw.line((bar_x1, y, bar_x1 + size // 2, y), fill=(0, 0, 0))
            draw.text((bar_x1 + size * 0.7, y), _tick(frac * peak), fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((size // 2, size), "people / cell", fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((size // 2, height - 1.8 * size), f"cell {cell[0]:.0f}x{cell[1]:.0f} px", fill=(0, 0, 0),
              font=font, anchor="lm")
    return np.asarray(panel)


def overlay(image: np.ndarray, density: DensityMap | None, count: float, cmap: str = DEFAULT_CMAP,
            alpha: float = MAX_OPACITY, label: str | None = None, side_by_side: bool = False,
            scale: bool = True) -> np.ndarray:
    """The photo with ``density`` drawn over it, ``label`` (default: the count) in the corner.

    The colour and the opacity of a pixel both follow the map there, in people per cell of the
    map (its per-pixel density times the cell's area), scaled to the map's peak: the photo is
    unchanged below :data:`NEAR_ZERO` of the peak and covered up to ``alpha`` at it (by the
    square root in between, so a sparse crowd stays visible).  ``scale``: add the colour bar on
    the right.  ``side_by_side``: the photo on the left and the map alone (on black) on the
    right.  Without a map (a model that has none), only the photo and the label."""
    photo = np.asarray(image, dtype=np.uint8)[..., :3]
    out = photo.astype(np.float64)
    panels = []
    if density is not None:
        per_cell = density.to_pixels().astype(np.float64) * density.cell[0] * density.cell[1]
        peak = float(max(per_cell.max(initial=0.0), 0.0))
        colours, scaled = heatmap(per_cell, cmap, peak)
        if side_by_side:
            weight = (scaled >= NEAR_ZERO)[..., None].astype(np.float64)
            gap = np.full((photo.shape[0], max(4, photo.shape[1] // 128), 3), 255, np.uint8)
            panels += [gap, (colours * weight).round().astype(np.uint8)]  # black where nobody is
        else:
            weight = np.where(scaled >= NEAR_ZERO, alpha * np.sqrt(scaled), 0.0)[..., None]
            out = out * (1 - weight) + colours * weight
        if scale:
            panels.append(colorbar(photo.shape[0], peak, density.cell, cmap))
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    _label(picture, label if label is not None else f"count {count:.1f}")
    return np.concatenate([np.asarray(picture), *panels], axis=1) if panels else np.asarray(picture)


def png_bytes(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def save_png(picture: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(picture).save(path, format="PNG")
