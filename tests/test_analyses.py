"""`deepcount analyses`: the plan of Tables 7-9's runs, then a tiny plan trained, evaluated on
cached test features, reported with the seeds' spread, and resumed after a stop."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcount.analyses import PLAN, jobs, state
from deepcount.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "shb_cpu.yaml"


@pytest.mark.offline
def test_the_plan_holds_every_variant_of_tables_8_and_9_with_two_seeds_where_asked(tmp_path):
    plan = jobs(tmp_path, BASE, steps=700)
    assert [j.name for j in plan] == [
        "shb-cpu-baseline-s0", "shb-cpu-baseline-s1", "shb-cpu-relu-s0", "shb-cpu-detach-1-1-s0",
        "shb-cpu-detach-1-2-s0", "shb-cpu-detach-1-3-s0", "shb-cpu-detach-1-4-s0",
        "shb-cpu-detach-1-5-s0", "shb-cpu-detach-1-5-s1"]
    configs = {j.name: parse_config(list(j.argv)) for j in plan}
    base = parse_config(["--config", str(BASE)])
    for name, cfg in configs.items():
        # what every run shares: the recipe, the data and its crops, the steps, the export rule
        assert cfg.recipe == base.recipe and cfg.data == base.data, name
        assert cfg.trainer.max_steps == 700 and cfg.export.source == "last", name
        assert cfg.model.frozen == base.model.frozen and cfg.run_dir == tmp_path / name
    assert configs["shb-cpu-relu-s0"].model.activation == "relu"
    assert {n: c.model.branches for n, c in configs.items() if "detach" in n} == {
        "shb-cpu-detach-1-1-s0": [2, 3, 4, 5], "shb-cpu-detach-1-2-s0": [3, 4, 5],
        "shb-cpu-detach-1-3-s0": [4, 5], "shb-cpu-detach-1-4-s0": [5],
        "shb-cpu-detach-1-5-s0": [], "shb-cpu-detach-1-5-s1": []}
    assert [c.seed for c in configs.values()] == [0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert configs["shb-cpu-baseline-s0"].model == base.model and all(state(j) == "new" for j in plan)
    assert [j.name for j in jobs(tmp_path, BASE, only=["relu"])] == ["shb-cpu-relu-s0"]
    assert parse_config(list(jobs(tmp_path, BASE, only=["relu"])[0].argv)).trainer.max_steps == base.trainer.max_steps
    with pytest.raises(ConfigError, match="unknown variant"):
        jobs(tmp_path, BASE, only=["detach-2"])
    with pytest.raises(ConfigError, match="not found"):
        jobs(tmp_path, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="relu.yaml not found"):
        jobs(tmp_path, BASE, ablations=tmp_path)


@pytest.mark.offline
def test_cli_dry_run_lists_the_runs_and_their_commands(tmp_path, capsys):
    from deepcount.cli import main

    assert main(["analyses", "--dry-run", "--out", str(tmp_path), "--base", str(BASE), "--steps", "700",
                 "--only", "baseline", "detach-1-5", "--", "--data.num_workers", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(" new ") == 4 and "4 runs of 7 variants" in out
    assert f"--config {BASE} --config {BASE.parent / 'ablations' / 'detach_1-5.yaml'} --seed 1" in out
    assert out.count("--trainer.max_steps 700 --data.num_workers 0") == 4
    assert main(["analyses", "--dry-run", "--base", str(tmp_path / "no.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


# width 1/8 with an untrained frontend frozen up to conv4_2: seconds per run
TINY = ["--model.width", "0.125", "--model.frontend", "none", "--data.limit", "12", "--data.batch_size", "4",
        "--data.num_workers", "0", "--data.cache_targets", "false", "--data.feature_precision", "fp32",
        "--recipe.warmup_steps", "1", "--trainer.precision", "32-true", "--trainer.progress_bar", "false",
        "--trainer.checkpoint_every_n_steps", "1"]


@pytest.mark.offline
def test_a_run_is_not_trained_in_another_precision_than_the_finished_ones(tmp_path, capsys):
    from deepcount.analyses import check_precisions, precision, run_analyses
    from deepcount.cli import main

    plan = jobs(tmp_path / "out", BASE, steps=3, only=["baseline"], extra=TINY,
                evaluations=tmp_path / "evaluations")
    assert [precision(j) for j in plan] == [("32-true", "fp32")] * 2  # what TINY asks, nothing trained yet
    check_precisions(plan)  # nothing finished: nothing to compare with
    # seed 0 finished on a machine with native bf16 (what its kept evaluation records)
    plan[0].evaluation.mkdir(parents=True)
    (plan[0].evaluation / "evaluation.json").write_text(json.dumps(
        {"model": {"config": {"trainer": {"precision": "bf16-mixed"}, "data": {"feature_precision": "bf16"}}}}))
    assert precision(plan[0]) == ("bf16-mixed", "bf16") and state(plan[1]) == "new"
    with pytest.raises(ConfigError, match="shb-cpu-baseline-s1 would train in 32-true on fp32 features here, "
                                          "but the finished runs \\(shb-cpu-baseline-s0\\) trained in bf16-mixed"):
        run_analyses(plan, progress=False, log=lambda line: None)
    assert state(plan[1]) == "new" and not plan[1].run_dir.exists()  # refused before any step
    # asking for the finished runs' precision passes the check (emulated bf16 warns on some CPUs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_precisions(jobs(tmp_path / "out", BASE, steps=3, only=["baseline"],
                              evaluations=tmp_path / "evaluations",
                              extra=[*TINY, "--trainer.precision", "bf16-mixed", "--data.feature_precision", "bf16"]))
    # the dry run says how each run trained or would train here; the real run refuses with exit code 2
    argv = ["analyses", "--out", str(tmp_path / "out"), "--base", str(BASE), "--steps", "3", "--only", "baseline",
            "--evaluations", str(tmp_path / "evaluations"), "--", *TINY]
    assert main([*argv[:1], "--dry-run", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert "evaluated  Tables 7, 8 (PReLU) and 9 (no ablation); trained in bf16-mixed on bf16 features" in out
    assert "new        Tables 7, 8 (PReLU) and 9 (no ablation); trains here in 32-true on fp32 features" in out
    assert main(argv) == 2 and "trained in bf16-mixed on bf16 features" in capsys.readouterr().err


def test_a_tiny_plan_trains_evaluates_reports_and_resumes(tmp_path, data_root):
    pytest.importorskip("lightning")
    from deepcount.analyses import run_analyses
    from deepcount.datasets import shanghaitech
    from deepcount.evaluation import evaluate
    from deepcount.weights import read_safetensors

    plan = jobs(tmp_path / "out", BASE, steps=3, only=["baseline", "detach-1-5"],
                extra=[*TINY, "--data.feature_cache", str(tmp_path / "features")])
    lines: list[str] = []
    text = run_analyses(plan, progress=False, limit=3, log=lines.append)
    assert [state(j) for j in plan] == ["evaluated"] * 4
    assert sum("evaluating" in line for line in lines) == 4
    results = {j.name: json.loads((j.evaluation / "evaluation.json").read_text()) for j in plan}
    base = results["shb-cpu-baseline-s0"]
    assert base["dataset"]["evaluated"] == 3 and base["dataset"]["images"] == 316
    assert set(base["metrics"]) == {"count", *(f"branch{k}" for k in range(1, 6))}
    assert set(results["shb-cpu-detach-1-5-s0"]["metrics"]) == {"count"}
    assert "read from a cache: conv4_2" in base["features"]
    # the cached features (float16 on disk) count what the images themselves count
    images = shanghaitech(data_root / "ShanghaiTech", "B", "test")
    direct = evaluate(str(plan[0].run_dir / f"{plan[0].name}.safetensors"), images, limit=3, progress=False)
    assert direct.tiling == "features"
    whole = json.loads((plan[0].run_dir / "evaluation" / "evaluation.json").read_text())
    assert whole["metrics"] == base["metrics"] and "images" not in base
    assert [(Path(r["image"]).name, r["height"], r["width"], r["tiles"]) for r in whole["images"]] == \
        [(Path(r.image).name, r.height, r.width, r.tiles) for r in direct.rows]
    for key in ("count", "branch1", "branch5"):
        np.testing.assert_allclose([r[key] for r in whole["images"]], [r.outputs[key] for r in direct.rows], rtol=2e-3)
    # the kept copy pairs images: their true and backbone counts
    assert base["per_image"]["truth"] == [r.truth for r in direct.rows]
    np.testing.assert_allclose(base["per_image"]["count"], [r.outputs["count"] for r in direct.rows], rtol=2e-3)
    # the seeds share a cell (mean and range) in Tables 7 and 9; the 3-step seeds differ
    assert "(mean of seeds 0, 1: " in text.split("## Table 9")[1].split("## ")[0]
    t9 = next(line for line in text.split("## Table 9")[1].splitlines() if line.startswith("| Branches 1-5"))
    assert "[3, 4]" in t9 and "(3 steps, fp32 training)" in text
    assert results["shb-cpu-baseline-s0"]["metrics"]["count"] != results["shb-cpu-baseline-s1"]["metrics"]["count"]

    # a stop: one run lost its weights and evaluation (its checkpoints stayed), one its evaluation
    kept = {j.name: (j.evaluation / "evaluation.json").stat().st_mtime_ns for j in plan}
    weights = read_safetensors(plan[3].run_dir / f"{plan[3].name}.safetensors")[0]
    (plan[3].run_dir / f"{plan[3].name}.safetensors").unlink()
    shutil.rmtree(plan[3].evaluation)
    shutil.rmtree(plan[1].evaluation)
    assert [state(j) for j in plan] == ["evaluated", "trained", "evaluated", "partial"]
    lines.clear()
    again = run_analyses(plan, progress=False, limit=3, log=lines.append)
    assert sum("evaluating" in line for line in lines) == 2
    assert f"[4/4] {plan[3].name} (Table 9 (branches 1-5 detached)): partial" in lines  # resumed from last.ckpt
    resumed = read_safetensors(plan[3].run_dir / f"{plan[3].name}.safetensors")[0]
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert {j.name: (j.evaluation / "evaluation.json").stat().st_mtime_ns for j in plan}[plan[0].name] == kept[plan[0].name]
    again_results = {j.name: json.loads((j.evaluation / "evaluation.json").read_text())["metrics"] for j in plan}
    assert again_results == {n: r["metrics"] for n, r in results.items()}
    assert again.split("## Runs")[0] == text.split("## Runs")[0]
    # a part of the plan (--only) trains nothing already done, and its report keeps every run
    lines.clear()
    part = run_analyses(plan[2:], progress=False, limit=3, log=lines.append, report_of=plan)
    assert not any("evaluating" in line for line in lines) and part == again
    assert plan[0].name in part and plan[0].name not in run_analyses(plan[2:], progress=False, limit=3, log=print)
