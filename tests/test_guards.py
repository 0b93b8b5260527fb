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
from deepcount.training import CheckpointError, ConfigError, main, parse_config, train  # noqa: E402

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
    for extra in (["--seed", "1"], ["--data.batch_size", "4"], ["--recipe.lr", "0.001"], ["--data.sigma", "10"]):
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
