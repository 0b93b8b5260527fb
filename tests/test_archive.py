"""Counting an archive on a Ray cluster (``deepcount count --ray N --out DIR``): a local Ray
instance of 2 workers counts real Mall frames exactly as one process does, writes per-file
errors, and resumes from its part files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepcount.cli import main

ray = pytest.importorskip("ray", reason="the `ray` extra (installed by the test extra)")

FRAMES = ["seq_000001.jpg", "seq_000200.jpg", "seq_000801.jpg", "seq_001500.jpg"]


@pytest.fixture(scope="module")
def archive(data_root: Path, tmp_path_factory) -> Path:
    """Four Mall frames, a file that is not an image, and a nested folder."""
    root = tmp_path_factory.mktemp("archive")
    (root / "cam2").mkdir()
    for i, name in enumerate(FRAMES):
        shutil.copy(data_root / "mall_dataset" / "frames" / name, root / ("cam2" if i % 2 else "") / name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def single_process(archive: Path) -> dict[str, float]:
    from deepcount import Counter

    counter = Counter.load("default", device="cpu")
    return {str(p): counter.count(counter.read(p)).count for p in sorted(archive.rglob("seq_*.jpg"))}


def test_two_ray_workers_count_as_one_process_does_and_resume_from_their_parts(
        archive, single_process, tmp_path, capsys):
    from deepcount.archive import count_archive, read_parts

    out = tmp_path / "counts"
    code = main(["count", str(archive), str(archive / "cam2"), "nothing-here/*.jpg", "--ray", "2",
                 "--out", str(out), "-q"])
    assert code == 1  # the broken file and the pattern that matched nothing
    assert "4 counted, 2 failed, 0 already" in capsys.readouterr().out
    rows = {r["source"]: r for r in read_parts(out)}
    assert set(rows) == {*single_process, str(archive / "broken.jpg"), "nothing-here/*.jpg"}
    for source, count in single_process.items():  # each frame once, though named twice
        assert rows[source]["status"] == "ok" and rows[source]["count"] == pytest.approx(count, rel=1e-5, abs=1e-4)
        assert (rows[source]["height"], rows[source]["width"]) == (480, 640)
    assert rows[str(archive / "broken.jpg")]["status"] == "error"
    assert "not a recognised image format" in rows[str(archive / "broken.jpg")]["error"]
    assert rows["nothing-here/*.jpg"]["error"] == "no images match this pattern"

    # resumed: everything is there already, so nothing is counted and Ray is not started
    again = count_archive(sorted(single_process), out, progress=False)
    assert (again.skipped, again.counted, again.parts) == (4, 0, [])
    # a part lost: only its rows are counted again (into new parts), to the same numbers
    import pyarrow.parquet as pq

    first = sorted(out.glob("part-*.parquet"))[0]
    lost = set(pq.read_table(first).column("source").to_pylist()) & set(single_process)
    first.unlink()
    redo = count_archive(sorted(single_process), out, workers=2, rows_per_part=1, progress=False)
    assert (redo.counted, redo.skipped, len(redo.parts)) == (len(lost), 4 - len(lost), len(lost))
    rows = read_parts(out)
    assert len(rows) == len({r["source"] for r in rows})  # no file has two rows
    for r in rows:
        if r["source"] in single_process:
            assert r["count"] == pytest.approx(single_process[r["source"]], rel=1e-5, abs=1e-4)


def test_csv_parts_and_a_folder_of_other_files_is_refused_with_nothing_written(archive, tmp_path, capsys):
    from deepcount.archive import read_parts

    frame = str(sorted(archive.glob("seq_*.jpg"))[0])
    out = tmp_path / "csv"
    assert main(["count", frame, "--ray", "1", "--out", str(out), "--out-format", "csv", "-q"]) == 0
    (row,) = read_parts(out)
    assert row["status"] == "ok" and row["count"] > 0 and row["tiles"] >= 1
    # resuming in the other format would mix two kinds of part: refused
    assert main(["count", frame, "--ray", "1", "--out", str(out), "-q"]) == 2
    assert "resume it with the same format" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["count", frame, "--ray", "1", "--out", str(busy), "-q"]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.offline
@pytest.mark.parametrize("argv, message", [
    (["--ray", "2"], "--ray N and --out DIR go together"),
    (["--out", "x"], "--ray N and --out DIR go together"),
    (["--ray", "0", "--out", "x"], "at least 1 worker"),
    (["--ray", "2", "--out", "x", "--json", "r.json"], "--json cannot be used with --ray"),
])
def test_ray_options_that_do_not_go_together_are_refused_before_anything_runs(argv, message, tmp_path,
                                                                               capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["count", "photo.jpg", *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
