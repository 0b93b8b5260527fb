"""Every benchmark of bench/ runs once in its tiny "smoke" size, so none can rot; the checks are
on the JSON it writes (structure and sanity), never on timings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NO_GPU = "not measured: no GPU"


def bench(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--smoke", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|" in proc.stdout  # it printed a table
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["smoke"] is True
    assert data["command"].startswith(f"python bench/{name}.py")
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["logical_cpus"] >= 1
    assert "loadavg_start" in data and "loadavg_end" in data
    return data


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_flops_match_the_per_layer_sums_and_the_paper(tmp_path):
    d = bench("flops", tmp_path)
    t = d["totals"]
    assert all(t["layer_sums_match"].values()), t["layer_sums_match"]
    assert t["csrnet_over_backbone"] == pytest.approx(1.337, abs=0.005)  # the FLOPs bound on the speed-up
    assert t["frontend_flops"] / 2 == pytest.approx(54.7e9, rel=0.01)
    five = d["table5"]
    for key, col in five.items():
        assert col["rows_match_paper"], key
        assert col["flops"] == sum(r["flops"] for r in col["rows"])
        for r in col["rows"]:
            assert r["macs"] == r["flops"] / 2
    # torch's multiply-adds equal the paper's numbers for ordinary convolutions ...
    assert five["csrnet_backend"]["macs"] / 1e6 == pytest.approx(five["csrnet_backend"]["paper_mmacs"], rel=0.001)
    assert five["deepcount_backbone"]["macs"] / 1e6 == pytest.approx(five["deepcount_backbone"]["paper_mmacs"], rel=0.001)
    # ... while the paper's eq. 7 counts a stride-2 transposed convolution 4x (output size x all taps)
    b1 = five["deepcount_branch1"]
    assert b1["eq7_macs"] / 1e6 == pytest.approx(b1["paper_mmacs"], rel=0.001)
    for r in b1["rows"][1:5]:
        assert r["eq7_macs"] == 4 * r["macs"]
    # Table 7: branches 2-5 are eq. 7 sums; branch 1's 6,034 M is the backbone column's sum
    t7 = d["table7"]
    for k in ("2", "3", "4", "5"):
        assert t7[k]["eq7_macs"] / 1e6 == pytest.approx(t7[k]["paper_table7_mmacs"], rel=0.01)
    assert t7["1"]["paper_table7_mmacs"] == pytest.approx(five["deepcount_backbone"]["macs"] / 1e6, rel=0.001)
    assert d["params"]["deepcount_backbone"] == 21_407_553 and d["params"]["csrnet"] == 16_263_489


def test_throughput_smoke(tmp_path):
    d = bench("throughput", tmp_path)
    cpu = d["devices"]["cpu"]
    assert set(cpu["batches"]) == {"1", "2"}
    for b, res in cpu["batches"].items():
        engines = res["engines"]
        assert {"eager", "channels_last", "onnxruntime", "bf16"} <= set(engines)
        for name, e in engines.items():
            for label in ("deepcount_backbone", "csrnet", "deepcount_branch1"):
                assert positive(e[label]["per_s"]) and len(e[label]["seconds"]) == res["rounds"]
                tol = 0.05 if name == "bf16" else 1e-4  # relative to max(|count|, 1)
                assert e[label]["max_rel_count_err_vs_eager"] <= tol, (b, name, label)
            assert positive(e["ratio_deepcount_over_csrnet"]["median"])
            if name != "eager":
                assert positive(e["speedup_vs_eager"]["deepcount_backbone"]["median"])
        assert positive(res["summary"]["best_vs_best"]["median"])
        assert positive(res["summary"]["deepcount_best_vs_csrnet_eager"]["median"])
    if not torch.cuda.is_available():
        assert d["devices"]["cuda"] == NO_GPU


def test_roof_smoke(tmp_path):
    d = bench("roof", tmp_path)
    cpu = d["cpu"]
    assert positive(cpu["roof"]["float32"]["gflops"]) and positive(cpu["roof"]["bfloat16"]["gflops"])
    for key, r in cpu["networks"].items():
        assert positive(r["pct_of_roof"]) and positive(r["roof_crops_per_s"]), key
        assert r["achieved_gflops"] == pytest.approx(cpu["flops_per_crop"][r["network"]] * r["per_s"] / 1e9)
    if not torch.cuda.is_available():
        assert d["cuda"] == NO_GPU


def test_ground_truth_smoke(tmp_path):
    d = bench("ground_truth", tmp_path)
    assert d["images"] == 20 and d["heads"] > 0
    assert set(d["passes"]) == {"uncached", "cold", "cached", "before: uncached", "before: cold", "before: cached"}
    assert all(positive(p["median_s"]) for p in d["passes"].values())
    assert set(d["speedup_vs_before"]) == {"uncached", "cold", "cached"}


def test_train_step_smoke(tmp_path):
    d = bench("train_step", tmp_path)
    for b in ("1", "2"):
        res = d["batches"][b]
        for variant in ("nchw", "channels_last", "channels_last_retain"):
            assert positive(res[variant]["per_s"]) and math.isfinite(res[variant]["last_loss"])
            # the same network and crops (lr 1e-9): the layout changes only the order of additions
            assert res[variant]["last_loss"] == pytest.approx(res["nchw"]["last_loss"], rel=1e-4)
        assert set(res["speedup_vs_nchw"]) == {"channels_last", "channels_last_retain"}
        assert all(positive(r["median"]) for r in res["speedup_vs_nchw"].values())


def test_end_to_end_smoke(tmp_path):
    d = bench("end_to_end", tmp_path, "--batch-sizes", "1", "2")
    lat = d["latency_1024x768"]["deepcount"]
    assert lat["engine"] == "channels_last" and positive(lat["speedup"]["median"])
    assert lat["count_auto"] == pytest.approx(lat["count_eager"], rel=1e-4, abs=1e-4)
    big = d["big_image"]["runs"]["auto"]
    assert big["tiles"] == 4 and big["size"] == [600, 800]
    # the child's own peak (torch alone is > 100 MB), which counting can only raise
    assert 100 < big["peak_rss_mb_after_load"] <= big["peak_rss_mb"]
    folder = d["folder"]
    assert set(folder) == {"deepcount-default-engine", "deepcount-eager"}
    assert all(r["images"] == 2 and r["counted"] == 2 and r["failed"] == 0 and positive(r["wall_s"])
               and r["peak_rss_mb"] > 100 for r in folder.values())
    sweep = d["batch_sizes"]["batches"]
    assert set(sweep) == {"1", "2"} and all(b["tiles"] == 2 and positive(b["tiles_per_s_median"])
                                            and b["peak_rss_mb"] > 100 for b in sweep.values())


def test_end_to_end_versus_smoke(tmp_path):
    d = bench("end_to_end", tmp_path, "--skip-latency", "--skip-big", "--skip-folder", "--versus", "1",
              "--video", "2")
    v = d["versus"]
    assert v["deepcount"]["tiling"] == "features" and v["csrnet"]["inference"].startswith("whole image")
    assert set(v["sets"]) == {"shb", "sha", "mall"}
    for key, res in v["sets"].items():
        assert res["images"] == 1 and positive(res["ratio"]["median"]), key
        for name in ("deepcount", "csrnet"):
            assert positive(res[name]["images_per_s"]) and math.isfinite(res[name]["mae"]), (key, name)
    # the bundled DeepCount counts ShanghaiTech B test IMG_1 (23 annotated; the README's example) as
    # the README says it does
    said = re.search(r"on the example photo it prints ([0-9.]+) people", (REPO / "README.md").read_text())
    assert v["sets"]["shb"]["deepcount"]["mae"] == pytest.approx(abs(float(said.group(1)) - 23), abs=0.06)
    video = d["video"]
    from deepcount.weights import DEFAULT_MODEL, REGISTRY
    bundled = min(REGISTRY[DEFAULT_MODEL].architecture["branches"])  # the one branch the bundled file has
    assert video["frames"] == 2 and video["size"] == [480, 640] and video["density_branch"] == bundled
    assert all(positive(r["frames_per_s"]) for r in video["runs"].values())
    assert video["count_rel_diff"] < 1e-4  # asking for the map does not change the count


def test_bf16_counts_smoke(tmp_path):
    d = bench("bf16_counts", tmp_path)
    r = d["result"]
    from deepcount.weights import DEFAULT_MODEL

    assert r["images"] == 1 and r["model"] == DEFAULT_MODEL  # the bundled default model
    assert positive(r["total_fp32"]) and positive(r["total_bf16"])
    assert r["total_rel_diff"] < 0.05 and isinstance(r["within_target_total"], bool)
    if not torch.cuda.is_available():
        from deepcount.engines import native_bf16

        assert r["device"] == "cpu" and d["cuda"] == NO_GPU and r["bf16_native"] == native_bf16("cpu")


def test_int8_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    d = bench("int8", tmp_path)
    assert d["images"] == 1 and d["split"] == "val" and len(d["calibration_images"]) == 1
    r = d["results"]
    assert set(r) == {"fp32", "int8, count convs 2", "int8, count convs 4"}
    assert r["fp32"]["moved_mean_abs"] == 0.0 and r["fp32"]["speedup_vs_fp32"]["median"] == 1.0
    assert all(positive(v["seconds"]["median_s"]) and v["mae"] >= 0 for v in r.values())
    assert d["quantization"]["4"]["count_convs"] == "the first 4 of 11"


def test_cli_help_smoke_imports_neither_torch_nor_lightning(tmp_path):
    from deepcount.cli import COMMANDS

    r = bench("cli_help", tmp_path)["result"]
    assert set(r) == {"(none)", *COMMANDS}
    for command, row in r.items():
        assert row["imports"] == {"torch": False, "lightning": False}, command
        assert positive(row["median_s"]) and row["runs"] == 1


def test_frozen_frontend_smoke(tmp_path):
    d = bench("frozen_frontend", tmp_path)
    train = d["training"]
    for variant in ("whole", "frozen_conv4_3", "frozen_conv4_2", "frozen_pool3"):
        assert positive(train[variant]["per_s"]) and math.isfinite(train[variant]["last_loss"])
    # freezing less trains more parameters
    params = [train[v]["trained_parameters"] for v in ("frozen_conv4_3", "frozen_conv4_2", "frozen_pool3", "whole")]
    assert params == sorted(params) and len(set(params)) == 4
    assert all(positive(d["caching"][f"{lv}_{p}"]["median_s"]) for lv in ("conv4_3", "pool3") for p in ("bf16", "fp32"))
    inf = d["inference"]
    assert positive(inf["pad"]["per_s"]) and positive(inf["features"]["per_s"]) and inf["features"]["tiles"] >= 1


def test_phantom_counts_smoke(tmp_path):
    d = bench("phantom_counts", tmp_path)
    res = d["results"]["small untrained"]
    assert set(res) == {"pad", "grid", "features"}
    for tiling, pictures in res.items():
        assert pictures["grey strip 1x5000"]["tiles"] == 10 and pictures["grey 1x1"]["tiles"] == 1
        for r in pictures.values():  # counts are clamped at 0 per tile: never below the raw sum, never < 0
            assert r["count"] >= 0 and r["count"] >= r["unclamped"] - 1e-9


def test_region_counts_smoke(tmp_path):
    d = bench("region_counts", tmp_path)
    assert d["images"] == 2 and d["regions"] == 4
    assert set(d["mae"]) == {"map", "scaled"} and all(math.isfinite(v) and v >= 0 for v in d["mae"].values())


def test_accuracy_smoke_writes_each_evaluation_once_and_resumes(tmp_path):
    results = tmp_path / "results"
    d = bench("accuracy", tmp_path, "--results", str(results))
    (record,) = d["evaluations"]
    assert record["model"] == "csrnet-baseline" and record["dataset"] == "shb" and record["tiling"] == "pad"
    assert record["ran"] and record["metrics"]["count"]["n"] == 2 and math.isfinite(record["metrics"]["count"]["mae"])
    written = Path(record["folder"]) / "evaluation.json"
    assert written.is_file() and not list(results.rglob("*.part"))
    again = bench("accuracy", tmp_path, "--results", str(results))
    assert not again["evaluations"][0]["ran"] and again["evaluations"][0]["metrics"] == record["metrics"]


def test_accuracy_on_the_validation_split_reads_the_images_training_validates_on(tmp_path, data_root):
    """--split val: the carved validation images (training's train_val_split, 10%, seed 0), never
    a test image, into <set>_val_<tiling>/."""
    from deepcount.datasets import load_dataset, train_val_split
    from deepcount.evaluation import load_evaluation

    d = bench("accuracy", tmp_path, "--results", str(tmp_path / "results"), "--split", "val")
    (record,) = d["evaluations"]
    assert record["split"] == "val" and Path(record["folder"]).name == "shb_val_pad_first2"
    rows = load_evaluation(Path(record["folder"]) / "evaluation.json")["images"]
    val = train_val_split(load_dataset("shb", None, "train"), 0.1, seed=0)[1]
    assert [Path(r["image"]).name for r in rows] == [it.image.name for it in val[:2]]
    assert all("train_data" in r["image"] for r in rows)
    assert [r["truth"] for r in rows] == [float(it.count) for it in val[:2]]
