"""Division and combination (Section 3.1): tiles of 384x512 in pad and grid modes, batched
inference, stitched maps in image coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcount.datasets import shanghaitech
from deepcount.images import load_image, to_tensor
from deepcount.model import MAP_SIZES, CSRNet, DeepCount
from deepcount.targets import POOL_FACTORS, GroundTruthConfig, HeadKernels
from deepcount.tiling import DensityMap, count_tiles, plan_tiles, stitch, tile_batches


@pytest.mark.parametrize("h,w,mode,rows,cols", [
    (768, 1024, "pad", 2, 2), (768, 1024, "grid", 2, 2), (384, 512, "pad", 1, 1),
    (700, 500, "pad", 2, 1), (700, 500, "grid", 2, 1), (300, 200, "pad", 1, 1), (300, 200, "grid", 1, 1),
    (1100, 1600, "pad", 3, 4), (1100, 1600, "grid", 3, 3), (6000, 8000, "pad", 16, 16),
])
@pytest.mark.offline
def test_plans(h, w, mode, rows, cols):
    plan = plan_tiles(h, w, mode)
    assert (plan.rows, plan.cols) == (rows, cols)
    if mode == "grid":
        assert plan.working_size == (rows * 384, cols * 512)
    else:
        assert plan.working_size == (h, w)


@pytest.mark.offline
def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="pad"):
        plan_tiles(10, 10, "crop")


@pytest.mark.parametrize("part,split,index", [("B", "test", 0), ("A", "test", 3), ("A", "train", 40)])
def test_stitched_ground_truth_pyramid_equals_the_whole_image_pyramid(shb_root, part, split, index):
    item = shanghaitech(shb_root, part, split)[index]
    h, w = load_image(item.image).shape[:2]
    # Tiles cut from the whole image's density (keep_mass=False: a tile is a crop of that map).
    k = HeadKernels.from_points(item.points, h, w, GroundTruthConfig(keep_mass=False))
    plan = plan_tiles(h, w, "pad")
    tiles = [k.crop(*plan.box(i)) for i in range(len(plan))]
    whole = k.pyramid()
    for level, f in enumerate(POOL_FACTORS):
        stitched = stitch(plan, np.stack([t.maps[level] for t in tiles]))
        assert stitched.shape == (-(-h // f), -(-w // f))
        np.testing.assert_allclose(stitched, whole.maps[level], atol=1e-5)
    assert sum(t.count for t in tiles) == pytest.approx(whole.count, abs=1e-3)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return DeepCount(width=0.125).eval()


@pytest.fixture(scope="module", params=[pytest.param("synthetic", marks=pytest.mark.offline), "shb"])
def photo(request):
    """A 768x1024 photo: ShanghaiTech B test IMG_1, or (offline) the synthetic one of that size."""
    if request.param == "synthetic":
        return load_image(request.getfixturevalue("synthetic")[3].image)
    return load_image(request.getfixturevalue("shb_root") / "part_B_final/test_data/images/IMG_1.jpg")


def test_tiles_are_the_image_cut_and_padded(photo):
    crop = photo[:700, :600]
    plan = plan_tiles(*crop.shape[:2], "pad")
    batches = list(tile_batches(crop, plan, batch_size=3))
    assert [b.shape[0] for b, _ in batches] == [3, 1]
    x = torch.cat([b for b, _ in batches])
    torch.testing.assert_close(x[0], to_tensor(crop[:384, :512]))
    torch.testing.assert_close(x[1, :, :, :88], to_tensor(crop[:384, 512:600]))
    assert torch.all(x[1, :, :, 88:] == 0) and torch.all(x[3, :, 316:, :] == 0)  # padding = mean


def test_counts_sum_over_tiles_and_batching_does_not_change_them(small_model, photo):
    total, density, per_tile = count_tiles(small_model, photo, "pad", batch_size=1)
    assert density == {} and len(per_tile) == 4
    with torch.inference_mode():
        # a tile's count is clamped at 0 at inference (the count head is linear)
        direct = [max(0.0, float(small_model(to_tensor(photo[t:t + 384, l:l + 512])[None])))
                  for t in (0, 384) for l in (0, 512)]
    np.testing.assert_allclose(per_tile, direct, rtol=1e-5, atol=1e-5)
    assert total == pytest.approx(sum(direct), rel=1e-5, abs=1e-5)
    total3, _, _ = count_tiles(small_model, photo, "pad", batch_size=3)
    assert total3 == pytest.approx(total, rel=1e-5, abs=1e-5)
    grid_total, _, _ = count_tiles(small_model, photo, "grid", batch_size=4)  # 1024x768 is already a 2x2 grid
    assert grid_total == pytest.approx(total, rel=1e-5, abs=1e-5)


def test_counting_without_a_map_runs_no_branch_and_with_one_runs_only_it(small_model, photo):
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(int(k))) for k, b in small_model.branches.items()]
    try:
        count_tiles(small_model, photo)
        assert calls == []
        _, maps, _ = count_tiles(small_model, photo[:500, :900], branches=(2,), batch_size=2)
        density = maps[2]
        assert set(calls) == {2}
    finally:
        for h in hooks:
            h.remove()
    assert density.values.shape == (-(-500 // 16), -(-900 // 16))
    assert density.cell == (16.0, 16.0) and density.image_size == (500, 900)


def test_grid_mode_maps_cover_the_original_image(small_model, photo):
    img = photo[:500, :700]  # resized to 1 x 1 tile
    total, maps, per_tile = count_tiles(small_model, img, "grid", branches=(1,))
    density = maps[1]
    assert len(per_tile) == 1
    assert density.values.shape == MAP_SIZES[1]
    assert density.cell == pytest.approx((500 / 48, 700 / 64))
    pixels = density.to_pixels()
    assert pixels.shape == (500, 700)
    assert float(pixels.sum()) == pytest.approx(density.count, rel=1e-4, abs=1e-4)


def test_csrnet_counts_through_the_same_tiles(photo):
    torch.manual_seed(0)
    model = CSRNet(width=0.125).eval()
    total, maps, per_tile = count_tiles(model, photo, branches=(1,))
    density = maps[1]
    assert density.values.shape == (96, 128)
    assert total == pytest.approx(density.count, rel=1e-4)


@pytest.mark.offline
def test_density_map_to_pixels_keeps_the_count():
    values = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    d = DensityMap(values, (128.0, 128.0), (300, 500))
    px = d.to_pixels()
    assert px.shape == (300, 500)
    assert float(px.sum()) == pytest.approx(float(values.sum()), rel=1e-5)
