"""Density-map pictures: a heatmap over the photo with the count in the corner (Figure 4)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tiling import DensityMap


def heatmap(values: np.ndarray, cmap: str = "jet") -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 colours of a map scaled to its maximum, and the 0..1 scaled map."""
    from matplotlib import colormaps

    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    peak = v.max() if v.size else 0.0
    scaled = v / peak if peak > 0 else np.zeros_like(v)
    rgb = (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)
    return rgb, scaled


def overlay(image: np.ndarray, density: DensityMap | None, count: float, cmap: str = "jet",
            alpha: float = 0.6, label: str | None = None) -> np.ndarray:
    """The photo with the density map blended over it (opaque where the density is high,
    the photo where there is nobody) and ``label`` (default: the count) in the top-left corner."""
    out = np.asarray(image, dtype=np.float64).copy()
    if density is not None:
        colours, scaled = heatmap(density.to_pixels(), cmap)
        weight = (alpha * np.sqrt(scaled))[..., None]  # sqrt: sparse crowds stay visible
        out = out * (1 - weight) + colours * weight
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    size = max(14, picture.height // 20)
    font = ImageFont.load_default(size=size)
    text = label if label is not None else f"count {count:.1f}"
    box = draw.textbbox((0, 0), text, font=font)
    pad = size // 3
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def png_bytes(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def save_png(picture: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(picture).save(path, format="PNG")
