"""Evaluation (eq. 5-6): exact MAE/RMSE of models with known outputs on real ShanghaiTech
images, in both tilings and both ground-truth protocols; the `deepcount evaluate` command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from deepcount.cli import main
from deepcount.datasets import CrowdDataset, shanghaitech
from deepcount.evaluation import (Evaluation, blurred_count, evaluate, load_evaluation, metrics,
                                  resolve_ground_truth, training_ground_truth)
from deepcount.images import image_size
from deepcount.model import MAP_SIZES, MAP_STRIDES, CSRNet, DeepCount, architecture
from deepcount.predict import Counter
from deepcount.targets import OFFICIAL, PAPER, GroundTruthConfig, density_map
from deepcount.weights import sha256_file

TILE_PIXELS = 384 * 512
# Part A test images of varied sizes: 704x1024 (pad 2x2, grid 2x2), 427x640 (pad 2x2, grid 1x1),
# 334x500 (one tile, mostly image), 200x300 (one tile, mostly padding), 350x860 (pad and grid
# 1x2), 611x400 (2x1), 369x553 grey (pad 1x2, grid 1x1).
SHA_INDICES = (0, 2, 3, 33, 58, 114, 52)
MAP_VALUE = {1: 0.5, 2: 0.25, 3: 2.0, 4: 4.0, 5: 8.0}  # per cell, exact in float32
COUNT_PER_TILE = 100.0


class KnownDeepCount(DeepCount):
    """A DeepCount whose outputs are known functions of its input: the backbone count of a tile
    is 100 x the fraction of its pixels that are image (a normalised pixel is never exactly 0
    in all channels, padding always is); branch k's map is MAP_VALUE[k] in every cell.  Calls
    are recorded."""

    def __init__(self):
        super().__init__(width=0.125)
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []

    def _count(self, x):
        return COUNT_PER_TILE * (x != 0).any(1).float().mean((1, 2))

    def forward(self, x):
        self.calls.append(("forward", x.shape[0], ()))
        return self._count(x)

    def forward_maps(self, x, branches=None):
        wanted = self.attached if branches is None else tuple(branches)
        self.calls.append(("forward_maps", x.shape[0], tuple(wanted)))
        return self._count(x), {k: torch.full((x.shape[0], 1, *MAP_SIZES[k]), MAP_VALUE[k]) for k in wanted}


class KnownCSRNet(CSRNet):
    """A CSRNet whose density map is 0.5 in every cell."""

    def __init__(self):
        super().__init__(width=0.125)

    def density(self, x):
        return torch.full((x.shape[0], 1, 48, 64), 0.5)


@pytest.fixture(scope="module")
def sha_items(shb_root):
    ds = shanghaitech(shb_root, "A", "test")
    return CrowdDataset(ds.name, "test", [ds[i] for i in SHA_INDICES])


def _tiles(h: int, w: int, mode: str) -> tuple[int, int]:
    if mode == "pad":
        return math.ceil(h / 384), math.ceil(w / 512)
    return max(1, round(h / 384)), max(1, round(w / 512))


def _expected(h: int, w: int, mode: str) -> dict[str, float]:
    """The known model's outputs for an image, computed from the image size alone."""
    rows, cols = _tiles(h, w, mode)
    out = {"count": COUNT_PER_TILE * (h * w / TILE_PIXELS if mode == "pad" else rows * cols)}
    for k, (mh, mw) in MAP_SIZES.items():
        s = MAP_STRIDES[k]
        cells = math.ceil(h / s) * math.ceil(w / s) if mode == "pad" else rows * cols * mh * mw
        out[f"branch{k}"] = MAP_VALUE[k] * cells
    return out


def _mae_rmse(pred, truth):
    e = np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.abs(e).mean()), float(np.sqrt((e ** 2).mean()))


@pytest.mark.offline
def test_metrics_are_eq_5_and_6():
    m = metrics([3.0, 10.0, 7.5, 0.0], [1, 10, 10, 2])
    assert m == {"mae": (2 + 0 + 2.5 + 2) / 4, "rmse": math.sqrt((4 + 0 + 6.25 + 4) / 4), "n": 4}
    assert metrics([5], [5]) == {"mae": 0.0, "rmse": 0.0, "n": 1}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics([1, 2], [1])
    with pytest.raises(ValueError, match="no images"):
        metrics([], [])


@pytest.mark.parametrize("tiling", ["pad", "grid"])
def test_known_deepcount_gives_exactly_the_expected_errors(sha_items, tiling):
    model = KnownDeepCount()
    result = evaluate(model, sha_items, tiling=tiling, batch_size=3, device="cpu", progress=False)
    assert result.dataset == "sha" and result.protocol == "points" and result.ground_truth is None
    assert list(result.outputs) == ["count", *(f"branch{k}" for k in range(1, 6))]
    sizes = [image_size(it.image) for it in sha_items]
    truth = [it.count for it in sha_items]
    for row, (h, w), item in zip(result.rows, sizes, sha_items):
        assert (row.height, row.width, row.truth, row.annotations) == (h, w, item.count, item.count)
        assert row.tiles == np.prod(_tiles(h, w, tiling))
        expected = _expected(h, w, tiling)
        assert row.outputs["count"] == pytest.approx(expected["count"], rel=1e-6)
        for k in range(1, 6):  # padding-only cells left out (pad); sums of powers of two: exact
            assert row.outputs[f"branch{k}"] == expected[f"branch{k}"]
    for key in result.outputs:
        mae, rmse = _mae_rmse([_expected(h, w, tiling)[key] for h, w in sizes], truth)
        got = result.metrics[key]
        assert got["n"] == len(sha_items)
        assert got["mae"] == pytest.approx(mae, rel=1e-9 if key != "count" else 1e-6)
        assert got["rmse"] == pytest.approx(rmse, rel=1e-9 if key != "count" else 1e-6)
    # One forward_maps per batch of tiles, every branch in it; never a pass per branch.
    batches = sum(math.ceil(r.tiles / 3) for r in result.rows)
    assert model.calls == [c for c in model.calls if c[0] == "forward_maps" and c[2] == (1, 2, 3, 4, 5)]
    assert len(model.calls) == batches


def test_branch_subset_and_backbone_only(sha_items):
    model = KnownDeepCount()
    result = evaluate(model, sha_items, tiling="pad", branches=[5, 1], device="cpu", progress=False, limit=2)
    assert list(result.outputs) == ["count", "branch1", "branch5"] and len(result.rows) == 2
    assert {c[2] for c in model.calls} == {(1, 5)}
    model = KnownDeepCount()
    result = evaluate(model, sha_items, branches=(), device="cpu", progress=False, limit=1)
    assert list(result.outputs) == ["count"] and {c[0] for c in model.calls} == {"forward"}
    with pytest.raises(ValueError, match="not attached"):
        evaluate(DeepCount(width=0.125, branches=[2]), sha_items, branches=[1], device="cpu", progress=False)


@pytest.mark.parametrize("tiling", ["pad", "grid"])
def test_known_csrnet_counts_by_its_map_without_padding_cells(sha_items, tiling):
    result = evaluate(KnownCSRNet(), sha_items, tiling=tiling, device="cpu", progress=False)
    assert list(result.outputs) == ["count"]
    sizes = [image_size(it.image) for it in sha_items]
    expected = [0.5 * (math.ceil(h / 8) * math.ceil(w / 8) if tiling == "pad" else
                       np.prod(_tiles(h, w, tiling)) * 48 * 64) for h, w in sizes]
    assert [r.outputs["count"] for r in result.rows] == expected
    mae, rmse = _mae_rmse(expected, [it.count for it in sha_items])
    assert result.metrics["count"]["mae"] == pytest.approx(mae, rel=1e-12)
    assert result.metrics["count"]["rmse"] == pytest.approx(rmse, rel=1e-12)


@pytest.mark.parametrize("tiling", ["pad", "grid"])
def test_blurred_protocol_truth_is_the_blurred_maps_sum(sha_items, tiling):
    model = KnownDeepCount()
    items = CrowdDataset("shanghaitech_A", "test", list(sha_items)[:4])  # its former name: read as sha
    result = evaluate(model, items, tiling=tiling, protocol="blurred", ground_truth=OFFICIAL,
                      branches=(), device="cpu", progress=False)
    assert result.ground_truth == OFFICIAL
    truths = []
    for row, item in zip(result.rows, items):
        full = density_map(item.points, row.height, row.width, OFFICIAL)  # the whole H x W map
        assert row.truth == pytest.approx(float(full.sum(dtype=np.float64)), rel=1e-5)
        assert row.annotations == item.count
        truths.append(row.truth)
    # sigma 10 cut at the border loses mass in these crowded photos: not the number of points.
    assert all(t < it.count for t, it in zip(truths, items))
    assert sum(it.count for it in items) - sum(truths) > 5
    mae, rmse = _mae_rmse([r.outputs["count"] for r in result.rows], truths)
    assert result.metrics["count"]["mae"] == pytest.approx(mae, rel=1e-12)
    assert result.metrics["count"]["rmse"] == pytest.approx(rmse, rel=1e-12)
    # paper ground truth keeps every head's mass inside the image: blurred == points
    paper = evaluate(model, items, tiling=tiling, protocol="blurred", ground_truth="paper",
                     branches=(), device="cpu", progress=False)
    assert [r.truth for r in paper.rows] == pytest.approx([it.count for it in items], rel=1e-9)


def test_blurred_count_matches_the_dense_map_for_custom_settings(sha_items):
    item = sha_items[3]  # 200x300: many heads near the border
    h, w = image_size(item.image)
    for cfg in (GroundTruthConfig(sigma=3.0, keep_mass=False), GroundTruthConfig(sigma=15.0, kernel_size=21,
                                                                                 keep_mass=False), PAPER):
        dense = float(density_map(item.points, h, w, cfg).sum(dtype=np.float64))
        assert blurred_count(item.points, h, w, cfg) == pytest.approx(dense, rel=1e-5)


@pytest.mark.offline
def test_default_ground_truth_for_blurred():
    cfg, source = resolve_ground_truth({})
    assert cfg == OFFICIAL and "authors' code" in source
    sidecar = {"ground_truth": {"sigma": 5.0, "kernel_size": None, "keep_mass": True}}
    assert training_ground_truth(sidecar)[0] == PAPER
    assert resolve_ground_truth(sidecar)[0] == PAPER
    assert resolve_ground_truth({"recipe": "official"})[0] == OFFICIAL
    nested = {"config": {"data": {"ground_truth": {"sigma": 7, "keep_mass": False}}}}
    assert resolve_ground_truth(nested)[0] == GroundTruthConfig(sigma=7.0, keep_mass=False)
    assert resolve_ground_truth(sidecar, "official")[0] == OFFICIAL  # an explicit choice wins
    cfg, source = resolve_ground_truth(sidecar, "official", sigma=4.0)
    assert cfg == GroundTruthConfig(sigma=4.0, kernel_size=None, keep_mass=False) and "sigma=4.0" in source
    with pytest.raises(ValueError, match="applies to protocol .blurred. only"):
        evaluate(KnownCSRNet(), [], protocol="points", ground_truth=OFFICIAL)


@pytest.mark.parametrize("tiling", ["pad", "grid"])
def test_real_model_agrees_with_counter(sha_items, tiling):
    """The evaluation's count and branch sums are what Counter reports for the same image."""
    torch.manual_seed(0)
    model = DeepCount(width=0.125).eval()
    items = CrowdDataset("shanghaitech_A", "test", [sha_items[6]])  # 369x553 grey: pad 1x2, grid 1x1
    result = evaluate(model, items, tiling=tiling, batch_size=2, device="cpu", progress=False)
    counter = Counter(model, {"name": "small"}, torch.device("cpu"), tiling=tiling, batch_size=2)
    for row, item in zip(result.rows, items):
        assert row.outputs["count"] == pytest.approx(counter.count(item.image).count, rel=1e-6)
        for k in range(1, 6):
            dmap = counter.count(item.image, density=k).density
            assert row.outputs[f"branch{k}"] == pytest.approx(dmap.count, rel=1e-5, abs=1e-4)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A width-0.125 DeepCount as `deepcount train` leaves it: weights and a sidecar."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    model = DeepCount(width=0.125)
    path = folder / "small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "architecture": architecture(model), "dataset": "shb", "recipe": "paper", "tiling": "pad",
        "ground_truth": {"sigma": 5.0, "kernel_size": None, "keep_mass": True}}))
    return path


def test_cli_evaluate_writes_json_markdown_and_csv(small_weights, shb_root, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(small_weights), "--dataset", "shb", "--split", "test",
               "--root", str(shb_root), "--limit", "2", "--batch-size", "4", "--device", "cpu",
               "--out", str(out), "-q"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "tiling pad" in printed and "backbone count" in printed and "branch 5" in printed
    data = load_evaluation(out / "evaluation.json")
    assert data["model"]["sha256"] == sha256_file(small_weights)
    assert data["model"]["architecture"]["width"] == 0.125 and data["model"]["recipe"] == "paper"
    assert data["dataset"] == {"name": "shb", "split": "test", "root": str(shb_root), "images": 316, "evaluated": 2}
    assert (data["tiling"], data["protocol"], data["ground_truth"]) == ("pad", "points", None)
    assert set(data["metrics"]) == {"count", "branch1", "branch2", "branch3", "branch4", "branch5"}
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["part_B_final/test_data/images/IMG_1.jpg",
                                          "part_B_final/test_data/images/IMG_2.jpg"]
    assert [int(r["tiles"]) for r in rows] == [4, 4]
    for key, m in data["metrics"].items():  # the JSON's metrics are those of the CSV's rows (to 1e-4)
        expected = metrics([float(r[key]) for r in rows], [float(r["truth"]) for r in rows])
        assert m == pytest.approx(expected, abs=1e-4)
        assert f"{m['mae']:.2f}" in printed
    md = (out / "evaluation.md").read_text()
    assert "tiling pad" in md and "truth points" in md and "recipe paper" in md and "| backbone count |" in md


def test_cli_blurred_grid_takes_the_training_ground_truth(small_weights, shb_root, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(small_weights), "--root", str(shb_root), "--limit", "1",
               "--tiling", "grid", "--protocol", "blurred", "--branches", "none", "--device", "cpu",
               "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "evaluation.json").read_text())
    assert data["tiling"] == "grid" and data["protocol"] == "blurred"
    assert data["ground_truth"]["name"] == "paper" and "weights" in data["ground_truth"]["source"]
    assert list(data["metrics"]) == ["count"]
    assert data["images"][0]["truth"] == pytest.approx(data["images"][0]["annotations"])


@pytest.mark.parametrize("args,message", [
    (["--sigma", "5"], "only apply to --protocol blurred"),
    (["--protocol", "blurred", "--kernel-size", "4"], "kernel_size must be a positive odd number"),
    (["--dataset", "mall", "--root", "/nonexistent/mall"], "cannot load dataset mall"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "asked for"),
])
def test_cli_evaluate_errors(small_weights, tmp_path, capsys, args, message):
    rc = main(["evaluate", "--weights", str(small_weights), "--out", str(tmp_path / "x"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "evaluation.json").exists()


@pytest.mark.offline
def test_cli_evaluate_missing_weights(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "none.safetensors")]) == 2
    assert "cannot load weights" in capsys.readouterr().err


def test_evaluation_json_round_trip(sha_items, tmp_path):
    result = evaluate(KnownDeepCount(), sha_items, limit=2, device="cpu", progress=False,
                      info={"name": "known", "recipe": "official"}, protocol="blurred")
    assert isinstance(result, Evaluation)
    assert result.ground_truth == OFFICIAL and "recipe" in result.ground_truth_source
    paths = result.write(tmp_path)
    assert [p.name for p in paths] == ["evaluation.json", "evaluation.md", "per_image.csv"]
    data = load_evaluation(paths[0])
    assert data["ground_truth"]["name"] == "official" and data["ground_truth"]["kernel"] == 49
    assert data["model"]["architecture"]["model"] == "deepcount"
    # one line per image, counts to 1e-4 of a person; the metrics are the unrounded rows'
    lines = paths[0].read_text().splitlines()
    assert sum(line.lstrip().startswith('{"image"') for line in lines) == 2
    for row, written in zip(result.rows, data["images"]):
        for key, value in row.outputs.items():
            assert written[key] == round(value, 4) and abs(written[key] - value) <= 5e-5
    assert data["metrics"] == result.metrics
    csv_rows = paths[2].read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[1].split(",")[-1] == repr(data["images"][0][list(result.outputs)[-1]])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a deepcount evaluation"):
        load_evaluation(tmp_path / "other.json")
