"""Counting inside a region: polygons and masks, from a density map; checked on real images
with the annotated points inside the polygon as the truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from deepcount.cli import main
from deepcount.datasets import shanghaitech
from deepcount.regions import Region, RegionError, load_regions, region_counts
from deepcount.targets import density_map, sum_pool
from deepcount.tiling import DensityMap


@pytest.fixture(scope="module")
def shb_test(shb_root):
    return shanghaitech(shb_root, "B", "test")


def halves(h: int, w: int) -> list[Region]:
    return [Region("left", polygon=np.array([[-0.5, -0.5], [w / 2 - 0.5, -0.5], [w / 2 - 0.5, h - 0.5], [-0.5, h - 0.5]])),
            Region("right", polygon=np.array([[w / 2 - 0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5],
                                              [w / 2 - 0.5, h - 0.5]]))]


def doorway(h: int, w: int) -> Region:
    return Region("doorway", polygon=np.array([[w * 0.25, h * 0.3], [w * 0.75, h * 0.2], [w * 0.8, h * 0.9],
                                               [w * 0.2, h * 0.8]]))


def test_the_ground_truth_map_counts_the_annotated_points_inside_a_polygon(shb_test):
    """With the true density (sum-pooled to 8x8 cells, as a model's finest map) as the map, a
    region's count is the number of heads inside it, up to the kernels cut by its edge."""
    for item in list(shb_test)[:6]:
        h, w = 768, 1024
        dmap = DensityMap(sum_pool(density_map(item.points, h, w), 8), (8.0, 8.0), (h, w))
        regions = halves(h, w) + [doorway(h, w)]
        got = region_counts(dmap, regions, count=len(item.points))
        left, right = got["left"], got["right"]
        assert left["map"] + right["map"] == pytest.approx(dmap.count, rel=1e-5)  # a partition adds up
        assert left["scaled"] + right["scaled"] == pytest.approx(len(item.points), rel=1e-6)
        for region in regions:
            truth = int(region.inside(item.points, h, w).sum())
            assert abs(got[region.name]["map"] - truth) <= 0.15 * truth + 2, (item.image.name, region.name)


def test_a_mask_counts_as_its_polygon(tmp_path, shb_test):
    item = shb_test[0]
    h, w = 768, 1024
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    (region,) = load_regions(tmp_path / "left.png")
    assert region.name == "left" and region.polygon is None
    dmap = DensityMap(sum_pool(density_map(item.points, h, w), 8), (8.0, 8.0), (h, w))
    assert region_counts(dmap, [region])["left"]["map"] == pytest.approx(
        region_counts(dmap, halves(h, w)[:1])["left"]["map"], rel=1e-6)
    assert region.inside(item.points, h, w).sum() == halves(h, w)[0].inside(item.points, h, w).sum()
    with pytest.raises(RegionError, match="the mask is 512x768 pixels, the image 1024x768"):
        Region("m", mask_array=mask[:, :512].astype(bool)).mask(h, w)


@pytest.mark.parametrize("text, message", [
    ("[[0, 0], [1, 1]]", "at least 3 finite"),
    ("{not json", "not valid JSON"),
    ('{"a": [[0, 0], [1, 0], [1, "x"]]}', "could not convert"),
])
@pytest.mark.offline
def test_bad_region_files_are_refused(tmp_path, text, message):
    path = tmp_path / "zone.json"
    path.write_text(text)
    with pytest.raises(RegionError, match=message):
        load_regions(path)


def test_count_with_a_region_file_on_real_photos(counter, shb_test, tmp_path, capsys):
    """`count --region` from the API and the command line agree, the JSON rows hold each
    region's counts, the picture outlines them; a bad region file is a usage error."""
    regions = {"left": halves(768, 1024)[0].polygon.tolist(), "doorway": doorway(768, 1024).polygon.tolist()}
    (tmp_path / "zones.json").write_text(json.dumps(regions))
    photo = shb_test[0].image
    api = counter.count(photo, regions=tmp_path / "zones.json")
    assert set(api.regions) == {"left", "doorway"}
    assert api.density is not None and api.regions["left"]["map"] < api.density.count
    rc = main(["count", "--model", "csrnet-baseline", "--device", "cpu", "-q", str(photo), "--region",
               str(tmp_path / "zones.json"), "--json", str(tmp_path / "rows.json"), "--density", str(tmp_path / "maps")])
    out = capsys.readouterr().out
    assert rc == 0
    row = json.loads((tmp_path / "rows.json").read_text())["images"][0]
    assert row["regions"].keys() == api.regions.keys()
    for name in regions:
        assert row["regions"][name]["scaled"] == pytest.approx(api.regions[name]["scaled"], rel=1e-9)
        assert f"{name}: {api.regions[name]['scaled']:.1f}" in out
    picture = np.asarray(Image.open(tmp_path / "maps" / "IMG_1.density.png"))
    assert (picture[:, :1024] == (0, 255, 255)).all(-1).sum() > 1000  # the outlines, in cyan
    (tmp_path / "bad.json").write_text("[]")
    assert main(["count", "--model", "csrnet-baseline", str(photo), "--region", str(tmp_path / "bad.json")]) == 2
    assert "error: --region:" in capsys.readouterr().err
