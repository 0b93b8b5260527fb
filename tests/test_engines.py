"""The inference engines (deepcount.engines) and the fast ground truth: every fast path gives
the plain path's numbers (float32 tolerance; bf16 within its own), and the switches work."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deepcount import Counter
from deepcount.engines import (AUTO, PRESETS, engine_runner, glibc_malloc_defaults, resolve_engine,
                               retain_cpu_memory, retaining_cpu_memory)
from deepcount.images import load_image, to_tensor
from deepcount.model import CSRNet, DeepCount
from deepcount.targets import OFFICIAL, PAPER, POOL_FACTORS, GroundTruthCache, HeadKernels, sum_pool_axis
from deepcount.tiling import plan_tiles, tile_batches


@pytest.fixture(scope="module")
def photo(photo_path) -> np.ndarray:
    return load_image(photo_path)  # 1024x768: 4 tiles


@pytest.fixture(scope="module")
def tiny() -> DeepCount:
    torch.manual_seed(0)
    return DeepCount(width=0.125).eval()


def _layout_seen(counter: Counter, image: np.ndarray, density=None) -> tuple[str, object]:
    seen = []
    hook = counter.model.backbone.frontend[0].register_forward_hook(
        lambda m, i, o: seen.append("nhwc" if i[0].is_contiguous(memory_format=torch.channels_last)
                                    and not i[0].is_contiguous() else "nchw"))
    try:
        result = counter.count(image, density=density)
    finally:
        hook.remove()
    assert len(set(seen)) == 1
    return seen[0], result


def test_default_engine_is_channels_last_on_the_cpu_and_eager_is_the_plain_path(tiny, photo):
    assert AUTO["cpu"] == "channels_last"
    fast = Counter(tiny, {"name": "tiny"}, torch.device("cpu"))
    plain = Counter(tiny, {"name": "tiny"}, torch.device("cpu"), engine="eager")
    assert fast.engine == "channels_last" and plain.engine == "eager"
    layout, a = _layout_seen(fast, photo, density=1)
    assert layout == "nhwc"
    layout, b = _layout_seen(plain, photo, density=1)
    assert layout == "nchw"
    assert a.count == pytest.approx(b.count, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(a.tile_counts, b.tile_counts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.density.values, b.density.values, rtol=1e-4, atol=1e-7)


@pytest.mark.offline
def test_the_environment_switch_and_bad_engines(tiny, monkeypatch):
    monkeypatch.setenv("DEEPCOUNT_ENGINE", "eager")
    assert Counter(tiny, {"name": "tiny"}, torch.device("cpu")).engine == "eager"
    assert Counter(tiny, {"name": "tiny"}, torch.device("cpu"), engine="bf16").engine == "bf16"  # explicit wins
    monkeypatch.setenv("DEEPCOUNT_ENGINE", "warp-drive")
    with pytest.raises(ValueError, match="engine must be one of"):
        Counter(tiny, {"name": "tiny"}, torch.device("cpu"))
    monkeypatch.delenv("DEEPCOUNT_ENGINE")
    for cuda_only in ("tf32", "cudagraphs"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_engine(cuda_only, "cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        Counter.load("default", engine="fastest")
    with pytest.raises(ValueError, match="applies to a PyTorch model"):
        Counter(lambda batch, branch: (batch.sum((1, 2, 3)), None), {"backend": "onnxruntime"},
                torch.device("cpu"), engine="channels_last")


@pytest.mark.offline
def test_bf16_on_a_cpu_that_only_emulates_it_warns_and_still_counts(tiny, monkeypatch):
    import deepcount.engines as engines

    x = torch.rand(1, 3, 384, 512)
    monkeypatch.setattr(engines, "native_bf16", lambda device="cpu": False)
    with pytest.warns(UserWarning, match="only emulates"):
        run = engine_runner(tiny, "bf16", "cpu")
    count, _ = run(x)
    assert torch.isfinite(count).all()
    monkeypatch.setattr(engines, "native_bf16", lambda device="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine_runner(tiny, "bf16", "cpu")
        engine_runner(tiny, "channels_last", "cpu")


@pytest.mark.parametrize("net", ["deepcount", "csrnet"])
def test_every_cpu_engine_agrees_with_eager_on_real_tiles(net, photo):
    torch.manual_seed(1)
    model = (DeepCount(width=0.25) if net == "deepcount" else CSRNet(width=0.25)).eval()
    x, _ = next(tile_batches(photo, plan_tiles(*photo.shape[:2]), batch_size=4))
    branch = 1
    with torch.inference_mode():
        ref_c, ref_m = engine_runner(model, "eager")(x, (branch,))
        c, m = engine_runner(model, "channels_last")(x, (branch,))
        ref_m, m = ref_m[branch], m[branch]
        # (a DeepCount's counts and cells are clamped at 0: an untrained one's may all be 0)
        torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=1e-5 * max(float(ref_c.abs().max()), 1e-2))
        torch.testing.assert_close(m, ref_m, rtol=1e-4, atol=1e-5 * max(float(ref_m.abs().max()), 1e-2))
        # bf16 (opt-in): outputs stay float32; an untrained net's counts cancel to ~0, so its
        # accuracy is checked on the trained baseline below
        c, m = engine_runner(model, "bf16")(x, (branch,))
        m = m[branch]
        assert c.dtype == m.dtype == torch.float32 and c.shape == ref_c.shape and m.shape == ref_m.shape
        assert torch.isfinite(c).all() and torch.isfinite(m).all()


def test_compiled_engine_agrees_with_eager(tiny):
    x = torch.randn(2, 3, 384, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, _ = engine_runner(tiny, "eager")(x)
        got, _ = engine_runner(tiny, "compile")(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_bf16_count_of_the_baseline_is_within_half_a_percent(counter, photo):
    """The opt-in bf16 engine on the trained CSRNet baseline (the CPU has bf16 dot products
    here; elsewhere it is emulated): the count of a real photo moves by well under 0.5%."""
    fast = Counter(counter.model, counter.info, counter.device, engine="bf16")
    assert fast.count(photo).count == pytest.approx(counter.count(photo).count, rel=5e-3)


def test_tiles_come_in_channels_last_with_to_tensors_values(photo):
    crop = photo[:500, :700]
    plan = plan_tiles(*crop.shape[:2])
    fast = list(tile_batches(crop, plan, batch_size=3))
    plain = list(tile_batches(crop, plan, batch_size=3, channels_last=False))
    for (a, ia), (b, ib) in zip(fast, plain):
        assert ia == ib and a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
        assert torch.equal(a, b)
    assert torch.equal(fast[0][0][0, :, :384, :512], to_tensor(crop[:384, :512]))


@pytest.mark.offline
def test_memory_retention_switch():
    if not retain_cpu_memory(True):
        pytest.skip("not glibc")
    assert retaining_cpu_memory()
    with glibc_malloc_defaults():
        assert not retaining_cpu_memory()
    assert retaining_cpu_memory()
    assert PRESETS["channels_last"].retain_memory and not PRESETS["eager"].retain_memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_engines_agree_with_fp32(tiny):
    model = DeepCount(width=0.125).eval().cuda()
    model.load_state_dict(tiny.state_dict())
    x = torch.randn(4, 3, 384, 512, device="cuda")
    with torch.inference_mode():
        ref, _ = engine_runner(model, "eager")(x)
        for name, tol in (("channels_last", 1e-2), ("tf32", 1e-2), ("bf16", 5e-2), ("cudagraphs", 5e-2)):
            got, _ = engine_runner(model, name)(x)
            assert float((got - ref).abs().max()) <= tol * (float(ref.abs().max()) + 1e-3), name


# ----------------------------------------------------------------------------- ground truth
def _dense_reference(k: HeadKernels, top=0, left=0, height=None, width=None, flip=False):
    """The pyramid as computed before (dense heads x pixels factors, each factor pooled)."""
    height = k.height if height is None else height
    width = k.width if width is None else width
    ky, kx = k._factors(top, left, height, width)
    if flip:
        kx = kx[:, ::-1]
    return [(sum_pool_axis(ky, f).T @ sum_pool_axis(kx, f)).astype(np.float32) for f in POOL_FACTORS], \
        float(ky.sum(1) @ kx.sum(1))


def test_sparse_pyramid_equals_the_dense_reference(shb_root):
    from deepcount.datasets import shanghaitech

    items = shanghaitech(shb_root, "B", "test")[:25]
    rng = np.random.default_rng(0)
    for config in (PAPER, OFFICIAL):
        for it in items:
            k = HeadKernels.from_points(it.points, 768, 1024, config)
            regions = [{}, {"flip": True}, {"top": 384, "left": 512, "height": 384, "width": 512},
                       {"top": int(rng.integers(0, 700)), "left": int(rng.integers(0, 900)), "height": 384,
                        "width": 512, "flip": True}]
            for region in regions:
                maps, count = _dense_reference(k, **region)
                got = k.pyramid(**region)
                assert got.count == pytest.approx(count, rel=1e-12, abs=1e-12)
                for a, b in zip(got.maps, maps):
                    assert a.dtype == np.float32 and a.shape == b.shape
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_pyramid_cache_reads_back_what_it_wrote(shb_root, tmp_path, monkeypatch):
    from deepcount.datasets import shanghaitech

    it = shanghaitech(shb_root, "B", "test")[3]
    cache = GroundTruthCache(tmp_path)
    first = cache.pyramid(it.points, 768, 1024)
    fresh = HeadKernels.from_points(it.points, 768, 1024).pyramid()
    assert first.count == fresh.count and all(np.array_equal(a, b) for a, b in zip(first.maps, fresh.maps))
    files = list(tmp_path.glob("pyramid-*.npy"))
    assert len(files) == 1
    monkeypatch.setattr(HeadKernels, "from_points", lambda *a, **k: pytest.fail("recomputed a cached pyramid"))
    again = cache.pyramid(it.points, 768, 1024)
    assert again.count == first.count and all(np.array_equal(a, b) for a, b in zip(again.maps, first.maps))
    assert [m.shape for m in again.maps] == [(-(-768 // f), -(-1024 // f)) for f in POOL_FACTORS]
    monkeypatch.undo()
    files[0].write_bytes(b"torn")  # a broken entry is recomputed, not trusted
    assert cache.pyramid(it.points, 768, 1024).count == first.count
    cache.pyramid(it.points, 768, 1024, OFFICIAL)  # other settings: another entry
    assert len(list(tmp_path.glob("pyramid-*.npy"))) == 2
