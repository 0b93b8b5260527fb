"""Awkward and broken inputs, each through the API (``Counter.count``) and the CLI (one batch
that mixes them all with the good IMG_1.jpg): broken files raise ``ImageLoadError`` naming
the file / are reported on stderr with their reason while the rest is counted; awkward but
valid pictures (1x1, grey, RGBA, 16-bit, CMYK, EXIF-rotated) are counted like the photo they
were made from.  Every file is derived from the real ShanghaiTech B photo."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcount import Counter
from deepcount.cli import main
from deepcount.images import ImageLoadError

BASELINE_IMG_1 = 61.6427  # the CSRNet baseline's count of IMG_1.jpg (pad tiling)

# name -> (file or folder name, what Counter.count says, what the CLI says)
BROKEN = {
    "truncated jpeg": ("truncated.jpg", "truncated or corrupt image data", "truncated or corrupt image data"),
    "zero-byte file": ("empty.jpg", "empty file (0 bytes)", "empty file (0 bytes)"),
    "text named .jpg": ("notes.jpg", "not a recognised image format", "not a recognised image format"),
    "decompression bomb": ("bomb.png", "20000x20000 = 400,000,000 pixels exceeds the limit of 89,478,485",
                           "400,000,000 pixels exceeds the limit of 89,478,485 (decompression-bomb guard); "
                           "use --max-pixels 400000000 (or 0 for no limit) to allow"),
    "folder without images": ("no-images", "is a directory, not an image file", "no images in this folder"),
    "missing path": ("missing.jpg", "no such file", "no such file or folder"),
}
VALID = ("1x1", "greyscale jpeg", "rgba png", "16-bit png", "cmyk jpeg", "exif-rotated png")


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims ``width x height``, CRC fixed: a header-only bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def upright(photo_path: Path) -> np.ndarray:
    """The top-right quarter of the photo, where the crowd is: exactly one 384x512 tile."""
    with Image.open(photo_path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:384, 512:])


@pytest.fixture(scope="module")
def files(tmp_path_factory, photo_path: Path, upright: np.ndarray) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-input")
    out: dict[str, Path] = {}
    data = photo_path.read_bytes()
    out["truncated jpeg"] = d / "truncated.jpg"
    out["truncated jpeg"].write_bytes(data[: len(data) // 2])
    out["zero-byte file"] = d / "empty.jpg"
    out["zero-byte file"].write_bytes(b"")
    out["text named .jpg"] = d / "notes.jpg"
    out["text named .jpg"].write_text("shopping list: bread, milk\n" * 10)
    out["decompression bomb"] = d / "bomb.png"
    out["decompression bomb"].write_bytes(_png_claiming(20000, 20000))
    out["folder without images"] = d / "no-images"
    out["folder without images"].mkdir()
    (out["folder without images"] / "readme.txt").write_text("no pictures here")
    out["missing path"] = d / "missing.jpg"

    rgb = Image.fromarray(upright)
    out["1x1"] = d / "one-pixel.png"
    Image.fromarray(upright[200:201, 200:201]).save(out["1x1"])
    out["greyscale jpeg"] = d / "grey.jpg"
    rgb.convert("L").save(out["greyscale jpeg"], quality=95)
    out["rgba png"] = d / "rgba.png"
    alpha = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (384, 1))
    Image.fromarray(np.dstack([upright, alpha]), "RGBA").save(out["rgba png"])
    out["16-bit png"] = d / "grey16.png"
    with Image.open(out["greyscale jpeg"]) as im:  # the grey JPEG's pixels in 16 bit: >> 8 gives them back
        Image.fromarray(np.asarray(im).astype(np.uint16) * 257).save(out["16-bit png"])
    out["cmyk jpeg"] = d / "cmyk.jpg"
    rgb.convert("CMYK").save(out["cmyk jpeg"], quality=95)
    # Stored sideways (512 high, 384 wide) with Orientation 6 ("rotate 90 degrees clockwise to
    # view"): applying the tag gives the upright crop back, pixel for pixel (PNG is lossless).
    out["exif-rotated png"] = d / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(out["exif-rotated png"], exif=exif.tobytes())

    with Image.open(out["16-bit png"]) as im:
        assert im.mode.startswith("I") and im.size == (512, 384)
    with Image.open(out["cmyk jpeg"]) as im:
        assert im.mode == "CMYK"
    with Image.open(out["exif-rotated png"]) as im:
        assert im.size == (384, 512) and im.getexif()[0x0112] == 6
    with Image.open(out["greyscale jpeg"]) as im:
        assert im.mode == "L"
    return out


@pytest.fixture(scope="module")
def api_counts(counter: Counter, files: dict[str, Path], upright: np.ndarray) -> dict:
    """Each valid file counted once through the API, plus the references they must match."""
    got = {name: counter.count(files[name]) for name in VALID}
    with Image.open(files["greyscale jpeg"]) as im:
        grey_jpeg = np.asarray(im)
    got["upright"] = counter.count(upright)
    got["grey jpeg pixels"] = counter.count(np.repeat(grey_jpeg[..., None], 3, axis=2))
    return got


@pytest.fixture(scope="module")
def cli_batch(files: dict[str, Path], photo_path: Path, tmp_path_factory) -> dict:
    """One ``deepcount count`` run (in process) over the good photo and every derived file."""
    out_dir = tmp_path_factory.mktemp("cli-out")
    paths = [str(photo_path)] + [str(files[name]) for name in [*BROKEN, *VALID]]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["count", "--model", "csrnet-baseline", *paths, "--csv", str(out_dir / "rows.csv"), "--json", str(out_dir / "rows.json")])
    with open(out_dir / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "paths": paths,
            "csv": {r["source"]: r for r in rows}, "json": json.loads((out_dir / "rows.json").read_text())}


# ----------------------------------------------------------------------------- broken: API
@pytest.mark.parametrize("name", list(BROKEN))
def test_api_refuses_broken_input_naming_the_file(name: str, counter: Counter, files: dict[str, Path]):
    path = files[name]
    with pytest.raises(ImageLoadError) as ei:
        counter.count(path)
    assert ei.value.source == str(path)
    assert BROKEN[name][1] in ei.value.reason
    assert str(ei.value) == f"{path}: {ei.value.reason}"


# ----------------------------------------------------------------------------- broken: CLI
def test_cli_batch_counts_the_good_photo_and_fails_with_exit_code_1(cli_batch: dict, photo_path: Path):
    assert cli_batch["code"] == 1
    err = cli_batch["stderr"]
    assert err.startswith("model: csrnet-baseline: ") and "baseline, NOT a trained DeepCount" in err
    assert "Traceback" not in err
    good = cli_batch["csv"][str(photo_path)]
    assert good["status"] == "ok" and good["error"] == ""
    assert float(good["count"]) == pytest.approx(BASELINE_IMG_1, abs=1e-3)
    assert (good["height"], good["width"], good["tiles"]) == ("768", "1024", "4")
    table = [line for line in cli_batch["stdout"].splitlines() if line.startswith(str(photo_path))]
    assert len(table) == 1 and table[0].split()[1:4] == ["61.6", "4", "768x1024"]
    doc = cli_batch["json"]
    assert doc["counted"] == 1 + len(VALID) and doc["failed"] == len(BROKEN)
    assert cli_batch["stdout"].splitlines()[-1].endswith(f"{1 + len(VALID)} images, {len(BROKEN)} failed")


def test_cli_batch_skips_nothing_silently(cli_batch: dict):
    """Every path given comes back once, in order, in the CSV and the JSON; every one is either
    a table row (stdout) or an error line (stderr)."""
    paths = cli_batch["paths"]
    assert list(cli_batch["csv"]) == paths
    assert [r["source"] for r in cli_batch["json"]["images"]] == paths
    table = {line.split()[0] for line in cli_batch["stdout"].splitlines()[1:-1]}
    errors = {line.split(": ")[1] for line in cli_batch["stderr"].splitlines() if line.startswith("error: ")}
    assert table | errors == set(paths) and not table & errors


@pytest.mark.parametrize("name", list(BROKEN))
def test_cli_reports_broken_input_with_its_reason(name: str, cli_batch: dict, files: dict[str, Path]):
    path = str(files[name])
    reason = BROKEN[name][2]
    row = cli_batch["csv"][path]
    assert row["status"] == "error" and reason in row["error"]
    assert row["count"] == "" and row["tiles"] == ""
    lines = [line for line in cli_batch["stderr"].splitlines() if line.startswith(f"error: {path}: ")]
    assert len(lines) == 1 and reason in lines[0]
    item = next(r for r in cli_batch["json"]["images"] if r["source"] == path)
    assert item["status"] == "error" and item["count"] is None and reason in item["error"]
    assert path not in cli_batch["stdout"]


@pytest.mark.parametrize("name", list(BROKEN))
def test_cli_exit_code_is_1_for_each_broken_input_alone(name: str, files: dict[str, Path], capsys):
    assert main(["count", "-q", str(files[name])]) == 1
    out, err = capsys.readouterr()
    assert f"error: {files[name]}: " in err and BROKEN[name][2] in err and "Traceback" not in err
    assert out.splitlines()[-1].split()[:2] == ["total", "0.0"]
    assert out.splitlines()[-1].endswith("0 images, 1 failed")


# ----------------------------------------------------------------------------- valid: API and CLI
def test_one_pixel_image_is_one_tile_holding_nobody(api_counts: dict):
    r = api_counts["1x1"]
    assert r.image_size == (1, 1) and r.tiles == 1
    assert abs(r.count) < 0.5


def test_greyscale_is_counted_as_grey_rgb(api_counts: dict, counter: Counter, files: dict[str, Path]):
    a = counter.read(files["greyscale jpeg"])
    assert a.shape == (384, 512, 3) and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    assert api_counts["greyscale jpeg"].count == api_counts["grey jpeg pixels"].count
    assert api_counts["greyscale jpeg"].count != api_counts["upright"].count  # colour matters to the model


def test_rgba_drops_alpha(api_counts: dict):
    assert api_counts["rgba png"].count == api_counts["upright"].count


def test_sixteen_bit_png_is_scaled_not_clipped(api_counts: dict, counter: Counter, files: dict[str, Path]):
    assert api_counts["16-bit png"].count == api_counts["grey jpeg pixels"].count
    a = counter.read(files["16-bit png"])
    with Image.open(files["greyscale jpeg"]) as im:
        assert np.array_equal(a[..., 1], np.asarray(im))
    assert (a == 255).mean() < 0.05  # Pillow's own convert("L") clips 16-bit values: all white


def test_cmyk_jpeg_is_converted_not_inverted(api_counts: dict, counter: Counter, files: dict[str, Path],
                                            upright: np.ndarray):
    a = counter.read(files["cmyk jpeg"])
    assert np.abs(a.astype(np.int16) - upright).mean() < 2  # inverted CMYK would be ~100
    assert api_counts["cmyk jpeg"].count == pytest.approx(api_counts["upright"].count, rel=0.02)


def test_exif_rotated_photo_counts_as_the_upright_one(api_counts: dict):
    r, up = api_counts["exif-rotated png"], api_counts["upright"]
    assert r.image_size == (384, 512) and r.tiles == 1  # sideways it would be 512x384: 2 tiles
    assert up.count > 10  # the crowd is in this quarter
    assert r.count == pytest.approx(up.count, rel=1e-3)


@pytest.mark.parametrize("name", VALID)
def test_cli_counts_valid_input_exactly_as_the_api(name: str, cli_batch: dict, api_counts: dict,
                                                   files: dict[str, Path]):
    path = str(files[name])
    api = api_counts[name]
    row = cli_batch["csv"][path]
    assert row["status"] == "ok" and row["error"] == ""
    assert float(row["count"]) == api.count  # CSV keeps the full float
    assert (int(row["height"]), int(row["width"]), int(row["tiles"])) == (*api.image_size, api.tiles)
    item = next(r for r in cli_batch["json"]["images"] if r["source"] == path)
    assert item["count"] == api.count and item["status"] == "ok"
    table = [line for line in cli_batch["stdout"].splitlines() if line.startswith(path + " ")]
    assert len(table) == 1
    assert table[0].split()[1:4] == [f"{round(api.count, 1) + 0.0:.1f}", str(api.tiles),
                                     f"{api.image_size[0]}x{api.image_size[1]}"]
    assert f"error: {path}:" not in cli_batch["stderr"]


def test_bomb_is_allowed_only_when_asked_and_limits_apply_to_real_images(photo_path: Path, files, capsys):
    # a limit below the photo's 786,432 pixels refuses it, naming the option to change
    assert main(["count", "-q", "--model", "csrnet-baseline", "--max-pixels", "786431", str(photo_path), str(files["1x1"])]) == 1
    out, err = capsys.readouterr()
    assert f"error: {photo_path}: 1024x768 = 786,432 pixels exceeds the limit of 786,431" in err
    assert "use --max-pixels 786432 (or 0 for no limit)" in err
    assert str(files["1x1"]) in out
    assert main(["count", "-q", "--max-pixels", "-1", str(files["1x1"])]) == 2
    assert "--max-pixels must be 0 (no limit) or more" in capsys.readouterr().err
