"""deepcount.remote: a dataset packed into chunks and unpacked elsewhere hash-checked, weights
sent back as float16 shards and joined hash-checked, the start file of a remote run."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepcount.model import DeepCount
from deepcount.remote import join_shards, pack, start_file, unpack, write_shards
from deepcount.training import checkpoint_state
from deepcount.weights import load_network


def test_pack_unpack_round_trip_on_shanghaitech_b(data_root, tmp_path):
    part = data_root / "ShanghaiTech" / "part_B_final" / "train_data"
    files = [part / "images" / f"IMG_{i}.jpg" for i in (1, 2, 3)] + \
            [part / "ground_truth" / f"GT_IMG_{i}.mat" for i in (1, 2, 3)]
    chunks = pack(files, data_root, tmp_path / "packed", chunk_bytes=300_000)
    assert len(chunks) >= 2  # three ~100-200 kB images do not fit one 300 kB chunk
    for c in chunks:  # the files a chunk holds add up to the size asked for (or it is one file)
        with tarfile.open(c) as tar:
            sizes = [m.size for m in tar.getmembers()]
        assert sum(sizes) <= 300_000 or len(sizes) == 1
    with pytest.raises(FileExistsError):
        pack(files, data_root, tmp_path / "packed", chunk_bytes=300_000)
    manifest = tmp_path / "packed" / "manifest.json"
    # the chunks of two loads, unpacked one load at a time
    assert unpack(chunks[:1], manifest, tmp_path / "there") + unpack(chunks[1:], manifest, tmp_path / "there") == 6
    for f in files:
        assert (tmp_path / "there" / f.relative_to(data_root)).read_bytes() == f.read_bytes()
    # the remote's loader sees the dataset in its layout
    from deepcount.datasets import load_dataset
    assert len(load_dataset("shb", tmp_path / "there" / "ShanghaiTech", "train")) == 3


def test_unpack_refuses_a_changed_file(data_root, tmp_path):
    gt = data_root / "ShanghaiTech" / "part_B_final" / "train_data" / "ground_truth" / "GT_IMG_1.mat"
    (chunk,) = pack([gt], data_root, tmp_path / "packed", chunk_bytes=1 << 20)
    spec = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    spec["files"][0]["sha256"] = "0" * 64
    (tmp_path / "packed" / "manifest.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="GT_IMG_1.mat: sha256"):
        unpack([chunk], tmp_path / "packed" / "manifest.json", tmp_path / "there")


def _small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = DeepCount(width=0.125, branches=[4]).to(memory_format=torch.channels_last)  # as training keeps it
    return net.state_dict()


@pytest.mark.offline
def test_shards_round_trip_under_the_size_and_float16(tmp_path):
    state = _small_state()
    manifest = write_shards(state, tmp_path / "out", "m", max_bytes=200_000, sidecar={"architecture": {"x": 1}})
    spec = json.loads(manifest.read_text())
    assert len(spec["shards"]) >= 2
    for shard in spec["shards"]:
        tensors = load_file(str(tmp_path / "out" / shard["file"]))
        big = max(t.numel() * t.element_size() for t in tensors.values())
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= max(200_000, big)
    joined = join_shards(manifest, tmp_path / "back" / "m.safetensors")
    got = load_file(str(joined))
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.half())
    side = json.loads(joined.with_suffix(".json").read_text())
    assert side["architecture"] == {"x": 1} and side["dtype"] == "float16"
    with pytest.raises(FileExistsError):
        join_shards(manifest, joined)
    lone = tmp_path / "back" / "n.json"  # a sidecar without its file is not overwritten either
    lone.write_text("{}")
    with pytest.raises(FileExistsError):
        join_shards(manifest, lone.with_suffix(".safetensors"))
    assert lone.read_text() == "{}" and not lone.with_suffix(".safetensors").exists()


@pytest.mark.offline
def test_join_refuses_a_changed_or_missing_shard(tmp_path):
    manifest = write_shards(_small_state(), tmp_path / "out", "m", max_bytes=200_000)
    spec = json.loads(manifest.read_text())
    first = tmp_path / "out" / spec["shards"][0]["file"]
    tensors = load_file(str(first))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(first), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="sha256"):
        join_shards(manifest, tmp_path / "a.safetensors")
    first.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        join_shards(manifest, tmp_path / "b.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


@pytest.mark.offline
def test_checkpoint_state_and_start_file_load_as_the_network(tmp_path):
    state = _small_state()
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 3}, tmp_path / "best.ckpt")
    got = checkpoint_state(tmp_path / "best.ckpt")
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    dst = start_file(str(src), tmp_path / "start.safetensors")
    net, info = load_network(dst)
    assert info["architecture"]["branches"] == [4]
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k].half().float())
    with pytest.raises(FileExistsError):
        start_file(str(src), dst)


@pytest.mark.offline
def test_command_line_joins_and_refuses_with_exit_code_2(tmp_path, capsys):
    from deepcount.cli import main

    manifest = write_shards(_small_state(), tmp_path / "out", "m", max_bytes=200_000)
    assert main(["remote", "join", str(manifest), str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m.json").is_file()
    before = (tmp_path / "m.safetensors").read_bytes()
    assert main(["remote", "join", str(manifest), str(tmp_path / "m.safetensors")]) == 2
    assert "nothing was overwritten" in capsys.readouterr().err
    assert (tmp_path / "m.safetensors").read_bytes() == before
    (tmp_path / "out" / "m.shard-000.safetensors").write_bytes(b"not a shard")
    assert main(["remote", "join", str(manifest), str(tmp_path / "n.safetensors")]) == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "n.safetensors").exists()
