"""The bundled default model: a trained DeepCount that counts ShanghaiTech B test IMG_1..IMG_20
as docs/RESULTS.md records (MAE within 0.5), and the README's example as the README says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
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
    want = recorded(r"IMG_1\.\.IMG_20[^\n]*?MAE ([0-9.]+)", REPO / "docs" / "RESULTS.md")
    test = shanghaitech(data_root / "ShanghaiTech", "B", "test")
    items = [it for it in test if int(it.image.stem.split("_")[1]) <= 20]
    assert len(items) == 20
    errors = [default.count(it.image).count - it.count for it in items]
    assert np.mean(np.abs(errors)) == pytest.approx(want, abs=0.5)


def test_the_readme_example_counts_what_the_readme_says(default):
    want = recorded(r"on the example photo it prints ([0-9.]+) people", REPO / "README.md")
    got = default.count(REPO / "examples" / "shanghaitech_b_test_IMG_1.jpg").count
    assert round(got, 1) == pytest.approx(want, abs=0.05)
