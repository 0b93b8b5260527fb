"""`deepcount report`: evaluation JSONs laid out as the paper's Tables 2, 3, 4, 7, 8 and 9."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcount.cli import main
from deepcount.datasets import CrowdDataset, shanghaitech
from deepcount.evaluation import evaluate
from deepcount.model import DeepCount
from deepcount.report import PAPER_TABLE7_FLOPS, branch_flops, load_runs, paired_difference, report

BRANCHES = [1, 2, 3, 4, 5]
OFFICIAL_GT = {"name": "official", "sigma": 10.0, "kernel_size": 49, "keep_mass": False, "kernel": 49,
               "source": "weights' description: ground_truth"}


def evaluation_json(dataset: str, mae: float, *, name: str = "shb-paper", activation: str = "prelu",
                    branches=BRANCHES, model: str = "deepcount", recipe: str | None = "paper",
                    tiling: str = "pad", protocol: str = "points", ground_truth=None, images: int = 316,
                    evaluated: int | None = None, trained_on: str | None = None, seed: int | None = None,
                    steps: int | None = None) -> dict:
    """A minimal evaluation JSON as `deepcount evaluate` writes it; RMSE = 2 x MAE and
    branch k's MAE = MAE + k."""
    arch = ({"model": "deepcount", "width": 1.0, "activation": activation, "branches": list(branches)}
            if model == "deepcount" else {"model": "csrnet", "width": 1.0})
    metrics = {"count": {"mae": mae, "rmse": 2 * mae, "n": evaluated or images}}
    if model == "deepcount":
        metrics.update({f"branch{k}": {"mae": mae + k, "rmse": 2 * (mae + k), "n": evaluated or images}
                        for k in branches})
    config = {"seed": seed, "trainer": {"max_steps": steps}} if seed is not None or steps is not None else None
    return {"format": "deepcount-evaluation", "format_version": 1, "deepcount_version": "0.1.0",
            "timestamp": "2025-01-01T00:00:00+00:00",
            "model": {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "architecture": arch,
                      "dataset": trained_on or dataset, "recipe": recipe, "tiling": tiling,
                      **({"config": config} if config else {})},
            "dataset": {"name": dataset, "split": "test", "root": None, "images": images,
                        "evaluated": evaluated or images},
            "tiling": tiling, "protocol": protocol, "ground_truth": ground_truth, "metrics": metrics}


RUNS = {
    "01_shb.json": evaluation_json("shb", 7.31),
    "02_sha.json": evaluation_json("sha", 66.4, name="sha-paper", images=182),
    "03_shb_official.json": evaluation_json("shb", 8.12, name="shb-official", activation="leaky_relu",
                                            recipe="official", tiling="grid", protocol="blurred",
                                            ground_truth=OFFICIAL_GT),
    "04_shb_relu.json": evaluation_json("shb", 9.05, name="shb-relu", activation="relu"),
    "05_shb_no1.json": evaluation_json("shb", 7.77, name="shb-no1", branches=[2, 3, 4, 5]),
    "06_shb_no12345.json": evaluation_json("shb", 9.99, name="shb-none", branches=[]),
    "07_shb_csrnet.json": evaluation_json("shb", 10.2, name="csrnet-baseline", model="csrnet",
                                          recipe="CSRNet-pytorch"),
    "08_mall.json": evaluation_json("mall", 1.91, name="mall-paper", images=1200),
    "09_shb_grid.json": evaluation_json("shb", 7.45, tiling="grid"),  # the weights of 01, grid tiling
    "10_shb_no3.json": evaluation_json("shb", 8.5, name="shb-no3", branches=[1, 2, 4, 5]),
    "11_shb_smoke.json": evaluation_json("shb", 40.0, name="smoke", evaluated=2),
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    for name, data in RUNS.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "sidecar.json").write_text(json.dumps({"architecture": {"model": "deepcount"}}))  # skipped
    return tmp_path


def table(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under heading ``## <title>...``: first cell -> the others."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.offline
def test_report_places_every_run(run_dir):
    runs, problems = load_runs([run_dir])
    assert problems == [] and len(runs) == len(RUNS)  # the sidecar is not a run
    index = {r.path.name: r.index for r in runs}
    text = report(runs)

    t2 = table(text, "Table 2")
    assert t2["DeepCount (ours) (paper)"] == ["65.2", "112.5", "7.2", "11.3"]
    assert t2["DecideNet [23] (paper)"] == ["—", "—", "20.75", "29.42"]
    assert t2["Switching CNN [5] (paper)"] == ["90.4", "135.0", "21.6", "33.4"]  # as printed
    paper_pad = "DeepCount, this repo: recipe paper, tiling pad, truth points"
    assert t2[paper_pad] == [f"66.40 [{index['02_sha.json']}]", f"132.80 [{index['02_sha.json']}]",
                             f"7.31 [{index['01_shb.json']}]", f"14.62 [{index['01_shb.json']}]"]
    official = ("DeepCount, this repo: recipe official, tiling grid, truth blurred (official sigma 10, "
                "49x49, mass lost), activation leaky_relu")
    assert t2[official] == ["—", "—", f"8.12 [{index['03_shb_official.json']}]",
                            f"16.24 [{index['03_shb_official.json']}]"]
    assert t2["DeepCount, this repo: recipe paper, tiling grid, truth points"][2:] == [
        f"7.45 [{index['09_shb_grid.json']}]", f"14.90 [{index['09_shb_grid.json']}]"]
    assert "DeepCount, this repo: recipe paper, tiling pad, truth points, 2 of 316 images" in t2
    assert t2["CSRNet, this repo: recipe CSRNet-pytorch, tiling pad, truth points"][2] == \
        f"10.20 [{index['07_shb_csrnet.json']}]"
    labels = list(t2)  # ours right after the paper's row of the same model
    assert labels.index("CSRNet, this repo: recipe CSRNet-pytorch, tiling pad, truth points") == \
        labels.index("CSRNet [16] (paper)") + 1
    assert labels.index(paper_pad) > labels.index("DeepCount (ours) (paper)")
    assert not any("relu" in k and "leaky" not in k for k in t2)  # ablations stay out of Table 2

    t3 = table(text, "Table 3")
    assert t3["DeepCount (ours) (paper)"] == ["95.7", "167.1"] and len(t3) == 9  # header + 8 paper rows
    t4 = table(text, "Table 4")
    assert t4["DeepCount, this repo: recipe paper, tiling pad, truth points"] == [
        f"1.91 [{index['08_mall.json']}]", f"3.82 [{index['08_mall.json']}]"]

    t7 = table(text, "Table 7")
    assert t7["Shanghai Tech Part B (paper)"] == ["9.7", "8.9", "8.0", "7.4", "7.2", "7.2"]
    i = index["01_shb.json"]
    assert t7[f"Shanghai Tech Part B, this repo: {paper_pad[len('DeepCount, this repo: '):]}"] == [
        f"{7.31 + k:.2f} / {2 * (7.31 + k):.2f} [{i}]" for k in BRANCHES] + [f"7.31 / 14.62 [{i}]"]
    assert t7["UCF-QNRF (paper)"][0] == "193.3"
    assert t7["Million FLOPs (paper)"] == ["6034", "2152", "541", "138", "38", "-"]
    assert t7["Million FLOPs, eq. 7 on this repo's Table 1"] == ["8596", "2152", "541", "138", "38", "-"]

    t8 = table(text, "Table 8")
    header = t8["Activation"]
    col = header.index("this repo: recipe paper, tiling pad, truth points")
    assert t8["ReLU"][0] == "8.8" and t8["ReLU"][col] == f"9.05 [{index['04_shb_relu.json']}]"
    assert t8["PReLU"][0] == "7.2" and t8["PReLU"][col] == f"7.31 [{index['01_shb.json']}]"
    off = header.index("this repo: recipe official, tiling grid, truth blurred (official sigma 10, 49x49, mass lost)")
    assert t8["leaky ReLU (authors' code)"][0] == "—"
    assert t8["leaky ReLU (authors' code)"][off] == f"8.12 [{index['03_shb_official.json']}]"
    assert t8["ReLU"][off] == "—"

    t9 = table(text, "Table 9")
    col = t9["Ablation"].index("this repo: recipe paper, tiling pad, truth points")
    assert t9["No ablation"][:1] == ["7.2"] and t9["No ablation"][col] == f"7.31 [{index['01_shb.json']}]"
    assert t9["Branch 1 detached"] == ["7.4", *t9["Branch 1 detached"][1:]]
    assert t9["Branch 1 detached"][col] == f"7.77 [{index['05_shb_no1.json']}]"
    assert t9["Branches 1-2 detached"][col] == "—"
    assert t9["Branches 1-5 detached"][0] == "9.1"
    assert t9["Branches 1-5 detached"][col] == f"9.99 [{index['06_shb_no12345.json']}]"
    other = t9["Branches 3 detached (not in the paper)"]
    assert other[0] == "—" and other[col] == f"8.50 [{index['10_shb_no3.json']}]"

    side = table(text, "Evaluation settings side by side")  # the weights of runs 1 and 9
    (row,) = [v for k, v in side.items() if k.startswith("shb-paper")]
    assert f"7.31 / 14.62 [{index['01_shb.json']}]" in row and f"7.45 / 14.90 [{index['09_shb_grid.json']}]" in row

    run_list = text.split("## Runs", 1)[1]
    assert f"{index['03_shb_official.json']}. `{run_dir / '03_shb_official.json'}`: shb-official" in run_list
    assert "leaky_relu, branches 1,2,3,4,5" in run_list


@pytest.mark.offline
def test_runs_that_differ_only_by_seed_share_a_cell_with_their_spread(tmp_path):
    runs = {"a.json": evaluation_json("shb", 7.0, name="base-s0", recipe="cpu", seed=0, steps=700),
            "b.json": evaluation_json("shb", 8.0, name="base-s1", recipe="cpu", seed=1, steps=700),
            "c.json": evaluation_json("shb", 9.0, name="none-s0", recipe="cpu", seed=0, steps=700, branches=[]),
            "d.json": evaluation_json("shb", 10.5, name="none-s1", recipe="cpu", seed=1, steps=700, branches=[]),
            # the same seed again (other weights): not a seed of the same cell, a column of its own
            "e.json": evaluation_json("shb", 6.0, name="base-again", recipe="cpu", seed=0, steps=700),
            # another length of training: another column
            "f.json": evaluation_json("shb", 5.0, name="long", recipe="cpu", seed=0, steps=1400)}
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))
    loaded, _ = load_runs([tmp_path])
    text = report(loaded)
    t9 = table(text, "Table 9")
    header = t9["Ablation"]
    assert header[1:] == ["this repo: recipe cpu (700 steps), tiling pad, truth points",
                          "this repo: recipe cpu (700 steps), tiling pad, truth points (#2)",
                          "this repo: recipe cpu (1400 steps), tiling pad, truth points"]
    assert t9["No ablation"][1:] == ["7.50 (mean of seeds 0, 1: 7.00-8.00) [1, 2]", "6.00 [5]", "5.00 [6]"]
    assert t9["Branches 1-5 detached"][1:] == ["9.75 (mean of seeds 0, 1: 9.00-10.50) [3, 4]", "—", "—"]
    # Table 7: the seeds' mean MAE / RMSE per output, the spread of the MAE
    t7 = table(text, "Table 7")
    row = t7["Shanghai Tech Part B, this repo: recipe cpu (700 steps), tiling pad, truth points"]
    assert row[-1] == "7.50 / 15.00 (mean of seeds 0, 1: 7.00-8.00) [1, 2]"
    assert row[0] == "8.50 / 17.00 (mean of seeds 0, 1: 8.00-9.00) [1, 2]"  # branch 1: MAE + 1
    assert "base-s1 (sha256" in text and ", seed 1;" in text


@pytest.mark.offline
def test_variants_are_paired_with_the_baseline_image_by_image(tmp_path):
    images = [f"IMG_{i}.jpg" for i in range(1, 51)]
    truth = np.arange(50.0, 100.0)

    def run(name: str, errors: np.ndarray, seed: int, **kw) -> dict:
        data = evaluation_json("shb", float(np.abs(errors).mean()), name=name, recipe="cpu", seed=seed, steps=700,
                               images=50, **kw)
        data["per_image"] = {"image": images, "truth": truth.tolist(), "count": (truth + errors).tolist()}
        return data

    ones = np.ones(50)
    runs = {"a.json": run("base-s0", 2 * ones, 0), "b.json": run("base-s1", -4 * ones, 1),  # |e| 2 and 4: mean 3
            "c.json": run("none-s0", 5 * ones, 0, branches=[]),  # |e| 5: 2 worse on every image
            "d.json": run("relu-s0", np.where(np.arange(50) < 25, 1.0, 5.0), 0, activation="relu"),
            "e.json": run("long", ones, 0, branches=[]) | {"dataset": {"name": "shb", "split": "test",
                                                                       "images": 50, "evaluated": 50}}}
    runs["e.json"]["model"]["config"]["trainer"]["max_steps"] = 1400  # another recipe: not paired
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))
    text = report(load_runs([tmp_path])[0])
    rows = table(text, "Variants against the baseline")
    assert rows["Run"] == ["Images", "MAE minus the baseline's", "95% interval", "[n]"]
    assert rows["baseline: recipe cpu (700 steps), tiling pad, truth points"] == ["50", "0", "-", "[1] [2]"]
    assert rows["PReLU, all branches: seed 1 against seed 0 (the yardstick)"] == ["50", "+2.00", "+2.00 to +2.00", ""]
    assert rows["Branches 1-5 detached, seed 0"] == ["50", "+2.00", "+2.00 to +2.00", "[3]"]
    relu = rows["ReLU, no ablation, seed 0"]  # 2 better on half the images, 2 worse on the other half
    low, high = (float(x) for x in relu[2].split(" to "))
    assert relu[:2] == ["50", "+0.00"] and -1.0 < low < 0 < high < 1.0
    assert len(rows) == 5  # the 1,400-step run has no baseline of its own
    # the interval is the bootstrap's: on normal differences it is the mean +- 1.96 standard errors
    diff = np.random.default_rng(1).normal(1.0, 1.0, 400)
    mean, low, high = paired_difference(diff, np.zeros(400))
    half = 1.96 * diff.std() / np.sqrt(400)
    assert mean == pytest.approx(diff.mean()) and low == pytest.approx(mean - half, abs=0.02)
    assert high == pytest.approx(mean + half, abs=0.02)
    with pytest.raises(ValueError, match="same non-empty"):
        paired_difference([], [])


@pytest.mark.offline
def test_report_with_no_runs_of_a_table_leaves_dashes(run_dir):
    runs, _ = load_runs([run_dir / "08_mall.json"])
    text = report(runs)
    assert all(v[-1] == "—" for k, v in table(text, "Table 2").items() if "this repo" in k)
    assert not any("this repo" in k for k in table(text, "Table 2"))
    t8 = table(text, "Table 8")
    assert t8["Activation"] == ["SHT Part B MAE (paper)"] and t8["ReLU"] == ["8.8"]
    assert "Evaluation settings side by side" not in text


@pytest.mark.offline
def test_branch_flops_follow_eq_7():
    flops = branch_flops()
    # Table 7 prints branches 2-5 as these (rounded); branch 1 is Table 5's own sum, 8596.
    assert [round(flops[k]) for k in (2, 3, 4, 5)] == [int(v) for v in PAPER_TABLE7_FLOPS[1:]]
    assert round(flops[1]) == 37 + 101 + 403 + 1611 + 6442 + 2
    small = branch_flops({"width": 0.5})
    assert small[5] == pytest.approx(flops[5] / 4, rel=0.01)


def test_real_evaluation_goes_into_the_report(shb_root, tmp_path):
    torch.manual_seed(0)
    items = CrowdDataset("shanghaitech_B", "test", [shanghaitech(shb_root, "B", "test")[0]])
    result = evaluate(DeepCount(width=0.125, branches=[3, 4, 5]), items, device="cpu", progress=False,
                      info={"name": "tiny", "recipe": "paper"})
    result.write(tmp_path / "tiny")
    runs, _ = load_runs([tmp_path])
    text = report(runs)
    t9 = table(text, "Table 9")
    col = t9["Ablation"].index("this repo: recipe paper, tiling pad, truth points, width 0.125")
    assert t9["Branches 1-2 detached"][col] == f"{result.metrics['count']['mae']:.2f} [1]"


@pytest.mark.offline
def test_cli_report(run_dir, tmp_path, capsys):
    out = tmp_path / "out" / "report.md"
    assert main(["report", str(run_dir / "01_shb.json"), str(run_dir / "02_sha.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == out.read_text() and "## Table 9" in printed.out and "2 runs" in printed.err
    assert main(["report", str(run_dir / "sidecar.json")]) == 2
    assert "not a deepcount evaluation" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
