"""The bundled default model: a trained DeepCount that counts ShanghaiTech B test IMG_1..IMG_20
as docs/RESULTS.md records (MAE within 0.5), and the README's example as the README says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from deepcount import Counter
from deepcount.datasets import shanghaitech
from deepcount.model import DeepCount
from deepcount.weights import DEFAULT_MODEL, REGISTRY

REPO = Path(__file__).resolve().parents[1]


def recorded(pattern: str, path: Path) -> float:
    m = re.search(pattern, path.read_text())
    assert m, f"{path.name} records no value for {pattern!r}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def default() -> Counter:
    return Counter.load("default", device="cpu")


def test_the_default_is_a_trained_deepcount(default):
    entry = REGISTRY[DEFAULT_MODEL]
    assert isinstance(default.model, DeepCount) and default.name == DEFAULT_MODEL
    assert "NOT a trained DeepCount" not in default.description
    assert all(f"{m['mae']:.2f}" in default.description for m in entry.test_metrics.values())
    assert default.tiling == entry.tiling and default.level == entry.feature_level
    assert default.picture_branch in entry.architecture["branches"]
    # density=True asks for the map the bundled file carries (branch 4: 6x8 cells per 384x512 tile)
    grey = np.full((384, 512, 3), 128, np.uint8)
    assert default.count(grey, density=True).density.values.shape == (6, 8)


def test_the_default_counts_shanghaitech_b_as_recorded(default, data_root):
    # the one sentence that records it: "The bundled default counts ShanghaiTech B test IMG_1..IMG_20 with MAE x"
    want = recorded(r"bundled default counts\s+ShanghaiTech\s+B\s+test\s+IMG_1\.\.IMG_20\s+with\s+MAE\s+([0-9.]+)",
                    REPO / "docs" / "RESULTS.md")
    test = shanghaitech(data_root / "ShanghaiTech", "B", "test")
    items = [it for it in test if int(it.image.stem.split("_")[1]) <= 20]
    assert len(items) == 20
    errors = [default.count(it.image).count - it.count for it in items]
    assert np.mean(np.abs(errors)) == pytest.approx(want, abs=0.5)


def test_the_readme_example_counts_what_the_readme_says(default):
    want = recorded(r"on the example photo it prints ([0-9.]+) people", REPO / "README.md")
    got = default.count(REPO / "examples" / "shanghaitech_b_test_IMG_1.jpg").count
    assert round(got, 1) == pytest.approx(want, abs=0.05)


def test_pad_tiling_on_a_features_model_warns_and_over_counts_the_padding(default, tmp_path, capsys):
    """The default was trained on whole-image features; in `pad` the grey padding's features
    read as people, so asking for `pad` says so (a TilingWarning; the CLI's `warning:` line)."""
    import warnings

    from deepcount.cli import main
    from deepcount.tiling import TilingWarning

    with pytest.warns(TilingWarning, match="over-counted"):
        pad = Counter.load("default", device="cpu", tiling="pad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Counter.load("default", device="cpu", tiling="grid")  # no padding: no warning
    # a 480x640 Mall-sized frame is one whole tile and three mostly padded ones
    frame = np.asarray(Image.open(REPO / "examples" / "shanghaitech_b_test_IMG_1.jpg").convert("RGB"))[:480, :640]
    assert pad.count(frame).count > default.count(frame).count + 10
    path = tmp_path / "frame.png"
    Image.fromarray(frame).save(path)
    assert main(["count", "--tiling", "pad", "--device", "cpu", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {DEFAULT_MODEL} was trained on whole-image frontend features" in err
    assert main(["count", "--device", "cpu", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err
