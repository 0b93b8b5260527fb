"""A command whose optional dependencies are missing says which extra to install, and how, for
this installation (no traceback, exit code 2); the extras listed are pyproject's."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from deepcount import extras
from deepcount.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.offline
def test_extras_are_pyprojects_and_the_install_command_keeps_this_torch():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(declared)
    import torch

    command = extras.install_command("serve")
    assert command.endswith('[serve]"') and command.startswith("pip install ")
    if extras._checkout() is not None:  # an editable checkout: the README's form, torch pinned
        assert f"torch=={torch.__version__.split('+')[0]} -e " in command
    with pytest.raises(ValueError, match="no extra named"):
        extras.install_command("gpu")


@pytest.mark.parametrize("argv, hidden, extra", [
    (["export", "--format", "onnx", "--output", "never.onnx"], "onnx", "export"),
    (["serve", "--port", "0"], "uvicorn", "serve"),
    (["video", "never.mp4"], "cv2", "video"),
    (["train", "--trainer.max_steps", "1"], "lightning", "train"),
    (["count", "photo.jpg", "--ray", "2", "--out", "counts"], "ray", "ray"),
])
@pytest.mark.offline
def test_a_missing_extra_is_one_line_naming_the_install_command(argv, hidden, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, hidden, None)  # import fails as if not installed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"the {extra!r} extra ({hidden} is missing" in line
    assert line.endswith(extras.install_command(extra))
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.offline
def test_the_onnxruntime_backend_without_the_extra(monkeypatch):
    from deepcount import Counter

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(extras.MissingExtraError, match=r"'export' extra \(onnxruntime is missing"):
        Counter.load("x.onnx")
