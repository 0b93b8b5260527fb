"""``deepcount export``: a counting network as an ONNX or TorchScript file, checked against
PyTorch on real photos; and the onnxruntime runner behind ``Counter.load(..., backend="onnxruntime")``.

The exported graph takes normalised 384x512 tiles, ``tiles`` (N, 3, 384, 512) float32 with a
dynamic batch N (``deepcount.tiling`` makes them from an image of any size), and returns

* ``count`` (N,): the per-tile counts.  For a DeepCount this is the backbone alone: when no
  ``--density`` is asked for, the exported module holds no branch at all, so the graph has no
  branch weights and no transposed convolution;
* ``density`` (N, 1, h, w): with ``--density K`` (branch K, or its map size such as ``48x64``),
  that branch's map.  A CSRNet's count *is* the sum of its stride-8 map (48x64), so CSRNet
  exports always carry it (it costs nothing extra): ``Counter`` needs the map to drop the cells
  that lie wholly in a tile's padding, as the PyTorch path does.

What the file is travels with it: ONNX ``metadata_props`` / TorchScript ``_extra_files``
(``deepcount.json``) hold the deepcount version, model name and description, architecture,
sha256 of the source weights, outputs, density branch, tiling and exporter, so
``Counter.load("model.onnx")`` needs nothing else.  ONNX files also hold
``deepcount.graph_sha256``, the sha256 of the serialised graph (weights included): a file edited
after export is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .cache import atomic_path, cache_dir
from .model import (ARCHITECTURES, FEATURE_SIZE, FEATURE_STRIDE, INPUT_SIZE, MAP_SIZES, architecture, frontend_split,
                    parse_density)
from .engines import resolve_device
from .features import frontend_features, receptive_radius, windowed_features
from .images import load_image
from .tiling import feature_batches, plan_tiles, tile_batches
from .weights import DEFAULT_MODEL, REGISTRY, load_network, sha256_file

FORMATS = ("onnx", "torchscript")
# ai.onnx opset 18: what torch's dynamo exporter emits natively (no version conversion), run by
# every onnxruntime since 1.14 (1.32 supports up to 23).
OPSET = 18
INPUT_NAME = "tiles"
FEATURES_NAME = "features"  # the input of a `features`-tiled model: 48x64 tiles of features
IMAGE_NAME = "image"  # the input of its frontend file
FRONTEND_SUFFIX = ".frontend.onnx"  # <output stem> + this: the frozen frontend of such a model
META_PREFIX = "deepcount."
TORCHSCRIPT_META = "deepcount.json"
PARITY_THRESHOLD = 1e-4
CHECK_TILES = 3  # real tiles the parity check runs: one at a time, then as one batch of 3
CHECK_BATCH_SIZES = (1, 3)
EXAMPLE_PHOTO = "shanghaitech_b_test_IMG_1.jpg"  # examples/ in the repository
EXAMPLE_RESCALE = 0.6  # the built-in check's second image: the photo at 0.6x (padded tiles)


class ExportError(ValueError):
    """An export or an exported file that deepcount cannot use (bad request, unreadable or
    modified file)."""


# ----------------------------------------------------------------------------- the graph
class CountGraph(nn.Module):
    """What is exported: tiles -> ``count`` (N,) [, ``density`` (N, 1, h, w)].

    Holds only the modules its outputs need: a DeepCount's backbone, plus branch ``branch``
    when one is asked for; a CSRNet whole (count = its map's sum, the map always output).
    """

    def __init__(self, net: nn.Module, branch: int | None = None, level: str | None = None):
        super().__init__()
        if getattr(net, "arch_name", None) not in ARCHITECTURES:
            raise ExportError(f"not a deepcount network: {type(net).__name__}")
        self.counts_by_map = bool(net.counts_by_map)
        self.level = level  # tiling `features`: the input is 48x64 tiles of features at this level
        if level is not None and level not in net.feature_levels:
            raise ExportError(f"tiling 'features' needs a DeepCount, not a {type(net).__name__}")
        if self.counts_by_map:  # the count is the map's sum: the map is always output
            if branch not in (None, *net.density_branches):
                raise ExportError(f"a CSRNet has one density map, stride 8 ({_size(1)}, branch 1); "
                                  f"got branch {branch}")
            branch = net.density_branches[0]
        elif branch is not None and branch not in net.density_branches:
            raise ExportError(f"this DeepCount has no branch {branch} ({_size(branch)}); "
                              f"attached: {net.density_branches}")
        self.branch_index: int | None = branch
        self.net = net.with_branches(() if branch is None else (branch,))

    @property
    def output_names(self) -> list[str]:
        return ["count"] if self.branch_index is None else ["count", "density"]

    @property
    def input_name(self) -> str:
        return INPUT_NAME if self.level is None else FEATURES_NAME

    def example(self) -> Tensor:
        """An input for tracing (batch 2: the exporter must not specialise N to 1)."""
        if self.level is None:
            return torch.zeros(2, 3, *INPUT_SIZE)
        channels = self.net.frontend[frontend_split(self.level) - 2].out_channels
        return torch.zeros(2, channels, *FEATURE_SIZE)

    def forward(self, tiles: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        at = {"level": self.level} if self.level is not None else {}
        if self.branch_index is None:
            count = self.net(tiles, **at)
        else:
            count, maps = self.net.forward_maps(tiles, (self.branch_index,), **at)
        if not self.counts_by_map:  # counts and cells clamped at 0 as in PyTorch inference (linear heads)
            count = count.clamp_min(0)
            if self.branch_index is None:
                return count
            return count, maps[self.branch_index].clamp_min(0)
        return count, maps[self.branch_index]


class FrontendGraph(nn.Module):
    """The frozen part of a DeepCount's frontend, exported beside a ``features``-tiled model:
    a normalised image (1, 3, H, W), H and W multiples of 8 -> its features at ``level``
    (1, C, H/8, W/8).  :func:`deepcount.features.windowed_features` runs it window by window."""

    def __init__(self, frontend: nn.Sequential, level: str):
        super().__init__()
        self.level = level
        self.part = frontend[:frontend_split(level)]

    def forward(self, image: Tensor) -> Tensor:
        return self.part(image)

    def example(self) -> Tensor:
        return torch.zeros(1, 3, 96, 128)


def _size(branch: int | None) -> str:
    if branch not in MAP_SIZES:
        return "?"
    h, w = MAP_SIZES[branch]
    return f"{h}x{w}"


def prepare(model: str | os.PathLike = "default", density: int | str | None = None
            ) -> tuple[CountGraph, dict[str, str]]:
    """The module to export for ``model`` (registry name or ``.safetensors`` path) and the
    metadata that goes into the file."""
    net, info = load_network(model)
    level = (info.get("feature_level") or "conv4_3") if info.get("tiling") == "features" else None
    graph = CountGraph(net, parse_density(density), level).eval()
    return graph, metadata(graph, info)


def metadata(graph: CountGraph, info: dict) -> dict[str, str]:
    """The ``deepcount.*`` key/value strings written into an exported file."""
    arch = architecture(graph.net)
    described = {k: v for k, v in info.items() if k != "file"}
    branch = graph.branch_index
    outputs = {"count": ["N"]}
    if branch is not None:
        outputs["density"] = ["N", 1, *MAP_SIZES[branch]]
    meta = {
        "version": __version__,
        "model_name": str(info.get("name", "?")),
        "description": str(info.get("description") or ""),
        "architecture": json.dumps(arch, sort_keys=True),
        "source_architecture": json.dumps(info["architecture"], sort_keys=True),
        "source_sha256": str(info.get("sha256", "")),
        "outputs": json.dumps(outputs),
        "density_branch": "" if branch is None else str(branch),
        "counts_by_map": json.dumps(graph.counts_by_map),
        "tiling": str(info.get("tiling", "pad")),
        "feature_level": graph.level or "",
        "input": json.dumps(
            {"name": INPUT_NAME, "shape": ["N", 3, *INPUT_SIZE], "dtype": "float32",
             "normalisation": "RGB / 255, ImageNet mean and std", "padding": "0 (the mean) right and bottom"}
            if graph.level is None else
            {"name": FEATURES_NAME, "shape": ["N", int(graph.example().shape[1]), *FEATURE_SIZE],
             "dtype": "float32", "features": f"the frontend's at {graph.level} (the {FRONTEND_SUFFIX} file: "
             f"{IMAGE_NAME} (1,3,H,W) normalised, H and W multiples of 8 -> (1,C,H/8,W/8))",
             "padding": "0 right and bottom"}),
        "info": json.dumps(described, sort_keys=True, default=str),
    }
    return {META_PREFIX + k: v for k, v in meta.items()}


# ----------------------------------------------------------------------------- writers
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' warnings and log lines (missing torchvision ops, deprecations,
    tracer notes on the constant input-size check) off the terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                              "onnxscript", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def graph_digest(model: Any) -> str:
    """sha256 of an ONNX model's serialised graph (nodes and weights; not its metadata)."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def onnx_model(graph: CountGraph | FrontendGraph, opset: int = OPSET) -> tuple[Any, str]:
    """The ONNX ModelProto of ``graph`` and a line naming the exporter used: torch's dynamo
    exporter (dynamic batch, or for a frontend dynamic height and width, via
    ``dynamic_shapes``); if that fails, the TorchScript-based one (``dynamo=False``,
    ``dynamic_axes``), and the line says why."""
    import onnx

    if isinstance(graph, FrontendGraph):
        names, inp = ["features"], IMAGE_NAME
        dims = {2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)}
        axes = {IMAGE_NAME: {2: "height", 3: "width"}, "features": {2: "h8", 3: "w8"}}
    else:
        names, inp = graph.output_names, graph.input_name
        dims = {0: torch.export.Dim("batch", min=1)}
        axes = {n: {0: "batch"} for n in [inp, *names]}
    example = graph.example()
    with _quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(
                graph, (example,), dynamo=True, verbose=False, opset_version=opset,
                input_names=[inp], output_names=names, dynamic_shapes=(dims,))
            return program.model_proto, f"torch.onnx dynamo exporter (torch {torch.__version__}), opset {opset}"
        except Exception as e:  # noqa: BLE001 - any exporter failure: fall back, and say so
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "graph.onnx"
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[inp], output_names=names, dynamic_axes=axes)
            model = onnx.load(str(path))
    return model, (f"torch.onnx TorchScript-based exporter (dynamo=False, torch {torch.__version__}), "
                   f"opset {opset}; the dynamo exporter failed: {reason}")


def frontend_path(path: str | os.PathLike) -> Path:
    """Where the frontend of a ``features``-tiled export lives: beside it, ``<stem>.frontend.onnx``."""
    path = Path(path)
    return path.with_name(path.stem + FRONTEND_SUFFIX)


def write_onnx(graph: CountGraph, meta: dict[str, str], path: str | os.PathLike,
               opset: int = OPSET, frontend: FrontendGraph | None = None) -> str:
    """Export ``graph`` to ``path`` (one self-contained file) with ``meta`` and the graph
    digest in its metadata_props; returns the exporter line.  A ``features``-tiled model also
    needs its ``frontend``: written first to :func:`frontend_path`, its graph digest recorded
    in the main file (so the pair is checked together)."""
    if frontend is not None:
        front, _ = onnx_model(frontend, opset)
        front.producer_name, front.producer_version = "deepcount", __version__
        entry = front.metadata_props.add()
        entry.key, entry.value = META_PREFIX + "frontend_of", str(meta.get(META_PREFIX + "model_name", ""))
        _atomic_write(frontend_path(path), front.SerializeToString(deterministic=True))
        meta = {**meta, META_PREFIX + "frontend_file": frontend_path(path).name,
                META_PREFIX + "frontend_graph_sha256": graph_digest(front)}
    model, exporter = onnx_model(graph, opset)
    model.producer_name, model.producer_version = "deepcount", __version__
    model.doc_string = meta.get(META_PREFIX + "description", "")
    props = {**meta, META_PREFIX + "exporter": exporter, META_PREFIX + "opset": str(opset),
             META_PREFIX + "graph_sha256": graph_digest(model)}
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    _atomic_write(Path(path), model.SerializeToString(deterministic=True))
    return exporter


def write_torchscript(graph: CountGraph, meta: dict[str, str], path: str | os.PathLike) -> str:
    """``torch.jit.trace`` of ``graph`` saved with ``meta`` as ``_extra_files``
    (``deepcount.json``); returns the exporter line.  The traced graph runs any batch size."""
    if graph.level is not None:
        raise ExportError("a model counted with tiling 'features' exports to ONNX only (two files: "
                          "the frozen frontend and the rest); use --format onnx")
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(graph, (graph.example(),), check_trace=False)
    exporter = f"torch.jit.trace (torch {torch.__version__})"
    extra = {TORCHSCRIPT_META: json.dumps({**meta, META_PREFIX + "exporter": exporter}, indent=1)}
    with _quiet(), atomic_path(path) as tmp:  # torch.jit.save warns that TorchScript is deprecated
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    return exporter


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ----------------------------------------------------------------------------- readers
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``deepcount.*`` metadata of an exported ``.onnx`` or TorchScript file, prefix
    stripped and JSON values decoded."""
    path = Path(path)
    if _is_onnx(path):
        raw = {p.key: p.value for p in _load_onnx(path).metadata_props}
    else:
        extra = {TORCHSCRIPT_META: ""}
        try:
            with _quiet():
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{path}: not a readable TorchScript file ({_first_line(e)})") from e
        raw = json.loads(extra[TORCHSCRIPT_META] or "{}")
    return _decode_meta(raw, path)


def _decode_meta(raw: dict[str, str], path: Path) -> dict[str, Any]:
    meta = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
    if "version" not in meta or "outputs" not in meta:
        raise ExportError(f"{path}: no deepcount metadata; only files written by "
                          "`deepcount export` can be loaded")
    for key in ("architecture", "source_architecture", "outputs", "counts_by_map", "input", "info", "quantization"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    meta["density_branch"] = int(meta["density_branch"]) if meta.get("density_branch") else None
    return meta


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _load_onnx(path: Path, data: bytes | None = None) -> Any:
    """The ModelProto of ``path``, refused (ExportError) when unreadable or not deepcount's."""
    import onnx

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load_model_from_string(data if data is not None else path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ExportError(f"{path}: not a readable ONNX model ({_first_line(e)})") from e
    if not len(model.graph.node):
        raise ExportError(f"{path}: not a readable ONNX model (no graph)")
    return model


def verify_onnx(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The decoded metadata of a deepcount ONNX file after checking that its graph is the one
    exported (sha256 in its metadata); ExportError otherwise."""
    path = Path(path)
    model = _load_onnx(path, data)
    meta = _decode_meta({p.key: p.value for p in model.metadata_props}, path)
    expected = meta.get("graph_sha256", "")
    if graph_digest(model) != expected:
        raise ExportError(f"{path}: the graph does not match the sha256 recorded at export "
                          f"({expected[:16] or 'none'}...); the file was modified or damaged, "
                          "and was not loaded. Export it again with `deepcount export`.")
    return meta


# ----------------------------------------------------------------------------- runners
ExportedFn = Callable[[Tensor], list[Tensor]]  # (N,3,384,512) -> [count (N,), density (N,1,h,w)?]


def onnx_providers(device: str | torch.device = "auto") -> list:
    """onnxruntime providers for ``device``: CUDA first when asked (or ``auto``) and available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    kind = str(device).split(":")[0]
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if kind == "cuda" and "CUDAExecutionProvider" not in available:
        raise ValueError("device 'cuda' asked for, but onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu)")
    if kind in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        index = torch.device(device).index if kind == "cuda" else None
        cuda = ("CUDAExecutionProvider", {"device_id": index}) if index else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path: str | os.PathLike, device: str | torch.device = "auto"
                 ) -> tuple[Any, dict[str, Any]]:
    """A verified onnxruntime InferenceSession of a deepcount ONNX file and its metadata."""
    import onnxruntime as ort

    path = Path(path)
    data = path.read_bytes() if path.is_file() else None
    meta = verify_onnx(path, data)
    try:
        session = ort.InferenceSession(data, providers=onnx_providers(device))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
        raise ExportError(f"{path}: onnxruntime cannot run this model ({_first_line(e)})") from e
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    expected = FEATURES_NAME if meta.get("feature_level") else INPUT_NAME
    if inputs != [expected] or outputs != list(meta["outputs"]):
        raise ExportError(f"{path}: inputs {inputs} / outputs {outputs} are not the ones its "
                          f"metadata describes ({expected!r} / {list(meta['outputs'])})")
    if meta.get("feature_level"):
        meta["frontend_session"] = frontend_session(path, meta, device)
    return session, meta


def frontend_session(path: Path, meta: dict[str, Any], device: str | torch.device = "auto") -> Any:
    """The onnxruntime session of a ``features``-tiled export's frontend file, after checking
    its graph is the one exported with ``path``."""
    import onnxruntime as ort

    front = path.with_name(str(meta.get("frontend_file") or frontend_path(path).name))
    if not front.is_file():
        raise ExportError(f"{path}: its frontend file {front.name} is missing (export writes both; "
                          "keep them side by side)")
    data = front.read_bytes()
    if graph_digest(_load_onnx(front, data)) != meta.get("frontend_graph_sha256"):
        raise ExportError(f"{front}: not the frontend exported with {path.name} (graph sha256 differs); "
                          "export again with `deepcount export`")
    try:
        return ort.InferenceSession(data, providers=onnx_providers(device))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{front}: onnxruntime cannot run this model ({_first_line(e)})") from e


class OnnxRunner:
    """The :class:`deepcount.engines.Runner` of an onnxruntime session: (tiles, branches) ->
    (counts (b,), {branch: map (b, h, w)}); the file holds at most one branch.  ``counts_by_map``
    (CSRNet) tells ``count_tiles`` to count by the map so that cells wholly in a tile's padding
    are dropped."""

    def __init__(self, session: Any, meta: dict[str, Any]):
        self.session = session
        self.meta = meta
        self.branch: int | None = meta["density_branch"]
        self.counts_by_map = bool(meta.get("counts_by_map", False))
        self.level: str | None = meta.get("feature_level") or None
        self.input_name = FEATURES_NAME if self.level else INPUT_NAME

    def frontend(self, image: np.ndarray) -> Tensor:
        """Features (C, H/8, W/8) of an (H, W, 3) uint8 image by the exported frontend, window
        by window (tiling ``features``)."""

        session = self.meta["frontend_session"]

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(["features"], {IMAGE_NAME: x.numpy()})[0])
        return windowed_features(run, image, receptive_radius(None, str(self.level)))

    def __call__(self, batch: Tensor, branches: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        for branch in branches:
            if branch != self.branch:
                raise ValueError(f"this ONNX model has no density branch {branch} ({_size(branch)}); "
                                 + (f"it was exported with branch {self.branch} ({_size(self.branch)})"
                                    if self.branch else "it was exported without --density"))
        names = ["count", "density"] if branches else ["count"]
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        out = self.session.run(names, {self.input_name: x})
        counts = torch.from_numpy(out[0])
        return counts, ({self.branch: torch.from_numpy(out[1])[:, 0]} if branches else {})


def load_onnx_runner(path: str | os.PathLike, device: str | torch.device = "auto"
                     ) -> tuple[OnnxRunner, dict]:
    """What ``Counter.load(path, backend="onnxruntime")`` runs: the runner and the Counter's
    ``info`` (name, description, architecture, source sha256, tiling, exported branches)."""
    from .extras import require

    require("export", "onnxruntime")  # MissingExtraError (an ImportError) saying how to install it
    session, meta = onnx_session(path, device)
    info = dict(meta.get("info") or {})
    info.update({
        "name": meta["model_name"],
        "description": (meta.get("description") or f"exported {meta['model_name']}")
        + f" [ONNX{', int8' if meta.get('quantization') else ''}, onnxruntime {session.get_providers()[0]}: {path}]",
        "architecture": meta["architecture"],
        "sha256": meta.get("source_sha256", ""),
        "tiling": meta.get("tiling", "pad"),
        "feature_level": meta.get("feature_level") or None,
        "file": str(path),
        "backend": "onnxruntime",
        "providers": session.get_providers(),
        "branches": [meta["density_branch"]] if meta["density_branch"] is not None else [],
        "export": {k: meta[k] for k in ("version", "exporter", "opset", "graph_sha256", "quantization") if k in meta},
    })
    return OnnxRunner(session, meta), info


def cached_onnx(name_or_path: str | os.PathLike = "default") -> Path:
    """The ONNX export of a registered model or ``.safetensors`` file in the user cache
    (``deepcount/onnx``), exported on first use (count only; a CSRNet with its map), keyed by
    the weights' sha256 and the deepcount version."""

    key = str(name_or_path)
    name = DEFAULT_MODEL if key == "default" else key
    if name in REGISTRY:
        sha = REGISTRY[name].sha256
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file (nor a registered model name)")
        name, sha = path.stem, sha256_file(path)
    target = cache_dir("onnx") / f"{name}-{sha[:16]}-deepcount{__version__}.onnx"
    if not target.exists():
        graph, meta = prepare(name_or_path)
        if meta[META_PREFIX + "source_sha256"] != sha:
            raise ExportError(f"{name_or_path}: weights changed while exporting")
        write_onnx(graph, meta, target, frontend=frontend_graph(graph))
    return target


def exported_fn(path: str | os.PathLike, fmt: str, device: str = "cpu") -> ExportedFn:
    """The exported file as a function of a batch of (CPU) tiles, for the parity check, run
    on ``device`` (onnxruntime's provider, or TorchScript's device); outputs on the CPU."""
    if fmt == "onnx":
        session, meta = onnx_session(path, device)
        names = list(meta["outputs"])
        inp = FEATURES_NAME if meta.get("feature_level") else INPUT_NAME
        return lambda x: [torch.from_numpy(a) for a in session.run(names, {inp: x.numpy()})]
    dev = resolve_device(device)
    with _quiet():
        module = torch.jit.load(str(path), map_location=dev).eval()

    def run(x: Tensor) -> list[Tensor]:
        with torch.inference_mode():
            out = module(x.to(dev))
        return [o.cpu() for o in (out if isinstance(out, (tuple, list)) else [out])]
    return run


# ----------------------------------------------------------------------------- parity check
@dataclass
class ParityRow:
    batch_size: int
    tiles: int
    count_error: float
    density_error: float | None


@dataclass
class ParityReport:
    """Exported vs PyTorch on real tiles.  Count error: max over tiles of |a - b| / max(|b|, 1)
    (relative; absolute below one person).  Density error: max |A - B| / max |B| per tile,
    i.e. relative to the map's peak."""

    rows: list[ParityRow]
    threshold: float = PARITY_THRESHOLD
    sources: list[str] = field(default_factory=list)
    frontend_error: float | None = None  # a features-tiled export's frontend file: max |A - B| / max |B|

    @property
    def max_error(self) -> float:
        errs = [r.count_error for r in self.rows] + [r.density_error for r in self.rows
                                                      if r.density_error is not None]
        if self.frontend_error is not None:
            errs.append(self.frontend_error)
        return max(errs) if errs else math.inf

    @property
    def passed(self) -> bool:
        return bool(self.rows) and self.max_error <= self.threshold  # NaN fails


def check_images(paths: Sequence[str | os.PathLike] | None = None
                 ) -> list[tuple[str, np.ndarray]]:
    """The real photos the check runs on: ``paths``, or the repository's example photo and the
    same photo at 0.6x (a second size, whose tiles are partly padding)."""
    from PIL import Image


    if paths:
        return [(str(p), load_image(p)) for p in paths]
    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        photo = root / "examples" / EXAMPLE_PHOTO
        if photo.is_file():
            break
    else:
        raise ExportError(f"the example photo examples/{EXAMPLE_PHOTO} is not here (installed "
                          "without the repository); pass real photos with --check-images")
    image = load_image(photo)
    h, w = image.shape[:2]
    size = (round(w * EXAMPLE_RESCALE), round(h * EXAMPLE_RESCALE))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    rel = os.path.relpath(photo) if not os.path.relpath(photo).startswith("..") else str(photo)
    return [(rel, image), (f"{rel} at {EXAMPLE_RESCALE}x", small)]


def real_tiles(images: Sequence[tuple[str, np.ndarray]], tiling: str = "pad",
               limit: int = CHECK_TILES, graph: CountGraph | None = None) -> Tensor:
    """Up to ``limit`` normalised tiles, taken in turn from each image (its first tile, then
    its second, ...), as ``count_tiles`` makes them (tiling ``features``: tiles of the
    features of ``graph``'s PyTorch frontend)."""

    per_image = []
    for _, image in images:
        plan = plan_tiles(image.shape[0], image.shape[1], tiling)
        if tiling == "features":
            assert graph is not None and graph.level is not None, "tiling features needs the graph"
            feats = frontend_features(graph.net.frontend, image, graph.level)
            batches = feature_batches(feats, plan, batch_size=limit)
        else:
            batches = tile_batches(image, plan, batch_size=limit)
        per_image.append(torch.cat([b for b, _ in batches])[:limit])
    picked: list[Tensor] = []
    for i in range(limit):
        picked += [t[i] for t in per_image if i < len(t)]
    return torch.stack(picked[:limit])


def check_parity(exported: ExportedFn, graph: nn.Module, tiles: Tensor,
                 batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
                 threshold: float = PARITY_THRESHOLD, device: str = "cpu") -> ParityReport:
    """Run ``exported`` on ``tiles`` in batches of each size and compare with ``graph``
    (PyTorch, run on ``device``)."""
    dev = resolve_device(device)
    with torch.inference_mode():
        ref = graph.to(dev)(tiles.to(dev))
    ref = [r.double().cpu() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
    rows = []
    for bs in batch_sizes:
        outs = [exported(tiles[i:i + bs].contiguous()) for i in range(0, len(tiles), bs)]
        got = [torch.cat([o[j] for o in outs]).double() for j in range(len(outs[0]))]
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
            raise ExportError(f"exported outputs {[tuple(g.shape) for g in got]} at batch {bs} "
                              f"do not match PyTorch's {[tuple(r.shape) for r in ref]}")
        count_err = float(((got[0] - ref[0]).abs() / ref[0].abs().clamp_min(1.0)).max())
        density_err = None
        if len(ref) > 1:
            diff = (got[1] - ref[1]).abs().flatten(1).amax(1)
            scale = ref[1].abs().flatten(1).amax(1).clamp_min(1e-12)
            density_err = float((diff / scale).max())
        rows.append(ParityRow(bs, len(tiles), count_err, density_err))
    return ParityReport(rows, threshold)


def check_frontend(path: Path, graph: CountGraph, images: Sequence[tuple[str, np.ndarray]],
                   device: str = "cpu") -> float:
    """A ``features``-tiled export's frontend file against PyTorch's frontend over whole real
    images (window by window, as counting runs it): the largest error relative to the peak."""

    runner, _ = load_onnx_runner(path, device)
    worst = 0.0
    for _, image in images:
        ref = frontend_features(graph.net.frontend.cpu(), image, str(graph.level))
        got = runner.frontend(image)
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


# ----------------------------------------------------------------------------- command
@dataclass
class ExportResult:
    path: Path
    format: str
    exporter: str
    seconds: float
    size: int
    sha256: str
    metadata: dict[str, str]
    outputs: list[str]


def export(model: str | os.PathLike = "default", fmt: str = "onnx",
           output: str | os.PathLike = "deepcount.onnx", density: int | str | None = None,
           opset: int = OPSET) -> tuple[ExportResult, CountGraph]:
    """Export ``model`` to ``output``; returns what was written and the PyTorch module it is
    a copy of (for :func:`check_parity`)."""

    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output)
    if fmt == "onnx" and not _is_onnx(output):
        raise ExportError(f"{output}: an ONNX file must end in .onnx (Counter picks the "
                          "backend by it)")
    if output.parent and not output.parent.is_dir():
        raise ExportError(f"{output.parent}: no such folder")
    graph, meta = prepare(model, density)
    start = time.perf_counter()
    if fmt == "onnx":
        exporter = write_onnx(graph, meta, output, opset, frontend_graph(graph))
    else:
        exporter = write_torchscript(graph, meta, output)
    seconds = time.perf_counter() - start
    result = ExportResult(output, fmt, exporter, seconds, output.stat().st_size,
                          sha256_file(output), meta, graph.output_names)
    return result, graph


def frontend_graph(graph: CountGraph) -> FrontendGraph | None:
    """The frontend file's module of a ``features``-tiled graph (None otherwise)."""
    if graph.level is None:
        return None
    return FrontendGraph(graph.net.frontend, graph.level).eval()


# ----------------------------------------------------------------------------- int8
def _conv_nodes(model: Any) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def calibration_inputs(path: str | os.PathLike, images: Sequence[str | os.PathLike]
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What a deepcount ONNX export sees when it counts ``images``: the frontend file's inputs
    (the normalised windows of each image; empty for a model without one) and the count
    graph's inputs (one tile at a time), as float32 arrays for onnxruntime's calibration."""
    session, meta = onnx_session(path, "cpu")
    runner = OnnxRunner(session, meta)
    windows: list[np.ndarray] = []
    tiles: list[np.ndarray] = []
    for image_path in images:
        image = load_image(image_path)
        if runner.level:
            front = meta["frontend_session"]

            def run(x: Tensor) -> Tensor:
                windows.append(np.ascontiguousarray(x.numpy(), dtype=np.float32))
                return torch.from_numpy(front.run(["features"], {IMAGE_NAME: windows[-1]})[0])
            feats = windowed_features(run, image, receptive_radius(None, str(runner.level)))
            h, w = feats.shape[-2] * FEATURE_STRIDE, feats.shape[-1] * FEATURE_STRIDE
            batches = feature_batches(feats, plan_tiles(h, w, "features"), 1)
        else:
            batches = tile_batches(image, plan_tiles(*image.shape[:2], "pad"), 1, channels_last=False)
        tiles += [np.ascontiguousarray(b.numpy(), dtype=np.float32) for b, _ in batches]
    return windows, tiles


def quantize_int8(path: str | os.PathLike, output: str | os.PathLike, images: Sequence[str | os.PathLike],
                  count_convs: int | None = None) -> dict[str, Any]:
    """An int8 copy of the deepcount ONNX export ``path`` at ``output`` (and, for a
    ``features``-tiled model, its frontend file beside it), loadable like any export.

    onnxruntime's static quantization (``quantize_static``, QDQ format): int8 weights per output
    channel in a 7-bit range (``reduce_range``: on x86 CPUs without VNNI, onnxruntime's uint8 x
    int8 products saturate with full-range weights; on a 2-core AVX2 EPYC a test frontend's
    features moved by 11% with them, by under 5% without), uint8 activations whose ranges are
    the minimum and maximum seen while counting ``images`` (calibration: give training images, never the test images the result is judged
    on).  The frontend file's convolutions are all quantized; of the count graph's, the first
    ``count_convs`` in graph order (None: all).  Later ones are left in float32 where their
    inputs' ranges are too wide for 256 levels: on the ShanghaiTech B model, quantizing one
    middle convolution of the backbone alone moved a count by a third (docs/PERFORMANCE.md).
    Returns what was done (written into the file's metadata as ``deepcount.quantization``)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path, output = Path(path), Path(output)
    if not _is_onnx(output) or output.resolve() == path.resolve():
        raise ExportError(f"{output}: the int8 copy needs an .onnx name of its own")
    if not images:
        raise ExportError("int8 calibration needs at least one image")
    source = _load_onnx(path)
    meta = {p.key: p.value for p in source.metadata_props}
    windows, tiles = calibration_inputs(path, images)

    class Reader(CalibrationDataReader):
        def __init__(self, name: str, arrays: list[np.ndarray]):
            self.items = iter([{name: a} for a in arrays])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    def quantize(src: Path, dst: Path, name: str, arrays: list[np.ndarray], convs: int | None) -> tuple[Any, list[str]]:
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            nodes = _conv_nodes(onnx.load(str(pre)))
            chosen = nodes if convs is None else nodes[:convs]
            quantize_static(str(pre), str(out), Reader(name, arrays), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8,
                            op_types_to_quantize=["Conv"], nodes_to_quantize=chosen)
            model = onnx.load(str(out))
        model.producer_name, model.producer_version = "deepcount", __version__
        return model, chosen

    done: dict[str, Any] = {
        "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
        "weights": "int8 in a 7-bit range (reduce_range), per output channel", "activations": "uint8, MinMax ranges",
        "calibration": {"images": [Path(p).name for p in images], "tiles": len(tiles), "windows": len(windows)},
        "source_graph_sha256": meta.get(META_PREFIX + "graph_sha256", "")}
    props = dict(meta)
    if meta.get(META_PREFIX + "feature_level"):
        front_src = path.with_name(meta.get(META_PREFIX + "frontend_file") or frontend_path(path).name)
        front, chosen = quantize(front_src, frontend_path(output), IMAGE_NAME, windows, None)
        del front.metadata_props[:]
        for p in _load_onnx(front_src).metadata_props:
            entry = front.metadata_props.add()
            entry.key, entry.value = p.key, p.value
        _atomic_write(frontend_path(output), front.SerializeToString(deterministic=True))
        done["frontend_convs"] = f"all {len(chosen)}"
        props.update({META_PREFIX + "frontend_file": frontend_path(output).name,
                      META_PREFIX + "frontend_graph_sha256": graph_digest(front)})
    model, chosen = quantize(path, output, FEATURES_NAME if meta.get(META_PREFIX + "feature_level") else INPUT_NAME,
                             tiles, count_convs)
    done["count_convs"] = f"the first {len(chosen)} of {len(_conv_nodes(source))}"
    props.update({META_PREFIX + "quantization": json.dumps(done, sort_keys=True),
                  META_PREFIX + "graph_sha256": graph_digest(model)})
    model.doc_string = source.doc_string
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    _atomic_write(output, model.SerializeToString(deterministic=True))
    return done
