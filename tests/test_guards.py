"""What a careless user or a hostile file must not be able to do (issue 16, the training and
weights items): resume goes back in time after a move, a resume with other settings silently
becomes another experiment, a half-written or unreadable checkpoint crashes with a traceback,
one corrupt training image stops a run mid-way, and weights whose description lies about
their size build a huge network or count NaN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepcount.model import DeepCount
from deepcount.predict import load_network

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- weights
def test_weights_describing_another_width_are_refused_before_building(tmp_path):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in DeepCount(width=0.125, branches=[1]).state_dict().items()}
    path = tmp_path / "liar.safetensors"
    arch = {"model": "deepcount", "width": 64.0, "activation": "prelu", "branches": [1]}
    save_file(state, str(path), metadata={"deepcount": json.dumps({"architecture": arch})})
    with pytest.raises(ValueError, match="refusing to build"):
        load_network(path)
    # a tiny file claiming a huge network: refused from its tensors alone
    tiny = tmp_path / "tiny.safetensors"
    save_file({"backbone.fc.weight": torch.zeros(1, 8)}, str(tiny),
              metadata={"deepcount": json.dumps({"architecture": arch})})
    assert tiny.stat().st_size < 1000
    with pytest.raises(ValueError, match="deepcount|refusing"):
        load_network(tiny)


def test_weights_holding_nan_are_refused(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in DeepCount(width=0.125, branches=[1]).state_dict().items()}
    state["backbone.fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="NaN"):
        load_network(path)


# ----------------------------------------------------------------------------- training
pytest.importorskip("lightning")
from deepcount.cli.train import main  # noqa: E402
from deepcount.config import CheckpointError, ConfigError, parse_config
from deepcount.training import train

SMALL = ["--model.width", "0.125", "--data.limit", "6", "--data.batch_size", "2", "--data.num_workers", "0",
         "--data.cache_targets", "false", "--export.source", "last", "--trainer.progress_bar", "false",
         "--trainer.checkpoint_every_n_steps", "1"]


def config(out: Path, name: str, steps: int, *extra: str, dataset: tuple[str, ...] = ()):
    return parse_config(["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, *dataset, "--out", str(out),
                         "--name", name, "--trainer.max_steps", str(steps), *extra])


def test_resume_after_moving_the_run_continues_from_the_newest_state(tmp_path, data_root):
    train(config(tmp_path / "a", "run", 2))
    shutil.move(tmp_path / "a", tmp_path / "b")
    result = train(config(tmp_path / "b", "run", 3, "--resume", "last"))
    assert result["global_step"] == 3
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and not [c for c in ckpts if c.startswith("last-v")]
    step = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step == 3
    # and again: `last` is the step-3 state, so the run ends at 4
    assert train(config(tmp_path / "b", "run", 4, "--resume", "last"))["global_step"] == 4


def test_resume_with_other_settings_is_refused(tmp_path, data_root, capsys):
    train(config(tmp_path, "run", 1))
    before = (tmp_path / "run" / "config.yaml").read_text()
    for extra in (["--seed", "1"], ["--data.batch_size", "4"], ["--recipe.lr", "0.001"], ["--data.ground_truth.sigma", "10"]):
        cfg = config(tmp_path, "run", 2, "--resume", "last", *extra)
        with pytest.raises(ConfigError, match="another experiment"):
            train(cfg)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # not overwritten
    args = ["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, "--out", str(tmp_path), "--name", "run",
            "--trainer.max_steps", "2", "--resume", "last", "--seed", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "seed: 0 -> 3" in err and "Traceback" not in err


def test_partial_and_unreadable_checkpoints_get_a_one_line_error(tmp_path, data_root, capsys):
    train(config(tmp_path, "run", 1))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last.ckpt.part").write_bytes(b"half")  # what a full disk left behind
    last = ckpts / "last.ckpt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 3])  # truncated
    args = ["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, "--out", str(tmp_path), "--name", "run",
            "--trainer.max_steps", "2", "--resume", "last"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert str(last) in err and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert not (ckpts / "last.ckpt.part").exists()
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "x": object()}, pickled)  # needs unpickling code
    assert main([*args[:-2], "--resume", str(pickled)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    last.write_bytes(good)
    assert main(args) == 0


def test_a_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from deepcount.training import _atomic_checkpoint_io

    def full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"part of it")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    with pytest.raises(CheckpointError, match="No space left"):
        _atomic_checkpoint_io().save_checkpoint({}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_training_image_is_named_before_training_starts(tmp_path, data_root, capsys):
    src = data_root / "ShanghaiTech" / "part_B_final" / "train_data"
    root = tmp_path / "data" / "train"
    root.mkdir(parents=True)
    from deepcount.datasets import shanghaitech

    for item in shanghaitech(data_root / "ShanghaiTech", "B", "train")[:4]:
        shutil.copy(item.image, root / item.image.name)
        (root / f"{item.image.stem}.json").write_text(json.dumps({"points": item.points.tolist()}))
    bad = root / sorted(p.name for p in root.glob("*.jpg"))[1]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated: the header reads, the pixels do not
    data = ["--data.dataset", "custom", "--data.root", str(tmp_path / "data"), "--data.val_fraction", "0.25"]
    args = ["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, *data, "--out", str(tmp_path / "runs"),
            "--name", "run", "--trainer.max_steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "1 of 4" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()
    with pytest.warns(UserWarning, match=bad.name):
        result = train(parse_config([*args, "--data.skip_unreadable", "true"]))
    assert result["global_step"] == 1


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = DeepCount(width=0.125, branches=[1])
    with torch.no_grad():
        net.backbone.fc.bias.fill_(5.0)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def photos(tmp_path, photo_path) -> Path:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    with Image.open(photo_path) as im:
        for i, box in enumerate([(0, 0, 300, 200), (300, 200, 600, 400), (500, 100, 800, 300)], 1):
            im.crop(box).save(folder / f"IMG_{i}.png")
    return folder


def _count(capsys, *argv) -> tuple[int, str]:
    from deepcount.cli import main as cli

    code = cli(["count", "-q", *map(str, argv)])
    return code, capsys.readouterr().err


def test_outputs_never_clobber_inputs_or_earlier_results(small_model, photos, tmp_path, capsys):
    before = {p: p.read_bytes() for p in photos.iterdir()}
    code, err = _count(capsys, "--model", small_model, "--csv", photos / "IMG_1.png", photos)
    assert code == 2 and "is one of the images" in err
    code, err = _count(capsys, "--model", small_model, photos, "--density", photos)
    assert code == 0
    assert {p: p.read_bytes() for p in before} == before  # the photos' own PNGs untouched
    assert sorted(p.name for p in photos.glob("*.density.png")) == [f"IMG_{i}.density.png" for i in (1, 2, 3)]
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("precious\n")
    code, err = _count(capsys, "--model", "csrnet-basline", "--csv", earlier, photos / "IMG_1.png")
    assert code == 2 and earlier.read_text() == "precious\n"  # a typo in --model touches nothing
    code, err = _count(capsys, "--model", small_model, "--csv", earlier, "--json", earlier, photos / "IMG_1.png")
    assert code == 2 and "same file" in err and earlier.read_text() == "precious\n"
    assert not [p for p in tmp_path.rglob("*.part")]


def test_sigterm_leaves_whole_outputs(small_model, photos, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    many = [photos / "IMG_1.png"] * 1 + [photos / f"IMG_{i}.png" for i in (2, 3)]
    for i in range(40):  # enough work to be stopped in the middle
        shutil.copy(photos / "IMG_2.png", photos / f"copy_{i}.png")
    out = tmp_path / "rows.json"
    proc = subprocess.Popen([sys.executable, "-m", "deepcount.cli", "count", "--model", str(small_model),
                             "--json", str(out), "--csv", str(tmp_path / "rows.csv"), str(photos), *map(str, many)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(str(photos)):
            break  # counting has begun
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    doc = json.loads(out.read_text())  # whole JSON, not 0 bytes
    assert 1 <= doc["counted"] < 43
    rows = (tmp_path / "rows.csv").read_text().splitlines()
    assert len(rows) == 1 + len(doc["images"])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_a_name_that_is_not_utf8_is_reported_and_the_run_goes_on(small_model, photos, tmp_path, capsys):
    import os

    odd = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    os.rename(os.fsencode(photos / "IMG_3.png"), odd)
    code, err = _count(capsys, "--model", small_model, "--csv", tmp_path / "rows.csv", "--json",
                       tmp_path / "rows.json", photos)
    assert code == 0 and "not valid UTF-8" in err
    sources = [r["source"] for r in json.loads((tmp_path / "rows.json").read_text())["images"]]
    assert len(sources) == 3 and any(s.endswith("caf\\xe9.png") for s in sources)
    assert "caf\\xe9.png" in (tmp_path / "rows.csv").read_text()


def test_fifos_are_skipped_and_link_loops_end(small_model, photos, tmp_path, capsys):
    import os

    os.mkfifo(photos / "x.jpg")
    sub = photos / "sub"
    sub.mkdir()
    shutil.copy(photos / "IMG_1.png", sub / "deep.png")
    os.symlink("..", sub / "up")  # a link pointing up the tree
    os.symlink("../..", sub / "up2")
    code, err = _count(capsys, "--model", small_model, "--json", tmp_path / "rows.json", photos,
                       f"{photos}/**/*.png")
    rows = json.loads((tmp_path / "rows.json").read_text())["images"]
    assert code == 1 and "x.jpg: not a regular file (a FIFO (named pipe)): skipped" in err
    counted = sorted(Path(r["source"]).name for r in rows if r["status"] == "ok")
    assert counted == ["IMG_1.png", "IMG_2.png", "IMG_3.png", "deep.png"]


def test_points_far_outside_the_image_are_an_error_naming_the_file(tmp_path, data_root, capsys):
    from deepcount.datasets import custom, handle_points_outside, points_outside, shanghaitech

    root = tmp_path / "data" / "train"
    root.mkdir(parents=True)
    items = [it for it in shanghaitech(data_root / "ShanghaiTech", "B", "train")[:10] if not points_outside([it])][:3]
    for i, item in enumerate(items):
        shutil.copy(item.image, root / item.image.name)
        points = item.points.tolist() + ([[1500.0, 300.0]] * 500 if i == 1 else [[1023.4, 767.2]])  # 1024x768
        (root / f"{item.image.stem}.json").write_text(json.dumps({"points": points}))
    ds = custom(root)
    bad = root / f"{items[1].image.stem}.json"
    with pytest.raises(ValueError, match=f"500 annotated point.*{bad.name}: 500 point"):
        handle_points_outside(ds, "error")
    dropped, line = handle_points_outside(ds, "drop")
    assert [it.count for it in dropped] == [it.count + (0 if i == 1 else 1) for i, it in enumerate(items)]
    assert "dropped" in line
    kept, _ = handle_points_outside(ds, "clip")
    assert [it.count for it in kept] == [it.count for it in ds]
    data = ["--data.dataset", "custom", "--data.root", str(tmp_path / "data"), "--data.val_fraction", "0.34"]
    args = ["--config", str(REPO / "configs" / "shb.yaml"), *SMALL, *data, "--out", str(tmp_path / "runs"),
            "--name", "run", "--trainer.max_steps", "1", "--data.outside_points", "error"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "500 point(s), up to 47" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="dropped"):
        assert train(parse_config([*args, "--data.outside_points", "drop"]))["global_step"] == 1


def test_json_rows_never_hold_nan():
    from deepcount.cli.count import _finite

    doc = _finite({"total": float("nan"), "images": [{"count": float("inf")}, {"count": 2.5}]})
    assert json.loads(json.dumps(doc, allow_nan=False)) == {"total": None, "images": [{"count": None}, {"count": 2.5}]}
