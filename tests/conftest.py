"""Shared fixtures: the real datasets live in ../shared/data beside the repository."""

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
