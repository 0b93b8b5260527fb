"""Ground truth (Section 3.2): fixed Gaussian at full resolution, sum pooling to the five map
sizes, mass kept, cached on disk."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d

from deepcount.datasets import shanghaitech
from deepcount.images import load_image
from deepcount.model import MAP_SIZES
from deepcount.targets import (OFFICIAL, PAPER, POOL_FACTORS, GroundTruthCache, GroundTruthConfig,
                               HeadKernels, density_map, gaussian_1d, head_pixels, sum_pool)

H, W = 768, 1024  # ShanghaiTech B


@pytest.fixture(scope="module")
def shb_test(shb_root):
    ds = shanghaitech(shb_root, "B", "test")
    assert len(ds) == 316
    return ds


def _in_region(points, top, left, h, w, height=H, width=W):
    px = head_pixels(points, height, width)
    return int(((px[:, 0] >= top) & (px[:, 0] < top + h) & (px[:, 1] >= left) & (px[:, 1] < left + w)).sum())


def test_every_map_keeps_the_mass_on_every_shanghaitech_b_test_image(shb_test):
    rng = np.random.default_rng(0)
    checked = 0
    for item in shb_test:
        k = HeadKernels.from_points(item.points, H, W, PAPER)
        whole = k.pyramid()
        for m in whole.maps:
            assert abs(float(m.sum(dtype=np.float64)) - item.count) < 1e-3, item.image
        assert abs(whole.count - item.count) < 1e-3
        # crops: the four pad-mode tiles and two random crops (one overhanging the image)
        crops = [(0, 0), (0, 512), (384, 0), (384, 512), (int(rng.integers(0, H - 383)), int(rng.integers(0, W - 511))),
                 (int(rng.integers(400, H)), int(rng.integers(600, W)))]
        for top, left in crops:
            t = k.crop(top, left)
            expected = _in_region(item.points, top, left, 384, 512)
            assert [m.shape for m in t.maps] == [MAP_SIZES[b] for b in sorted(MAP_SIZES)]
            for m in t.maps:
                assert abs(float(m.sum(dtype=np.float64)) - expected) < 1e-3, (item.image, top, left)
            assert abs(t.count - expected) < 1e-3
            checked += 1
    assert checked == 6 * 316


@pytest.mark.offline
def test_every_map_keeps_the_mass_of_synthetic_heads_on_the_border_and_past_it(synthetic):
    for item in synthetic:
        h, w = load_image(item.image).shape[:2]
        k = HeadKernels.from_points(item.points, h, w, PAPER)
        for m in k.pyramid().maps:  # maps of the whole image (its size need not divide by 64)
            assert abs(float(m.sum(dtype=np.float64)) - item.count) < 1e-3, item.image
        for top, left in [(0, 0), (h - 200, w - 300)]:  # a corner crop and one overhanging the image
            t = k.crop(top, left)
            expected = _in_region(item.points, top, left, 384, 512, h, w)
            assert [m.shape for m in t.maps] == [MAP_SIZES[b] for b in sorted(MAP_SIZES)]
            assert all(abs(float(m.sum(dtype=np.float64)) - expected) < 1e-3 for m in t.maps)


def test_heads_annotated_outside_the_image_are_kept_at_its_border(shb_test):
    outside = [it for it in shb_test if ((it.points < -0.5) | (it.points[:, :1] > W - 0.5)
                                          | (it.points[:, 1:] > H - 0.5)).any()]
    assert outside, "ShanghaiTech B test has points outside the image"
    it = outside[0]
    assert abs(HeadKernels.from_points(it.points, H, W).density().sum(dtype=np.float64) - it.count) < 1e-3


def test_pyramid_is_sum_pooling_of_the_full_resolution_density(shb_test):
    for config in (PAPER, OFFICIAL):
        k = HeadKernels.from_points(shb_test[5].points, H, W, config)
        for top, left in [(0, 0), (200, 300), (500, 700)]:
            full = k.density(top, left, 384, 512)
            t = k.crop(top, left)
            for f, m in zip(POOL_FACTORS, t.maps):
                np.testing.assert_allclose(m, sum_pool(full, f), atol=1e-5)
            flipped = k.crop(top, left, flip=True)
            for f, m in zip(POOL_FACTORS, flipped.maps):
                np.testing.assert_allclose(m, sum_pool(full[:, ::-1], f), atol=1e-5)


def test_official_density_is_a_49x49_sigma_10_convolution_that_loses_border_mass(shb_test):
    it = shb_test[0]
    px = head_pixels(it.points, H, W)
    delta = np.zeros((H, W))
    np.add.at(delta, (px[:, 0], px[:, 1]), 1.0)
    g = gaussian_1d(10.0, 24)
    assert g.size == 49
    reference = convolve2d(delta, np.outer(g, g), mode="same")
    got = density_map(it.points, H, W, OFFICIAL)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert got.sum() < it.count - 0.1  # heads near the border lose mass, as in the authors' code
    paper = density_map(it.points, H, W, PAPER)
    assert abs(paper.sum(dtype=np.float64) - it.count) < 1e-3


@pytest.mark.offline
def test_paper_kernel_is_sigma_5():
    assert PAPER.sigma == 5.0 and PAPER.radius == 15
    d = density_map(np.array([[500.0, 400.0]]), H, W)
    row = d[400, 485:516] / d[400, 500]
    expected = np.exp(-0.5 * (np.arange(-15, 16) / 5.0) ** 2)
    np.testing.assert_allclose(row, expected, rtol=1e-5)
    assert np.unravel_index(d.argmax(), d.shape) == (400, 500)


@pytest.mark.offline
def test_small_image_crop_is_padded_with_zero_targets():
    points = np.array([[10.0, 10.0], [300.0, 200.0], [299.0, 249.0]])
    k = HeadKernels.from_points(points, 250, 300)  # smaller than 384x512
    t = k.crop(0, 0)
    assert abs(t.count - 3) < 1e-6
    m1 = t.maps[0]  # 48x64 cells of 8x8 pixels: the image covers 32 x 38 cells (31.25 x 37.5)
    assert np.all(m1[32:, :] == 0) and np.all(m1[:, 38:] == 0)


@pytest.mark.offline
def test_points_pixel_convention():
    # (x, y) = (0, 0) is the centre of the top-left pixel; -0.5 .. 0.5 all fall in pixel 0.
    px = head_pixels(np.array([[0.0, 0.0], [0.49, -0.5], [0.5, 1.49], [99.7, 50.2]]), 60, 100)
    assert px.tolist() == [[0, 0], [0, 0], [1, 1], [50, 99]]


def test_cache_is_keyed_by_content_and_settings(tmp_path, shb_test):
    cache = GroundTruthCache(tmp_path)
    it = shb_test[3]
    a = cache.get(it.points, H, W, PAPER)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    b = cache.get(it.points, H, W, PAPER)  # read back from disk
    np.testing.assert_array_equal(a.wy, b.wy)
    np.testing.assert_array_equal(a.wx, b.wx)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    cache.get(it.points, H, W, GroundTruthConfig(sigma=10.0))
    moved = it.points.copy()
    moved[0, 0] += 1
    cache.get(moved, H, W, PAPER)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    files[0].write_bytes(b"torn write")
    c = cache.get(it.points, H, W, PAPER)  # a broken entry is recomputed, not trusted
    np.testing.assert_array_equal(a.wy, c.wy)


@pytest.mark.offline
def test_config_validation():
    with pytest.raises(ValueError):
        GroundTruthConfig(sigma=0)
    with pytest.raises(ValueError):
        GroundTruthConfig(kernel_size=48)
    assert OFFICIAL.radius == 24
