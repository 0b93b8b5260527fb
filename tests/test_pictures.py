"""Density pictures on a real photo, drawn from its ground-truth density (sum-pooled to 8x8
cells, as a model's finest map): the photo is untouched where nobody is, colour and opacity
follow the density, the colour bar's scale is the map's in people per cell."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps

from deepcount.datasets import shanghaitech
from deepcount.images import load_image
from deepcount.pictures import DEFAULT_CMAP, NEAR_ZERO, colorbar, overlay
from deepcount.targets import density_map, sum_pool
from deepcount.tiling import DensityMap


@pytest.fixture(scope="module")
def scene(shb_root):
    item = shanghaitech(shb_root, "B", "test")[0]  # IMG_1: 23 heads on a 768x1024 street
    photo = load_image(item.image)
    h, w = photo.shape[:2]
    cells = sum_pool(density_map(item.points, h, w), 8)  # people per 8x8 cell
    return photo, DensityMap(cells, (8.0, 8.0), (h, w)), len(item.points)


def test_photo_untouched_where_nobody_is_and_coloured_by_the_density_where_people_are(scene):
    photo, density, heads = scene
    picture = overlay(photo, density, density.count)
    h, w = photo.shape[:2]
    assert picture.shape[0] == h and picture.shape[1] > w  # photo, then the colour bar
    per_cell = density.to_pixels() * 64
    peak = per_cell.max()
    body = picture[:, :w].astype(int)
    below_label = np.zeros((h, w), bool)
    below_label[h // 10:] = True
    empty = (per_cell < NEAR_ZERO * peak) & below_label
    assert empty.mean() > 0.5 and np.array_equal(body[empty], photo[empty])  # no cast over empty street
    hot = (per_cell > 0.8 * peak) & below_label
    assert hot.any()
    colour = np.asarray(colormaps[DEFAULT_CMAP](per_cell[hot] / peak))[:, :3] * 255
    # at the heads the picture is mostly the colour map's colour for that density (opacity ~0.8)
    assert np.abs(body[hot] - colour).mean() < np.abs(body[hot] - photo[hot]).mean() / 2
    opacity = np.abs(body.astype(float) - photo).sum(-1)
    mid = (per_cell > 0.2 * peak) & (per_cell < 0.4 * peak) & below_label
    assert opacity[hot].mean() > opacity[mid].mean() > 0  # opacity follows the density


def test_the_colour_bar_is_the_maps_scale_in_people_per_cell(scene):
    photo, density, _ = scene
    peak = float((density.to_pixels() * 64).max())
    h, w = photo.shape[:2]
    picture = overlay(photo, density, density.count)
    bar = colorbar(h, peak, density.cell)
    assert np.array_equal(picture[:, w:], bar)
    column = bar[:, max(11, h // 40) + 3]  # inside the bar (it starts one font size from the left)
    top_colour = np.asarray(colormaps[DEFAULT_CMAP](1.0)[:3]) * 255
    bottom_colour = np.asarray(colormaps[DEFAULT_CMAP](0.0)[:3]) * 255
    coloured = [r.astype(float) for r in column if len(set(r.tolist())) > 1]  # not text, outline or paper
    assert len(coloured) > h // 2  # a bar most of the picture's height ...
    assert np.abs(coloured[0] - top_colour).max() <= 4 and np.abs(coloured[-1] - bottom_colour).max() <= 4
    assert not np.array_equal(bar, colorbar(h, 2 * peak, density.cell))  # the ticks say the peak


def test_side_by_side_keeps_the_photo_and_shows_the_map_alone_on_black(scene):
    photo, density, _ = scene
    h, w = photo.shape[:2]
    picture = overlay(photo, density, density.count, side_by_side=True, scale=False)
    left, gap = picture[:, :w], picture[:, w:w + 8]
    assert np.array_equal(left[h // 10:], photo[h // 10:]) and (gap == 255).all()
    right = picture[:, -w:]
    per_cell = density.to_pixels() * 64
    assert (right[per_cell < NEAR_ZERO * per_cell.max()] == 0).all()
    assert right[per_cell > 0.5 * per_cell.max()].mean() > 100


def test_no_map_is_the_photo_with_its_label(scene):
    photo, _, _ = scene
    picture = overlay(photo, None, 21.0)
    assert picture.shape == photo.shape and np.array_equal(picture[100:], photo[100:])
    assert picture[5:15, 5:60].mean() < 60 < photo[5:15, 5:60].mean()  # the black label box
