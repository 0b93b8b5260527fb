"""`deepcount export` (ONNX / TorchScript) and `Counter.load(..., backend="onnxruntime")`, on
real ShanghaiTech photos.

The real default model (the CSRNet baseline, 62 MiB) is exported once per module, through the
command line; the DeepCount cases (branches, density outputs, TorchScript) use a small
DeepCount (width 0.125) saved as .safetensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deepcount import Counter
from deepcount import export as ex
from deepcount.cli import main
from deepcount.images import load_image
from deepcount.model import MAP_SIZES, DeepCount, architecture, count_parameters
from deepcount.weights import REGISTRY

TOL = 1e-4


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1.0)).max())


@pytest.fixture(scope="module")
def img1(shb_root):
    return shb_root / "part_B_final/test_data/images/IMG_1.jpg"  # 768x1024: 2x2 whole tiles


@pytest.fixture(scope="module")
def img_small(shb_root):
    return shb_root / "part_A_final/test_data/images/IMG_102.jpg"  # 276x460: one padded tile


# ----------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_onnx(tmp_path_factory, img1, img_small):
    """The real default model exported once, by the command, with its parity check."""
    path = tmp_path_factory.mktemp("onnx") / "default.onnx"
    rc, out, err = run_cli("export", "--format", "onnx", "--output", path, "--model", "csrnet-baseline",
                           "--check-images", img1, img_small)
    return path, rc, out, err





@pytest.fixture(scope="module")
def onnx_counter(default_onnx):
    return Counter.load(default_onnx[0], backend="onnxruntime", device="cpu", batch_size=3)


def test_cli_export_prints_pass_and_the_file(default_onnx, img1):
    path, rc, out, err = default_onnx
    assert rc == 0, out + err
    assert re.search(r"^PASS: max rel err ", out, re.M), out
    assert "batch 1: count max rel err" in out and "batch 3: count max rel err" in out
    errors = [float(x) for x in re.findall(r"max rel err ([0-9.e+-]+)", out)]
    assert len(errors) == 5 and max(errors) <= TOL  # 2 batch sizes x (count, density) + overall
    assert str(img1) in out
    size = path.stat().st_size
    assert f"size: {size:,} bytes" in out
    from deepcount.weights import sha256_file
    assert f"sha256: {sha256_file(path)}" in out
    assert re.search(r"export time: [0-9.]+ s", out)
    assert "opset 18" in out


def test_default_onnx_metadata_round_trips(default_onnx):
    path = default_onnx[0]
    meta = ex.read_metadata(path)
    entry = REGISTRY["csrnet-baseline"]  # what the fixture exports
    assert meta["model_name"] == entry.name
    assert meta["source_sha256"] == entry.sha256
    assert meta["architecture"] == entry.architecture
    assert meta["tiling"] == entry.tiling
    assert meta["outputs"] == {"count": ["N"], "density": ["N", 1, 48, 64]}  # CSRNet: its map
    assert meta["density_branch"] == 1 and meta["counts_by_map"] is True
    from deepcount import __version__
    assert meta["version"] == __version__
    # The same key/values as another reader (onnxruntime) sees them.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    custom = session.get_modelmeta().custom_metadata_map
    assert custom["deepcount.model_name"] == entry.name
    assert json.loads(custom["deepcount.architecture"]) == entry.architecture
    # One input with a dynamic batch dimension, outputs named as documented.
    model = onnx.load(str(path), load_external_data=False)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "tiles" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 384, 512]
    assert [o.name for o in model.graph.output] == ["count", "density"]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == ex.OPSET


def test_onnx_counter_matches_torch_on_real_tiles_at_batch_3_and_1(counter, onnx_counter, img1):
    # 4 tiles with batch_size=3: onnxruntime runs a batch of 3, then a batch of 1.
    t = counter.count(img1, density="48x64")
    o = onnx_counter.count(img1, density="48x64")
    assert o.tiles == t.tiles == 4
    assert rel(o.tile_counts, t.tile_counts) <= TOL
    assert rel(o.count, t.count) <= TOL and t.count > 1
    assert o.density.values.shape == t.density.values.shape == (96, 128)
    scale = np.abs(t.density.values).max()
    assert np.abs(o.density.values - t.density.values).max() / scale <= TOL
    assert onnx_counter.info["backend"] == "onnxruntime"


def test_cli_count_backend_onnxruntime(default_onnx, counter, img_small):
    # A 276x460 photo: one tile, mostly padding, whose map cells the count drops (by_map).
    rc, out, err = run_cli("count", "-q", "--backend", "onnxruntime", "--model", default_onnx[0],
                           img_small)
    assert rc == 0, out + err
    assert "onnxruntime" in err and "NOT a trained DeepCount" in err
    row = next(line for line in out.splitlines() if line.startswith(str(img_small)))
    expected = counter.count(img_small).count
    assert float(row.split()[1]) == pytest.approx(expected, abs=0.051)
    o = Counter.load(default_onnx[0], device="cpu").count(img_small)  # backend "auto": by suffix
    assert rel(o.count, expected) <= TOL


def test_csrnet_export_refuses_other_branches(tmp_path):
    rc, out, err = run_cli("export", "--format", "onnx", "--output", tmp_path / "x.onnx",
                           "--model", "csrnet-baseline", "--density", "24x32")
    assert rc == 2 and "CSRNet" in err and not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- small DeepCount
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A width-0.125 DeepCount with all five branches and non-trivial biases / PReLU slopes,
    saved as .safetensors with its description."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = DeepCount(width=0.125).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
        net.backbone.fc.weight.mul_(500)  # tile counts of ~10, not ~0.03: relative errors bite
        for branch in net.branches.values():  # maps above 0 where inference clamps them
            branch.predict.bias.add_(1.0)
    path = tmp_path_factory.mktemp("small") / "tiny.safetensors"
    described = {"name": "tiny", "architecture": architecture(net), "tiling": "pad",
                 "description": "tiny untrained DeepCount for tests"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"deepcount": json.dumps(described)})
    return path, net


@pytest.fixture(scope="module")
def tiles(img1, img_small):
    images = [(str(p), load_image(p)) for p in (img1, img_small)]
    return ex.real_tiles(images, limit=4)  # 4: batches of 3 and 1


@pytest.fixture(scope="module")
def small_count_onnx(small, tmp_path_factory):
    return ex.export(small[0], "onnx", tmp_path_factory.mktemp("c") / "count.onnx")


@pytest.fixture(scope="module")
def small_density_onnx(small, tmp_path_factory):
    return ex.export(small[0], "onnx", tmp_path_factory.mktemp("d") / "density.onnx", density="24x32")


def test_real_tiles_come_from_both_photos(tiles, img_small):
    assert tiles.shape == (4, 3, 384, 512)
    # The second tile is the small photo's: padded (zero after normalisation) right and bottom.
    assert tiles[1, :, 300:].abs().max() == 0 and tiles[1, :, :276, :460].abs().max() > 0


def test_count_only_graph_has_no_branch(small, small_count_onnx, small_density_onnx):
    result, graph = small_count_onnx
    assert result.outputs == ["count"] and graph.branch_index is None and graph.net.density_branches == ()
    count_model = onnx.load(str(result.path))
    density_model = onnx.load(str(small_density_onnx[0].path))
    ops = {n.op_type for n in count_model.graph.node}
    assert "ConvTranspose" not in ops and "Concat" not in ops
    assert "ConvTranspose" in {n.op_type for n in density_model.graph.node}
    assert not [i.name for i in count_model.graph.initializer if "branch" in i.name]
    assert [i.name for i in density_model.graph.initializer if i.name.startswith("net.branches.")]
    net = small[1]
    weights = sum(int(np.prod(i.dims)) for i in count_model.graph.initializer)
    smallest_branch = min(count_parameters(b) for b in net.branches.values())
    assert count_parameters(net.backbone) <= weights < count_parameters(net.backbone) + smallest_branch
    assert len(count_model.graph.node) < len(density_model.graph.node)
    assert [o.name for o in count_model.graph.output] == ["count"]


def test_onnx_parity_on_real_tiles(small, small_count_onnx, small_density_onnx, tiles):
    for result, graph in (small_count_onnx, small_density_onnx):
        report = ex.check_parity(ex.exported_fn(result.path, "onnx"), graph, tiles)
        assert [r.batch_size for r in report.rows] == [1, 3]
        assert report.passed and report.max_error <= TOL, report
    rows = ex.check_parity(ex.exported_fn(small_density_onnx[0].path, "onnx"),
                           small_density_onnx[1], tiles).rows
    assert all(r.density_error is not None and r.density_error <= TOL for r in rows)
    # Against the network itself (not the export wrapper): count and branch 2's map, clamped at
    # 0 as PyTorch inference clamps them (the count head and branches end linear).
    session = ort.InferenceSession(str(small_density_onnx[0].path), providers=["CPUExecutionProvider"])
    count, density = session.run(None, {"tiles": tiles[:3].numpy()})
    with torch.inference_mode():
        ref_count, ref_maps = small[1].forward_maps(tiles[:3], [2])
    assert density.shape == (3, 1, *MAP_SIZES[2])
    assert rel(count, ref_count.clamp_min(0)) <= TOL
    assert np.abs(density - ref_maps[2].clamp_min(0).numpy()).max() / ref_maps[2].abs().max().item() <= TOL


def test_parity_check_can_fail(small, small_count_onnx, tiles):
    torch.manual_seed(1)
    other = ex.CountGraph(DeepCount(width=0.125).eval())
    report = ex.check_parity(ex.exported_fn(small_count_onnx[0].path, "onnx"), other, tiles[:2])
    assert not report.passed and report.max_error > TOL


def test_cli_export_fails_with_exit_1_when_outputs_differ(small, img_small, tmp_path, monkeypatch):
    real = ex.exported_fn

    def off_by_a_bit(path, fmt, device="cpu"):
        run = real(path, fmt, device)
        return lambda x: [o + 1e-3 * o.abs().max().clamp_min(1) for o in run(x)]  # 1e-3 rel

    monkeypatch.setattr(ex, "exported_fn", off_by_a_bit)  # what the command checks with
    rc, out, _ = run_cli("export", "--format", "onnx", "--model", small[0], "--output",
                         tmp_path / "t.onnx", "--check-images", img_small)
    assert rc == 1 and re.search(r"^FAIL: ", out, re.M) and "PASS" not in out


@pytest.mark.offline
def test_the_commands_help_names_the_exporters_formats_and_defaults():
    import deepcount.cli.export as command

    assert (command.FORMATS, command.OPSET, command.EXAMPLE_PHOTO, command.EXAMPLE_RESCALE) == \
        (ex.FORMATS, ex.OPSET, ex.EXAMPLE_PHOTO, ex.EXAMPLE_RESCALE)


def test_torchscript_parity_and_metadata(small, tiles, tmp_path, img_small):
    rc, out, err = run_cli("export", "--format", "torchscript", "--model", small[0], "--density", "1",
                           "--output", tmp_path / "tiny.pt", "--check-images", img_small)
    assert rc == 0 and "PASS" in out, out + err
    graph = ex.CountGraph(small[1], 1).eval()
    report = ex.check_parity(ex.exported_fn(tmp_path / "tiny.pt", "torchscript"), graph, tiles)
    assert report.passed and all(r.density_error <= TOL for r in report.rows)
    meta = ex.read_metadata(tmp_path / "tiny.pt")
    assert meta["model_name"] == "tiny" and meta["density_branch"] == 1
    assert meta["architecture"]["branches"] == [1] and meta["architecture"]["width"] == 0.125
    assert meta["outputs"] == {"count": ["N"], "density": ["N", 1, 48, 64]}
    assert meta["exporter"].startswith("torch.jit.trace")
    # counting with it is refused without running it, saying how to count with what it came from
    rc, out, err = run_cli("count", "--model", tmp_path / "tiny.pt", img_small)
    assert rc == 2 and out == ""
    assert "a TorchScript file written by `deepcount export` from 'tiny'" in err
    assert "--model tiny, or its .safetensors file" in err and "--format onnx" in err


def test_onnx_counter_density_and_missing_branch(small, small_count_onnx, small_density_onnx, img1):
    ref = Counter(small[1], {"name": "tiny"}, torch.device("cpu")).count(img1, density=2)
    with_map = Counter.load(small_density_onnx[0].path, backend="onnxruntime", batch_size=3)
    got = with_map.count(img1, density="24x32")
    assert rel(got.count, ref.count) <= TOL and rel(got.tile_counts, ref.tile_counts) <= TOL
    assert got.density.values.shape == ref.density.values.shape == (48, 64)
    assert np.abs(got.density.values - ref.density.values).max() / np.abs(ref.density.values).max() <= TOL
    assert with_map.density_branches == (2,)
    with pytest.raises(ValueError, match="no density branch 1"):
        with_map.count(img1, density=1)
    count_only = Counter.load(small_count_onnx[0].path, backend="onnxruntime")
    assert rel(count_only.count(img1).count, ref.count) <= TOL
    with pytest.raises(ValueError, match="no density branch 1"):
        count_only.count(img1, density="48x64")
    with pytest.raises(ValueError, match="exported without --density"):
        count_only.model(torch.zeros(1, 3, 384, 512), (1,))  # the runner itself refuses too


def test_backend_onnxruntime_with_weights_exports_into_the_cache(small, img_small, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCOUNT_CACHE", str(tmp_path / "cache"))
    counter = Counter.load(small[0], backend="onnxruntime")
    cached = list((tmp_path / "cache" / "onnx").glob("tiny-*.onnx"))
    assert len(cached) == 1 and counter.info["file"] == str(cached[0])
    ref = Counter(small[1], {"name": "tiny"}, torch.device("cpu")).count(img_small)
    assert rel(counter.count(img_small).count, ref.count) <= TOL
    mtime = cached[0].stat().st_mtime_ns
    Counter.load(small[0], backend="onnxruntime")  # second use: the cached file, not re-exported
    assert cached[0].stat().st_mtime_ns == mtime


def test_garbage_or_tampered_onnx_is_refused(small_count_onnx, tmp_path, img_small):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 definitely not a protobuf \xff\xff\xff" * 50)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        Counter.load(garbage, backend="onnxruntime")
    # One weight changed in place: still a valid ONNX model, but not the exported one.
    data = bytearray(small_count_onnx[0].path.read_bytes())
    model = onnx.load_model_from_string(bytes(data))
    raw = max(model.graph.initializer, key=lambda i: len(i.raw_data)).raw_data
    at = data.find(raw) + len(raw) // 2
    data[at] ^= 0x40
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(bytes(data))
    onnx.load(str(tampered))  # parses fine
    with pytest.raises(ValueError, match="modified or damaged"):
        Counter.load(tampered)
    # An ONNX file that deepcount did not write (no metadata).
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="no deepcount metadata"):
        Counter.load(foreign, backend="onnxruntime")
    with pytest.raises(FileNotFoundError):
        Counter.load(tmp_path / "missing.onnx")
    rc, out, err = run_cli("count", "--backend", "onnxruntime", "--model", tampered, img_small)
    assert rc == 2 and "modified or damaged" in err


def test_dynamo_failure_falls_back_to_the_torchscript_exporter_and_says_so(small, img_small, tmp_path,
                                                                          monkeypatch):
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    rc, out, err = run_cli("export", "--format", "onnx", "--model", small[0], "--density", "3",
                           "--output", tmp_path / "fb.onnx", "--check-images", img_small)
    assert rc == 0 and "PASS" in out, out + err
    assert "dynamo=False" in out and "simulated dynamo failure" in out
    assert "dynamo=False" in ex.read_metadata(tmp_path / "fb.onnx")["exporter"]
    counter = Counter.load(tmp_path / "fb.onnx")
    ref = Counter(small[1], {"name": "tiny"}, torch.device("cpu")).count(img_small, density=3)
    got = counter.count(img_small, density="12x16")
    assert rel(got.count, ref.count) <= TOL and got.density.values.shape == ref.density.values.shape


def test_export_device_option_is_checked_before_exporting(tmp_path):
    out = tmp_path / "never.onnx"
    rc, _, err = run_cli("export", "--format", "onnx", "--output", out, "--device", "cuda")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one")
    assert rc == 2 and "CUDA" in err and not out.exists()
