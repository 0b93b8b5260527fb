"""Evaluation (Section 4.1, eq. 5-6): MAE and RMSE of every output of a model on a test split.

>>> from deepcount.datasets import load_dataset
>>> from deepcount.evaluation import evaluate
>>> result = evaluate("weights.safetensors", load_dataset("shb", None, "test"))
>>> result.metrics["count"]            # {"mae": ..., "rmse": ..., "n": 316}  (the backbone)
>>> result.metrics["branch1"]          # branch 1's 48x64 maps, summed (Table 7)
>>> result.write("runs/evaluation/shb")     # evaluation.json, evaluation.md, per_image.csv

``deepcount evaluate --model W --dataset shb --split test`` does the same from the shell.

Outputs evaluated:

* ``count``: what the model counts, exactly what :class:`deepcount.Counter` (and
  ``deepcount count``) reports for the image: a DeepCount's backbone count summed over the
  tiles, or a CSRNet's density-map sum.
* ``branch1`` ... ``branch5`` (a DeepCount's attached branches, Table 7): the sum of the
  branch's density maps over the image.  All branches of a batch of tiles come from ONE
  ``forward_maps`` call.

Decisions:

* Padding (``pad`` tiling).  A branch map's sum leaves out the cells that lie wholly in the
  padding and keeps every cell that covers some image pixels: it is the sum of the stitched
  map :class:`deepcount.tiling.DensityMap` that ``Counter.count(image, density=k)`` returns,
  and the same rule by which a CSRNet's count leaves out its padding cells.  The backbone
  regresses one number per 384x512 tile, so its count is the sum over the tiles, padding
  included (as ``Counter`` does; the network is trained on padded crops whose padding holds
  no people).  ``grid`` tiling has no padding.
* Ground truth (``protocol``).  ``points`` (the standard, and the default): the number of
  annotated heads.  ``blurred`` (the authors' code): the sum of the image's full-resolution
  Gaussian density map under a :class:`~deepcount.targets.GroundTruthConfig`.  Its default is
  the ground truth the weights were trained with, when the weights' description says so
  (``ground_truth`` anywhere in the sidecar's ``config``, or a ``paper`` / ``official``
  recipe): the authors scored a model against the sum of the very maps it learned.  When the
  weights do not say, it is ``targets.OFFICIAL`` (sigma 10, 49x49, mass off the image lost),
  since that is what the authors' code computes.  With ``keep_mass=True`` (``targets.PAPER``)
  every head keeps its mass inside the image, so ``blurred`` equals ``points``; with
  ``OFFICIAL`` mass falling off the image border is lost and the truth is lower.  The truth
  is always taken on the original image, whatever the tiling.
* Metrics are computed in float64 over the images in dataset order; every output written
  names its tiling, protocol and ground-truth settings.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .config import OFFICIAL, PAPER, GroundTruthConfig
from .datasets import AnnotatedImage, registry_name
from .images import image_size, load_image

if TYPE_CHECKING:  # torch stays out of ``deepcount evaluate --help``: evaluate() imports it
    import torch
    from torch import nn

__all__ = ["Evaluation", "ImageRow", "PROTOCOLS", "blurred_count", "evaluate", "ground_truth_label",
           "load_evaluation", "metrics", "resolve_ground_truth", "training_ground_truth"]

FORMAT = "deepcount-evaluation"
FORMAT_VERSION = 1
PROTOCOLS = ("points", "blurred")
PROTOCOL_TEXT = {
    "points": "number of annotated heads (the standard)",
    "blurred": "sum of the blurred ground-truth density map (authors' code)",
}
JSON_NAME, MARKDOWN_NAME, CSV_NAME = "evaluation.json", "evaluation.md", "per_image.csv"
# per-image counts are written to 1e-4 of a person (float32 carries ~7 digits); metrics use them unrounded
COUNT_DECIMALS = 4


def evaluation_json(data: dict) -> str:
    """An evaluation dict as JSON text: settings and metrics indented, then one line per image
    (a 1,200-image evaluation stays a few hundred kilobytes and diffs line by line)."""
    head = {k: v for k, v in data.items() if k != "images"}
    text = json.dumps(head, indent=2, allow_nan=True)
    if "images" not in data:
        return text + "\n"
    rows = ",\n".join("    " + json.dumps(r, allow_nan=True) for r in data["images"])
    body = f'  "images": [\n{rows}\n  ]' if rows else '  "images": []'
    return (text[:-2] + ",\n" if head else "{\n") + body + "\n}\n"


# ----------------------------------------------------------------------------- metrics
def metrics(pred: Sequence[float], truth: Sequence[float]) -> dict[str, float | int]:
    """Eq. 5-6: ``{"mae": mean |C - C_gt|, "rmse": sqrt(mean (C - C_gt)^2), "n": N}``."""
    pred, truth = [float(p) for p in pred], [float(t) for t in truth]
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} predictions but {len(truth)} ground-truth counts")
    if not pred:
        raise ValueError("no images to compute MAE/RMSE over")
    errors = [p - t for p, t in zip(pred, truth)]
    n = len(errors)
    return {"mae": math.fsum(abs(e) for e in errors) / n,
            "rmse": math.sqrt(math.fsum(e * e for e in errors) / n), "n": n}


# ----------------------------------------------------------------------------- ground truth
def ground_truth_name(config: GroundTruthConfig | None) -> str | None:
    """``"paper"`` / ``"official"`` for the two presets, ``"custom"`` otherwise."""

    if config is None:
        return None
    return "paper" if config == PAPER else "official" if config == OFFICIAL else "custom"


def ground_truth_label(config: GroundTruthConfig | None) -> str:
    """A short human label: ``official GT (sigma 10, 49x49, mass off the image lost)``."""
    if config is None:
        return "annotated points"
    size = 2 * config.radius + 1
    mass = "mass kept inside the image" if config.keep_mass else "mass off the image lost"
    return f"{ground_truth_name(config)} GT (sigma {config.sigma:g}, {size}x{size}, {mass})"


def _config_from(value: Any) -> GroundTruthConfig | None:
    """A GroundTruthConfig from what a sidecar may hold: ``"paper"``, ``"official"``, a dict
    of its fields, or a jsonargparse ``{"class_path", "init_args"}`` dict."""

    if isinstance(value, str):
        return {"paper": PAPER, "official": OFFICIAL}.get(value.strip().lower())
    if isinstance(value, dict):
        if isinstance(value.get("init_args"), dict):
            value = value["init_args"]
        if "sigma" in value:
            try:
                return GroundTruthConfig(sigma=float(value["sigma"]),
                                         kernel_size=(None if value.get("kernel_size") is None
                                                      else int(value["kernel_size"])),
                                         keep_mass=bool(value.get("keep_mass", True)))
            except (TypeError, ValueError):
                return None
        if isinstance(value.get("name"), str):
            return _config_from(value["name"])
    return None


def training_ground_truth(info: dict) -> tuple[GroundTruthConfig, str] | None:
    """The ground truth the weights were trained with, and where the description says so:
    a ``ground_truth`` entry at the top of ``info`` or anywhere in its ``config``, else a
    recipe named ``paper`` or ``official``; None when the description does not say."""
    found = _config_from(info.get("ground_truth")) if "ground_truth" in info else None
    if found is not None:
        return found, "weights' description: ground_truth"

    def search(node: Any, path: str) -> tuple[GroundTruthConfig, str] | None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("ground_truth", "gt") and (cfg := _config_from(value)) is not None:
                    return cfg, f"{path}.{key}"
            for key, value in node.items():
                if (hit := search(value, f"{path}.{key}")) is not None:
                    return hit
        return None

    hit = search(info.get("config"), "config")
    if hit is not None:
        return hit[0], f"weights' description: {hit[1]}"
    recipe = info.get("recipe")
    if isinstance(recipe, dict):
        recipe = recipe.get("name")
    if isinstance(recipe, str) and (cfg := _config_from(recipe)) is not None:
        return cfg, f"weights' recipe: {recipe}"
    return None


def resolve_ground_truth(info: dict, preset: str | GroundTruthConfig | None = None,
                         sigma: float | None = None, kernel_size: int | None = None,
                         keep_mass: bool | None = None) -> tuple[GroundTruthConfig, str]:
    """The ground truth of the ``blurred`` protocol and why: ``preset`` (``"paper"``,
    ``"official"`` or a config) when given, else the weights' training ground truth, else
    ``OFFICIAL`` (the authors' code); then ``sigma`` / ``kernel_size`` / ``keep_mass`` override
    its fields (a new ``sigma`` without ``kernel_size`` takes the default size for it)."""
    from dataclasses import replace


    if isinstance(preset, GroundTruthConfig):
        base, source = preset, "given"
    elif preset is not None:
        base = _config_from(preset)
        if base is None or not isinstance(preset, str):
            raise ValueError(f"ground truth must be 'paper', 'official' or a GroundTruthConfig, got {preset!r}")
        base, source = base, f"--ground-truth {preset}"
    else:
        trained = training_ground_truth(info)
        base, source = trained if trained is not None else (
            OFFICIAL, "default: the authors' code (the weights do not say what they were trained with)")
    changes: dict[str, Any] = {}
    if sigma is not None:
        changes.update(sigma=float(sigma), kernel_size=kernel_size)
    elif kernel_size is not None:
        changes["kernel_size"] = kernel_size
    if keep_mass is not None:
        changes["keep_mass"] = bool(keep_mass)
    if changes:
        base = replace(base, **changes)  # validated by GroundTruthConfig.__post_init__
        source += " with " + ", ".join(f"{k}={v}" for k, v in changes.items())
    return base, source


def blurred_count(points: np.ndarray, height: int, width: int, config: GroundTruthConfig) -> float:
    """The sum of an image's full-resolution ground-truth density map (``targets.density_map``)
    without building it: each head's separable kernel sums to (its row kernel's sum) x (its
    column kernel's sum), cut at the image border; with ``keep_mass`` each head sums to 1."""
    import numpy as np

    from .targets import HeadKernels

    k = HeadKernels.from_points(points, height, width, config)
    if config.keep_mass:
        return float(len(k))
    return float(np.dot(k.wy.sum(1), k.wx.sum(1)))


# ----------------------------------------------------------------------------- results
@dataclass
class ImageRow:
    """One image's ground truth and each output's count."""

    image: str
    height: int
    width: int
    tiles: int
    annotations: int
    truth: float
    outputs: dict[str, float]

    def as_dict(self, decimals: int | None = None) -> dict[str, Any]:
        """The row as written; ``decimals`` rounds the counts (the metrics use them unrounded)."""
        outputs = self.outputs if decimals is None else {k: round(v, decimals) for k, v in self.outputs.items()}
        return {"image": self.image, "height": self.height, "width": self.width, "tiles": self.tiles,
                "annotations": self.annotations, "truth": self.truth, **outputs}


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the settings, one :class:`ImageRow` per image, and
    ``metrics`` (output -> ``{"mae", "rmse", "n"}``)."""

    model: dict
    dataset: str
    split: str
    root: str | None
    dataset_images: int
    tiling: str
    protocol: str
    ground_truth: GroundTruthConfig | None
    ground_truth_source: str | None
    outputs: dict[str, str]  # output key -> what it is
    rows: list[ImageRow]
    seconds: float = 0.0
    device: str = "cpu"
    batch_size: int = 8
    features: str | None = None  # where the frontend's features came from, if not the images
    engine: str = "auto"  # deepcount.engines: auto is float32; bf16 computes in bfloat16
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def metrics(self) -> dict[str, dict]:
        truth = [r.truth for r in self.rows]
        return {k: metrics([r.outputs[k] for r in self.rows], truth) for k in self.outputs}

    @property
    def settings(self) -> str:
        """One line: tiling, protocol and ground truth (said next to every number written)."""
        text = f"tiling {self.tiling}; truth {self.protocol}: {PROTOCOL_TEXT[self.protocol]}"
        if self.ground_truth is not None:
            text += f", {ground_truth_label(self.ground_truth)}"
        if self.features:
            text += f"; features {self.features}"
        if self.engine != "auto":
            text += f"; engine {self.engine}"
        return text

    def to_dict(self) -> dict[str, Any]:
        gt = None
        if self.ground_truth is not None:
            gt = {"name": ground_truth_name(self.ground_truth), **asdict(self.ground_truth),
                  "kernel": 2 * self.ground_truth.radius + 1, "source": self.ground_truth_source,
                  "label": ground_truth_label(self.ground_truth)}
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "deepcount_version": __version__, "timestamp": self.timestamp,
            "model": self.model,
            "dataset": {"name": self.dataset, "split": self.split, "root": self.root,
                        "images": self.dataset_images, "evaluated": len(self.rows)},
            "tiling": self.tiling, "protocol": self.protocol,
            "protocol_text": PROTOCOL_TEXT[self.protocol], "ground_truth": gt,
            "outputs": self.outputs, "metrics": self.metrics,
            "device": self.device, "batch_size": self.batch_size, "seconds": round(self.seconds, 3),
            "engine": self.engine, **({"features": self.features} if self.features else {}),
            "images": [r.as_dict(COUNT_DECIMALS) for r in self.rows],
        }

    def table(self) -> str:
        """The metrics as aligned text, settings on top."""
        width = max(len(v) for v in self.outputs.values())
        lines = [f"{'output':<{width}}  {'MAE':>9}  {'RMSE':>9}  {'n':>5}"]
        for key, what in self.outputs.items():
            m = self.metrics[key]
            lines.append(f"{what:<{width}}  {m['mae']:>9.2f}  {m['rmse']:>9.2f}  {m['n']:>5}")
        return "\n".join(lines)

    def headline(self) -> str:
        n = len(self.rows)
        of = f"{n} of {self.dataset_images}" if n != self.dataset_images else f"{n}"
        return (f"{self.dataset} {self.split}, {of} images; {self.settings}")

    def markdown(self) -> str:
        arch = self.model.get("architecture") or {}
        trained = self.model.get("dataset")
        rows = [("model", f"{self.model.get('name', '?')} ({self.model.get('file', 'in memory')})"),
                ("sha256", self.model.get("sha256") or "—"),
                ("architecture", _arch_text(arch)),
                ("training", f"recipe {_recipe_text(self.model.get('recipe'))}"
                             + (f", dataset {trained}" if trained else "")),
                ("dataset", f"{self.dataset} {self.split}: {len(self.rows)} of {self.dataset_images} images"
                            + (f" ({self.root})" if self.root else "")),
                ("tiling", f"{self.tiling} ({_TILING_TEXT[self.tiling]})"),
                ("ground truth", f"{self.protocol}: {PROTOCOL_TEXT[self.protocol]}"
                                 + (f"; {ground_truth_label(self.ground_truth)} ({self.ground_truth_source})"
                                    if self.ground_truth is not None else "")),
                ("run", f"deepcount {__version__}, {self.timestamp}, device {self.device}, "
                        f"batch {self.batch_size}, {self.seconds:.1f} s")]
        out = [f"# Evaluation: {self.model.get('name', '?')} on {self.dataset} {self.split}", "",
               "| | |", "|---|---|", *(f"| {k} | {_md(v)} |" for k, v in rows), "",
               f"MAE and RMSE (eq. 5-6); {self.settings}:", "",
               "| output | MAE | RMSE | images |", "|---|---:|---:|---:|"]
        for key, what in self.outputs.items():
            m = self.metrics[key]
            out.append(f"| {_md(what)} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['n']} |")
        out += ["", f"Per image: `{CSV_NAME}`.", ""]
        return "\n".join(out)

    def write_json(self, path: str | os.PathLike) -> Path:
        from .cache import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:  # whole or absent: its presence marks a finished evaluation
            tmp.write_text(evaluation_json(self.to_dict()), encoding="utf-8")
        return path

    def write_markdown(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(self.markdown(), encoding="utf-8")
        return path

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per image: image, height, width, tiles, annotations, truth, then each output."""
        path = Path(path)
        fields = ["image", "height", "width", "tiles", "annotations", "truth", *self.outputs]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else v
                                 for k, v in r.as_dict(COUNT_DECIMALS).items()})
        return path

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """``evaluation.json``, ``evaluation.md`` and ``per_image.csv`` in ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [self.write_markdown(folder / MARKDOWN_NAME), self.write_csv(folder / CSV_NAME)]
        return [self.write_json(folder / JSON_NAME), *written]  # the JSON last


_TILING_TEXT = {"pad": "keep scale, pad to whole 384x512 tiles; branch sums leave out padding-only cells",
                "grid": "resize to a grid of whole 384x512 tiles (authors' code)",
                "features": "frontend over the whole image, the rest on 48x64 tiles of its features"}


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _arch_text(arch: dict) -> str:
    if not arch:
        return "unknown"
    if arch.get("model") == "csrnet":
        return f"CSRNet, width {arch.get('width', 1.0):g}"
    branches = arch.get("branches", [])
    return (f"DeepCount, width {arch.get('width', 1.0):g}, {arch.get('activation', '?')}, "
            f"branches {_branches_text(branches)}")


def _branches_text(branches: Sequence[int]) -> str:
    b = sorted(int(x) for x in branches)
    if not b:
        return "none"
    if b == list(range(b[0], b[-1] + 1)) and len(b) > 2:
        return f"{b[0]}-{b[-1]}"
    return ",".join(map(str, b))


def _recipe_text(recipe: Any) -> str:
    if recipe is None or recipe == "":
        return "unknown"
    if isinstance(recipe, dict):
        return str(recipe.get("name") or json.dumps(recipe, sort_keys=True)[:80])
    return str(recipe)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- evaluation
def _image_name(item: AnnotatedImage, root: str | None) -> str:
    if root is not None:
        try:
            return Path(item.image).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return str(item.image)


def evaluate(model: nn.Module | str | os.PathLike, dataset: Sequence[AnnotatedImage], *,
             tiling: str | None = None, protocol: str = "points",
             ground_truth: GroundTruthConfig | str | None = None,
             branches: Sequence[int] | None = None, batch_size: int | None = None,
             device: str | torch.device | None = "auto", limit: int | None = None,
             progress: bool = True, info: dict | None = None, dataset_name: str | None = None,
             root: str | os.PathLike | None = None, max_pixels: int | None = None,
             level: str | None = None, engine: str = "auto", features: Any = None) -> Evaluation:
    """Evaluate ``model`` on ``dataset`` (a :class:`~deepcount.datasets.CrowdDataset` or any
    sequence of :class:`~deepcount.datasets.AnnotatedImage`).

    Args:
        model: a DeepCount / CSRNet module, or a registered name / ``.safetensors`` path
            (loaded with :func:`deepcount.predict.load_network`, which gives ``info``).
        tiling: ``pad`` | ``grid`` | ``features``; None: the model's own (``info["tiling"]``),
            else ``pad``.
        level: the frontend level of ``features`` tiling; None: the model's own
            (``info["feature_level"]``, the level it was trained from), else ``conv4_3``.
        protocol: ``points`` (number of annotations) or ``blurred`` (the blurred map's sum).
        ground_truth: for ``blurred`` only: ``"paper"``, ``"official"`` or a config; None: the
            weights' training ground truth, else ``OFFICIAL`` (see the module docstring).
        branches: a DeepCount's branches to evaluate (None: all attached; ``()``: none).
        limit: the first ``limit`` images only.
        info: the model's description (name, file, sha256, architecture, recipe, ...) for the
            written results; taken from the loaded file when ``model`` is a name or path.
        dataset_name, root: how the results name the dataset (default: its registry name)
            and where image paths are made relative to.
        max_pixels: passed to :func:`deepcount.images.load_image` (None: no limit; benchmark
            images such as UCF-QNRF's are large).
        engine: how the network runs (:mod:`deepcount.engines`); ``auto``, as ``Counter``, is
            the device's fastest float32-exact path.  Every image goes through
            :func:`deepcount.tiling.count_tiles`, the loop ``Counter`` runs, with the backbone
            and every evaluated branch in one pass per batch of tiles.
        features: a :class:`~deepcount.features.FeatureCache` of the model's frozen frontend
            at its level (tiling ``features`` only): each image's features are read from it
            (computed once, kept on disk in float16, as training reads them) and only the
            layers after the level run.  Models that share a frozen frontend (the analyses'
            variants, :mod:`deepcount.analyses`) then share the frontend's work.
    """
    import torch

    from .engines import default_batch_size, engine_runner, resolve_device
    from .model import MAP_SIZES, architecture
    from .progress import progress_bar
    from .weights import load_network
    from .tiling import MODES, count_tiles

    if isinstance(model, (str, os.PathLike)):
        model, loaded = load_network(model)
        info = {**loaded, **(info or {})}
    info = dict(info or {})
    if "architecture" not in info:
        try:
            info["architecture"] = architecture(model)
        except TypeError:
            pass
    info.setdefault("name", type(model).__name__)
    tiling = tiling or info.get("tiling") or "pad"
    if tiling not in MODES:
        raise ValueError(f"tiling must be one of {MODES}, got {tiling!r}")
    level = (level or info.get("feature_level") or "conv4_3") if tiling == "features" else None
    if level is not None and level not in getattr(model, "feature_levels", ()):
        raise ValueError(f"tiling 'features' needs a DeepCount, not a {type(model).__name__}")
    if features is not None and (tiling != "features" or features.level != level):
        raise ValueError(f"a feature cache serves tiling 'features' at its own level ({features.level}); "
                         f"asked: tiling {tiling!r}" + (f" at {level}" if level else ""))
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    gt_config, gt_source = None, None
    if protocol == "blurred":
        gt_config, gt_source = resolve_ground_truth(info, ground_truth)
    elif ground_truth is not None:
        raise ValueError("a ground-truth config applies to protocol 'blurred' only; "
                         "protocol 'points' counts the annotations")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")

    by_map = bool(getattr(model, "counts_by_map", False))
    has_branches = not by_map and hasattr(model, "density_branches")
    attached = tuple(model.density_branches) if has_branches else ()
    if has_branches:
        wanted = attached if branches is None else tuple(sorted({int(b) for b in branches}))
        missing = [b for b in wanted if b not in attached]
        if missing:
            raise ValueError(f"branch(es) {missing} not attached to this model; attached: {attached}")
    elif branches:
        raise ValueError(f"only a DeepCount has branches; this is a {type(model).__name__}")
    else:
        wanted = ()
    outputs = {"count": "density map sum (CSRNet, padding cells left out)" if by_map else
               "backbone count" if getattr(model, "arch_name", None) else "count"}
    outputs.update({f"branch{k}": f"branch {k} map sum ({MAP_SIZES[k][0]}x{MAP_SIZES[k][1]})"
                    for k in wanted})

    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    batch_size = default_batch_size(dev) if batch_size is None else int(batch_size)
    model = model.to(dev).eval()
    run = engine_runner(model, engine, dev, level)  # what Counter runs, so the numbers are Counter's
    items = list(dataset)[:limit] if limit is not None else list(dataset)
    if not items:
        raise ValueError("the dataset has no images")
    root_text = str(root) if root is not None else None
    name = dataset_name or registry_name(getattr(dataset, "name", "?"))
    model_info = {k: v for k, v in info.items() if _jsonable(v)}

    rows: list[ImageRow] = []
    start = time.perf_counter()
    bar = progress_bar(items, enabled=progress, unit="image")
    try:
        with torch.inference_mode():
            for item in bar:
                if features is None:
                    image, feats = load_image(item.image, max_pixels=max_pixels), None
                    h, w = image.shape[:2]
                else:
                    image, (h, w) = None, image_size(item.image)
                    feats = features.tensor(item.image)
                count, maps, per_tile = count_tiles(run, image, tiling, batch_size, wanted, dev, features=feats)
                sums = {"count": count, **{f"branch{k}": float(m.values.sum(dtype=np.float64))
                                           for k, m in maps.items()}}
                truth = (float(item.count) if protocol == "points"
                         else blurred_count(item.points, h, w, gt_config))
                rows.append(ImageRow(_image_name(item, root_text), int(h), int(w), len(per_tile),
                                     int(item.count), truth, sums))
    finally:
        bar.close()
    return Evaluation(model=model_info, dataset=name, split=getattr(dataset, "split", "?"),
                      root=root_text, dataset_images=len(dataset), tiling=tiling, protocol=protocol,
                      ground_truth=gt_config, ground_truth_source=gt_source, outputs=outputs, rows=rows,
                      seconds=time.perf_counter() - start, device=str(dev), batch_size=int(batch_size),
                      engine=str(getattr(engine, "name", engine)),
                      features=None if features is None else
                      f"read from a cache: {features.level}, computed in {features.precision}, kept in float16")


def load_evaluation(path: str | os.PathLike) -> dict:
    """An ``evaluation.json`` as a dict, checked to be one (ValueError naming the file if not)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a deepcount evaluation (no \"format\": \"{FORMAT}\"); "
                         "write one with `deepcount evaluate`")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: evaluation format version {data['format_version']} is newer than "
                         f"this deepcount reads ({FORMAT_VERSION}); upgrade deepcount")
    for key in ("model", "dataset", "tiling", "protocol", "metrics"):
        if key not in data:
            raise ValueError(f"{path}: evaluation lacks {key!r}")
    return data
