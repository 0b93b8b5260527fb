"""Dataset readers on the real data (ShanghaiTech, Mall) and on small files in the original formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from deepcount.datasets import (
    DATASETS,
    AnnotatedImage,
    CrowdDataset,
    custom,
    from_matlab,
    jhu_crowd,
    load_dataset,
    mall,
    nwpu_crowd,
    shanghaitech,
    train_val_split,
    ucf_qnrf,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sht(shb_root: Path) -> dict[tuple[str, str], CrowdDataset]:
    """All four ShanghaiTech splits, loaded once."""
    return {(p, s): shanghaitech(shb_root, p, s) for p in "AB" for s in ("train", "test")}


@pytest.fixture(scope="module")
def mall_root(data_root: Path) -> Path:
    return data_root / "mall_dataset"


def _image(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)
    return path


def _shanghaitech_mat(path: Path, location: np.ndarray, number: int | None = None) -> None:
    """Write a .mat with the official nesting: image_info[0,0][0,0] = (location, number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = np.zeros((1, 1), dtype=[("location", "O"), ("number", "O")])
    rec[0, 0]["location"] = np.asarray(location, dtype=np.float64).reshape(-1, 2)
    rec[0, 0]["number"] = np.array([[len(location) if number is None else number]], dtype=np.uint16)
    info = np.empty((1, 1), dtype=object)
    info[0, 0] = rec
    scipy.io.savemat(path, {"image_info": info})


# ----------------------------------------------------------------------------- ShanghaiTech (real)

SHT_EXPECTED = {("A", "train"): (300, 162_707), ("A", "test"): (182, 78_970),
                ("B", "train"): (400, 49_280), ("B", "test"): (316, 39_208)}


@pytest.mark.parametrize("key", list(SHT_EXPECTED))
def test_shanghaitech_exact_totals(sht, key):
    images, heads = SHT_EXPECTED[key]
    ds = sht[key]
    assert (len(ds), ds.total_count) == (images, heads)
    assert ds.split == key[1]


def test_shanghaitech_part_totals(sht):
    assert sht["A", "train"].total_count + sht["A", "test"].total_count == 241_677
    assert sht["B", "train"].total_count + sht["B", "test"].total_count == 88_488


def test_shanghaitech_number_field_matches_location(shb_root):
    files = sorted(shb_root.glob("part_*_final/*_data/ground_truth/GT_IMG_*.mat"))
    assert len(files) == 300 + 182 + 400 + 316
    for f in files:
        rec = scipy.io.loadmat(f)["image_info"][0, 0][0, 0]
        assert int(np.asarray(rec["number"]).ravel()[0]) == len(rec["location"]), f


def test_shanghaitech_numeric_order_and_pairing(sht):
    for ds in sht.values():
        idx = [int(it.image.stem.split("_")[1]) for it in ds]
        assert idx == list(range(1, len(ds) + 1))  # IMG_1, IMG_2, ..., IMG_10, not IMG_1, IMG_10
        for it in ds:
            assert it.annotation.name == f"GT_{it.image.stem}.mat"
            assert it.points.dtype == np.float64 and it.points.shape == (it.count, 2)


def test_shanghaitech_points_are_raw_minus_one(sht):
    item = sht["B", "train"][0]
    raw = scipy.io.loadmat(item.annotation)["image_info"][0, 0][0, 0]["location"]
    np.testing.assert_array_equal(item.points, raw - 1.0)


def test_shanghaitech_b_points_inside_images(sht):
    # Checked on the data: 281 of 88,488 Part B heads (171 train, 110 test, in 190 images) are
    # annotated outside the 1024x768 frame, some by hundreds of pixels; everything else is inside.
    outside = {}
    for split in ("train", "test"):
        n_out = 0
        for it in sht["B", split]:
            with Image.open(it.image) as im:
                assert im.size == (1024, 768)
            x, y = it.points[:, 0], it.points[:, 1]
            n_out += int(np.count_nonzero((x < -0.5) | (x > 1024 - 0.5) | (y < -0.5) | (y > 768 - 0.5)))
        outside[split] = n_out
    assert outside == {"train": 171, "test": 110}


def test_registry_shanghaitech(shb_root, sht):
    ds = load_dataset("shb", shb_root, "test")
    assert [it.image for it in ds] == [it.image for it in sht["B", "test"]]
    assert load_dataset("sha", shb_root, "train").total_count == 162_707


# ----------------------------------------------------------------------------- Mall (real)


def test_mall_totals_and_protocol(mall_root):
    train, test, full = (mall(mall_root, s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (800, 1200, 2000)
    assert full.total_count == 62_315
    assert train.total_count + test.total_count == 62_315
    assert train[0].image.name == "seq_000001.jpg" and train[-1].image.name == "seq_000800.jpg"
    assert test[0].image.name == "seq_000801.jpg" and test[-1].image.name == "seq_002000.jpg"
    assert all(it.image.is_file() for it in (full[0], full[-1]))


def test_mall_counts_match_count_column(mall_root):
    gt = scipy.io.loadmat(mall_root / "mall_gt.mat")
    full = mall(mall_root, "all")
    np.testing.assert_array_equal(full.counts, gt["count"].ravel())
    assert full.counts.min() == 13 and full.counts.max() == 53
    np.testing.assert_array_equal(full[5].points, gt["frame"][0, 5]["loc"][0, 0] - 1.0)
    assert full[0].annotation == mall_root / "mall_gt.mat"


def test_mall_points_inside_640x480(mall_root):
    pts = np.concatenate([it.points for it in mall(mall_root, "all")])
    assert pts.shape == (62_315, 2)
    assert (pts >= -0.5).all() and (pts[:, 0] <= 639.5).all() and (pts[:, 1] <= 479.5).all()


# ----------------------------------------------------------------------------- 1-based -> 0-based


@pytest.mark.offline
def test_from_matlab_subtracts_one_and_keeps_shape():
    np.testing.assert_array_equal(from_matlab([[1, 1], [10.5, 3]]), [[0, 0], [9.5, 2]])
    empty = from_matlab(np.zeros((0, 0)))
    assert empty.shape == (0, 2) and empty.dtype == np.float64
    src = np.array([[5.0, 6.0]])
    from_matlab(src)
    assert src[0, 0] == 5.0  # input left untouched


@pytest.mark.offline
def test_matlab_origin_loads_as_zero(tmp_path):
    img = _image(tmp_path / "part_B_final/test_data/images/IMG_1.jpg")
    _shanghaitech_mat(tmp_path / "part_B_final/test_data/ground_truth/GT_IMG_1.mat", [[1.0, 1.0], [8.0, 6.0]])
    ds = shanghaitech(tmp_path, "B", "test")
    assert ds[0].image == img
    np.testing.assert_array_equal(ds[0].points, [[0.0, 0.0], [7.0, 5.0]])


@pytest.mark.offline
def test_shanghaitech_alternate_layout(tmp_path):
    base = tmp_path / "part_B/train_data"
    for n in (10, 2, 1):
        _image(base / f"images/IMG_{n}.jpg")
        _shanghaitech_mat(base / f"ground-truth/GT_IMG_{n}.mat", np.full((n, 2), 3.0))
    ds = shanghaitech(tmp_path, "B", "train")
    assert [it.image.name for it in ds] == ["IMG_1.jpg", "IMG_2.jpg", "IMG_10.jpg"]
    assert [it.count for it in ds] == [1, 2, 10] and ds.total_count == 13
    assert (ds[2].points == 2.0).all()


@pytest.mark.offline
def test_shanghaitech_empty_image_and_errors(tmp_path):
    base = tmp_path / "part_A_final/train_data"
    _image(base / "images/IMG_1.jpg")
    _shanghaitech_mat(base / "ground_truth/GT_IMG_1.mat", np.zeros((0, 2)))
    assert shanghaitech(tmp_path, "A", "train")[0].points.shape == (0, 2)
    _shanghaitech_mat(base / "ground_truth/GT_IMG_1.mat", [[1.0, 2.0]], number=5)
    with pytest.raises(ValueError, match="GT_IMG_1.mat"):
        shanghaitech(tmp_path, "A", "train")
    scipy.io.savemat(base / "ground_truth/GT_IMG_1.mat", {"wrong": np.zeros(2)})
    with pytest.raises(ValueError, match="GT_IMG_1.mat.*image_info"):
        shanghaitech(tmp_path, "A", "train")
    (base / "ground_truth/GT_IMG_1.mat").unlink()
    with pytest.raises(FileNotFoundError, match="IMG_1.jpg"):
        shanghaitech(tmp_path, "A", "train")
    with pytest.raises(FileNotFoundError, match="part_B"):
        shanghaitech(tmp_path, "B", "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shanghaitech(tmp_path / "nowhere", "A", "train")
    with pytest.raises(ValueError, match="split"):
        shanghaitech(tmp_path, "A", "val")


@pytest.mark.offline
def test_mall_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="frames"):
        mall(tmp_path, "train")
    (tmp_path / "frames").mkdir()
    with pytest.raises(FileNotFoundError, match="mall_gt.mat"):
        mall(tmp_path, "train")
    scipy.io.savemat(tmp_path / "mall_gt.mat", {"count": np.ones((3, 1))})
    with pytest.raises(ValueError, match="mall_gt.mat.*'frame'"):
        mall(tmp_path, "all")


# ----------------------------------------------------------------------------- UCF-QNRF


@pytest.mark.offline
def test_ucf_qnrf(tmp_path):
    root = tmp_path / "UCF-QNRF_ECCV18"
    _image(root / "Train/img_0002.jpg")
    scipy.io.savemat(root / "Train/img_0002_ann.mat", {"annPoints": np.array([[1.0, 1.0], [4.5, 2.0], [8.0, 6.0]])})
    _image(root / "Train/Img_0010.jpg")  # mixed case as in some copies
    scipy.io.savemat(root / "Train/Img_0010_ann.mat", {"annPoints": np.zeros((0, 2))})
    _image(root / "Test/img_0001.jpg")
    scipy.io.savemat(root / "Test/img_0001_ann.mat", {"annPoints": np.array([[2.0, 3.0]])})
    train = ucf_qnrf(root, "train")
    assert [it.image.name for it in train] == ["img_0002.jpg", "Img_0010.jpg"]
    assert [it.count for it in train] == [3, 0] and train[1].points.shape == (0, 2)
    np.testing.assert_array_equal(train[0].points, [[0, 0], [3.5, 1], [7, 5]])
    test = load_dataset("ucf_qnrf", root, "test")
    np.testing.assert_array_equal(test[0].points, [[1.0, 2.0]])
    scipy.io.savemat(root / "Test/img_0001_ann.mat", {"points": np.array([[2.0, 3.0]])})
    with pytest.raises(ValueError, match="img_0001_ann.mat.*annPoints"):
        ucf_qnrf(root, "test")


# ----------------------------------------------------------------------------- JHU-Crowd++


@pytest.mark.offline
def test_jhu_crowd(tmp_path):
    root = tmp_path / "jhu_crowd_v2.0"
    _image(root / "val/images/0002.jpg")
    (root / "val/gt").mkdir(parents=True)
    (root / "val/gt/0002.txt").write_text("10 20 4 5 1 0\n3.5 7 2 2 2 0\n\n")
    _image(root / "val/images/0010.jpg")
    (root / "val/gt/0010.txt").write_text("")
    ds = jhu_crowd(root, "val")
    assert [it.image.name for it in ds] == ["0002.jpg", "0010.jpg"]
    np.testing.assert_array_equal(ds[0].points, [[10, 20], [3.5, 7]])  # already 0-based: unchanged
    assert ds[1].points.shape == (0, 2) and ds.total_count == 2
    assert load_dataset("jhu", root, "val").total_count == 2
    with pytest.raises(FileNotFoundError, match="train"):
        jhu_crowd(root, "train")
    (root / "val/gt/0010.txt").write_text("oops\n")
    with pytest.raises(ValueError, match="0010.txt:1"):
        jhu_crowd(root, "val")


# ----------------------------------------------------------------------------- NWPU-Crowd


@pytest.mark.offline
def test_nwpu_crowd(tmp_path):
    root = tmp_path / "NWPU-Crowd"
    (root / "jsons").mkdir(parents=True)
    for img_id, pts in (("0001", [[1.5, 2.5], [3, 4]]), ("0002", []), ("0003", [[0, 0]])):
        _image(root / f"images/{img_id}.jpg")
        (root / f"jsons/{img_id}.json").write_text(json.dumps(
            {"img_id": f"{img_id}.jpg", "human_num": len(pts), "points": pts, "boxes": []}))
    _image(root / "images/3110.jpg")  # a test image: no json
    (root / "train.txt").write_text("0003 1 2\n0001 0 1\n")
    (root / "val.txt").write_text("0002 1 0\n")
    train = nwpu_crowd(root, "train")
    assert [it.image.name for it in train] == ["0003.jpg", "0001.jpg"]  # list order kept
    np.testing.assert_array_equal(train[1].points, [[1.5, 2.5], [3, 4]])
    val = load_dataset("nwpu", root, "val")
    assert len(val) == 1 and val[0].points.shape == (0, 2)
    full = nwpu_crowd(root, "all")
    assert [it.image.stem for it in full] == ["0001", "0002", "0003"] and full.total_count == 3
    (root / "val.txt").write_text("3110 0 0\n")
    with pytest.raises(FileNotFoundError, match="3110.json"):
        nwpu_crowd(root, "val")


# ----------------------------------------------------------------------------- custom data


@pytest.mark.offline
def test_custom_csv_per_image(tmp_path):
    _image(tmp_path / "a.jpg"), _image(tmp_path / "b.png"), _image(tmp_path / "c.jpg")
    (tmp_path / "a.csv").write_text("x,y\n1.5,2\n3,4\n")
    (tmp_path / "b.csv").write_text("5,6\n")  # no header
    (tmp_path / "c.csv").write_text("")  # empty: 0 heads
    ds = custom(tmp_path)
    assert [it.image.name for it in ds] == ["a.jpg", "b.png", "c.jpg"]
    np.testing.assert_array_equal(ds[0].points, [[1.5, 2], [3, 4]])
    np.testing.assert_array_equal(ds[1].points, [[5, 6]])
    assert ds[2].points.shape == (0, 2) and ds[2].points.dtype == np.float64
    assert ds.total_count == 3 and ds[0].annotation == tmp_path / "a.csv"


@pytest.mark.offline
def test_custom_json_per_image_in_separate_folder(tmp_path):
    imgs, anns = tmp_path / "imgs", tmp_path / "anns"
    _image(imgs / "img1.jpg"), _image(imgs / "img2.jpg")
    anns.mkdir()
    (anns / "img1.json").write_text(json.dumps({"points": [[0, 0], [7, 5]]}))
    (anns / "img2.json").write_text(json.dumps([[2.25, 1]]))
    ds = custom(imgs, anns)
    np.testing.assert_array_equal(ds[0].points, [[0, 0], [7, 5]])
    np.testing.assert_array_equal(ds[1].points, [[2.25, 1]])
    (anns / "img2.json").unlink()
    with pytest.raises(FileNotFoundError, match="img2.jpg"):
        custom(imgs, anns)


@pytest.mark.offline
def test_custom_single_csv(tmp_path):
    imgs = tmp_path / "imgs"
    _image(imgs / "p.jpg"), _image(imgs / "q.jpg"), _image(imgs / "r.jpg")
    with (tmp_path / "points.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["image", "x", "y"], ["q.jpg", 1, 2], ["p.jpg", 3, 4], ["q.jpg", 5, 6], ["r.jpg", "", ""]])
    ds = custom(imgs, tmp_path / "points.csv")
    assert [it.count for it in ds] == [1, 2, 0]
    np.testing.assert_array_equal(ds[1].points, [[1, 2], [5, 6]])
    assert ds[0].annotation == tmp_path / "points.csv"
    (tmp_path / "points.csv").write_text("p.jpg,3,4\nq.jpg,1,2\n")  # headerless; r.jpg missing
    with pytest.raises(ValueError, match="r.jpg"):
        custom(imgs, tmp_path / "points.csv")


@pytest.mark.offline
def test_custom_single_json(tmp_path):
    imgs = tmp_path / "imgs"
    _image(imgs / "p.jpg"), _image(imgs / "q.jpg")
    (tmp_path / "gt.json").write_text(json.dumps({"p.jpg": [[1, 2], [3, 4], [5, 6]], "q": []}))
    ds = custom(imgs, tmp_path / "gt.json")
    assert [it.count for it in ds] == [3, 0]
    np.testing.assert_array_equal(ds[0].points, [[1, 2], [3, 4], [5, 6]])
    (tmp_path / "gt.json").write_text(json.dumps({"p.jpg": [], "q.jpg": [], "zzz.jpg": [[1, 1]]}))
    with pytest.raises(ValueError, match="zzz.jpg"):
        custom(imgs, tmp_path / "gt.json")


@pytest.mark.offline
def test_custom_via_registry_and_missing_annotation(tmp_path):
    _image(tmp_path / "train/x.jpg")
    (tmp_path / "train/x.json").write_text(json.dumps({"points": [[1, 1]]}))
    ds = load_dataset("custom", tmp_path, "train")
    assert (ds.name, ds.split, ds.total_count) == ("custom", "train", 1)
    _image(tmp_path / "train/y.jpg")
    with pytest.raises(FileNotFoundError, match="y.jpg"):
        custom(tmp_path / "train")


# ----------------------------------------------------------------------------- API details


@pytest.mark.offline
def test_load_dataset_rejects_unknown_names_and_splits(tmp_path):
    assert set(DATASETS) >= {"sha", "shb", "mall", "ucf_qnrf", "jhu", "nwpu", "custom"}
    with pytest.raises(ValueError, match="valid names.*shb"):
        load_dataset("shc", tmp_path, "train")
    with pytest.raises(ValueError, match="valid splits.*train.*test"):
        load_dataset("shb", tmp_path, "val")


@pytest.mark.offline
def test_annotated_image_and_dataset_slicing(tmp_path):
    a = AnnotatedImage(tmp_path / "a.jpg", np.zeros((0,)), None)
    assert a.points.shape == (0, 2) and a.count == 0
    with pytest.raises(ValueError):
        AnnotatedImage(tmp_path / "a.jpg", np.zeros((3, 3)))
    items = [AnnotatedImage(tmp_path / f"{i}.jpg", np.ones((i, 2))) for i in range(5)]
    ds = CrowdDataset("toy", "train", items)
    sub = ds[1:3]
    assert isinstance(sub, CrowdDataset) and (sub.name, sub.split) == ("toy", "train")
    assert [it.count for it in sub] == [1, 2] and ds.total_count == 10 and ds[-1] is items[-1]


# ----------------------------------------------------------------------------- train/val split


def test_train_val_split(sht):
    train = sht["B", "train"]
    tr, va = train_val_split(train, 0.1, seed=0)
    tr2, va2 = train_val_split(train, 0.1, seed=0)
    _, va3 = train_val_split(train, 0.1, seed=1)
    names = lambda d: [it.image.name for it in d]  # noqa: E731
    assert (len(tr), len(va)) == (360, 40) and va.split == "val"
    assert names(va) == names(va2) and names(tr) == names(tr2)
    assert names(va) != names(va3)
    assert not set(names(tr)) & set(names(va))
    assert sorted(names(tr) + names(va)) == sorted(names(train))
    assert tr.total_count + va.total_count == 49_280
    with pytest.raises(ValueError, match="test"):
        train_val_split(sht["B", "test"])


def test_dataset_root_comes_from_the_caller_or_deepcount_data(monkeypatch, data_root, tmp_path):
    from deepcount.datasets import DataNotFoundError, dataset_root, load_dataset

    monkeypatch.setenv("DEEPCOUNT_DATA", str(data_root))
    assert dataset_root("shb") == data_root / "ShanghaiTech"
    assert len(load_dataset("mall", None, "test")) == 1200
    monkeypatch.delenv("DEEPCOUNT_DATA")
    assert dataset_root("shb", data_root / "ShanghaiTech") == data_root / "ShanghaiTech"
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_root)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")  # the library guesses no location, even one that exists
    with pytest.raises(DataNotFoundError, match=r"where is dataset 'shb'\? .*set DEEPCOUNT_DATA .*ShanghaiTech/"):
        load_dataset("shb", None, "test")
    monkeypatch.setenv("DEEPCOUNT_DATA", str(data_root / "nowhere"))
    with pytest.raises(DataNotFoundError, match="nowhere"):
        dataset_root("mall")
