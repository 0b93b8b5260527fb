"""The paper's result tables (Tables 2, 3, 4, 7, 8 and 9) with this repository's runs beside them.

``deepcount report EVAL.json [FOLDER ...] [--out report.md]`` reads evaluation JSONs (as
``deepcount evaluate`` writes them) and lays them out as the paper does, the paper's own numbers
(typed in below, each table cited) next to ours.  A cell without a run is "—".

Where a run goes is read from its JSON alone:

* the dataset evaluated (``sha``/``shb`` -> Table 2, ``ucf_qnrf`` -> Table 3, ``mall`` ->
  Table 4; ``sha``/``shb``/``ucf_qnrf`` -> Table 7);
* the architecture of the weights: a DeepCount with all five branches attached and PReLU (or
  leaky ReLU, the authors' code) is "DeepCount (ours)" of Tables 2-4 and 7; a CSRNet sits beside the paper's CSRNet row; Table 8 takes the
  Part B runs of a DeepCount with all branches by activation (ReLU, PReLU; leaky ReLU, the
  authors' code, as an extra row); Table 9 takes Part B DeepCount runs by the branches
  detached (1, 1-2, ..., 1-5; any other set as an extra row);
* the settings every number depends on: the training recipe (and the training dataset, when
  it is not the one evaluated) from the weights' description, the test-time tiling, the
  ground-truth protocol (and, for ``blurred``, its Gaussian), the width when it is not the
  paper's 1.0, and how many of the split's images were evaluated.  Runs with the same settings
  share a row (Tables 2-4, 7) or a column (Tables 8-9) whose label says them; runs that would
  fall into the same cell get a row or column each.  Every number of ours carries ``[n]``,
  its run in the list at the end (file, weights, sha256, every setting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DATASET_NAMES, registry_name

__all__ = ["PAPER_TABLE2", "PAPER_TABLE3", "PAPER_TABLE4", "PAPER_TABLE7", "PAPER_TABLE7_FLOPS",
           "PAPER_TABLE8", "PAPER_TABLE9", "Run", "branch_flops", "find_evaluations",
           "load_runs", "report"]

DASH = "—"

# ----------------------------------------------------------------------------- the paper's numbers
# Numbers are strings exactly as printed (decimals included); float() them to compute.
# Section 4.2, Table 2 "Test results on Shanghai Tech Part A and Part B":
# (method, Part A MAE, Part A RMSE, Part B MAE, Part B RMSE); None where the paper has no number.
PAPER_TABLE2: tuple[tuple[str, str | None, str | None, str, str], ...] = (
    ("MCNN [4]", "110.2", "173.2", "26.4", "41.3"),
    ("Switching CNN [5]", "90.4", "135.0", "21.6", "33.4"),
    ("DecideNet [23]", None, None, "20.75", "29.42"),
    ("CP-CNN [6]", "73.6", "106.4", "20.1", "30.1"),
    ("ic-CNN [15]", "68.5", "116.2", "10.7", "16.0"),
    ("CSRNet [16]", "68.2", "115.0", "10.6", "16.0"),
    ("SANet [11]", "67.0", "104.5", "8.4", "13.6"),
    ("DeepCount (ours)", "65.2", "112.5", "7.2", "11.3"),
)
# Section 4.3, Table 3 "Test results on UCF-QNRF": (method, MAE, RMSE).
PAPER_TABLE3: tuple[tuple[str, str, str], ...] = (
    ("Idrees et al. (2013) [3]", "315", "508"),
    ("MCNN [4]", "277", "426"),
    ("CMTL [24]", "252", "514"),
    ("Switching CNN [5]", "228", "445"),
    ("Resnet101 [25]", "190", "277"),
    ("Densenet201 [26]", "163", "226"),
    ("Idrees et al. (2018) [29]", "132", "191"),
    ("DeepCount (ours)", "95.7", "167.1"),
)
# Section 4.4, Table 4 "Test results on Mall": (method, MAE, RMSE), as printed (some RMSE < MAE).
# (The paper's Table 4 is Mall; how the ground truth is counted, points vs the blurred map, is
# not a paper table: it is the report's last table, "Evaluation settings side by side".)
PAPER_TABLE4: tuple[tuple[str, str, str], ...] = (
    ("R-FCN [27]", "6.02", "5.46"),
    ("Faster R-CNN [28]", "5.91", "6.60"),
    ("Count Forest [30]", "4.40", "2.40"),
    ("MoCNN [31]", "2.75", "13.40"),
    ("Weighted VLAD [32]", "2.41", "9.12"),
    ("DecideNet [23]", "1.52", "1.90"),
    ("DeepCount (ours)", "1.66", "2.13"),
)
# Section 5.2, Table 7 "Comparing between outputs on different branches": MAE of
# (branch 1, ..., branch 5, backbone) per dataset, and each branch's million FLOPs (eq. 7).
PAPER_TABLE7: dict[str, tuple[str, ...]] = {
    "sha": ("79.2", "73.4", "69.7", "66.7", "65.8", "65.2"),
    "shb": ("9.7", "8.9", "8.0", "7.4", "7.2", "7.2"),
    "ucf_qnrf": ("193.3", "185.0", "155.3", "112.3", "96.9", "95.7"),
}
# Branch 1's 6034 disagrees with the paper's own Table 5, whose branch-1 layers add up to
# 37 + 101 + 403 + 1611 + 6442 + 2 = 8596; eq. 7 on Table 1 gives 8596 too (see branch_flops).
PAPER_TABLE7_FLOPS: tuple[str, ...] = ("6034", "2152", "541", "138", "38")
# Section 5.3, Table 8 "Comparing results between using ReLU (sparse gradients) and PReLU
# (full gradients)": SHT Part B MAE.
PAPER_TABLE8: dict[str, str] = {"relu": "8.8", "prelu": "7.2"}
# Section 5.3, Table 9 "Ablation on branches": SHT Part B MAE by the branches detached
# (no ablation, 1, 1-2, 1-3, 1-4, 1-5).
PAPER_TABLE9: dict[tuple[int, ...], str] = {
    (): "7.2", (1,): "7.4", (1, 2): "7.5", (1, 2, 3): "7.7", (1, 2, 3, 4): "8.3", (1, 2, 3, 4, 5): "9.1",
}
PAPER_NOTE = ("Paper rows are as printed in the paper; it trains with sigma-5 ground truth "
              "and PReLU and does not state its test-time tiling or ground-truth protocol.")

# The datasets' names as the paper's tables spell them ("Shanghai Tech Part A"); the rest as
# everywhere else in the package (datasets.DATASET_NAMES).
DATASET_TEXT = {**DATASET_NAMES, "sha": "Shanghai Tech Part A", "shb": "Shanghai Tech Part B"}
ALL = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One evaluation JSON, with what the tables need read off it."""

    index: int  # its number in the report's run list, [n]
    path: Path
    data: dict

    @property
    def dataset(self) -> str:

        return registry_name(str((self.data.get("dataset") or {}).get("name", "?")))

    @property
    def architecture(self) -> dict:
        return (self.data.get("model") or {}).get("architecture") or {}

    @property
    def kind(self) -> str:
        return str(self.architecture.get("model", "?"))

    @property
    def activation(self) -> str:
        return str(self.architecture.get("activation", "?"))

    @property
    def branches(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.architecture.get("branches", ())))

    @property
    def width(self) -> float:
        return float(self.architecture.get("width", 1.0))

    @property
    def is_full_deepcount(self) -> bool:
        return self.kind == "deepcount" and self.branches == ALL

    @property
    def is_main_deepcount(self) -> bool:
        """The model of Tables 2-4 and 7: all branches, PReLU (paper) or leaky ReLU (authors'
        code); a ReLU model is Table 8's ablation."""
        return self.is_full_deepcount and self.activation != "relu"

    def metric(self, output: str = "count") -> dict | None:
        return (self.data.get("metrics") or {}).get(output)

    @property
    def config(self) -> dict:
        """The training config the weights' sidecar carries (empty when it carries none)."""
        config = (self.data.get("model") or {}).get("config")
        return config if isinstance(config, dict) else {}

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return int(seed) if isinstance(seed, int) else None

    @property
    def length(self) -> str | None:
        """How long it trained, as its config says: ``N steps`` or ``N epochs``."""
        trainer = self.config.get("trainer") or {}
        steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
        if isinstance(steps, int) and steps > 0:
            return f"{steps} steps"
        if isinstance(epochs, int) and epochs > 0:
            return f"{epochs} epochs"
        return None

    @property
    def training_precision(self) -> str | None:
        """The precision it trained in, as its config records it (``bf16``, ``fp32``; ``bf16
        steps on fp32 features`` when the cached features differ); None when it records none."""
        from .config import recorded_precisions

        steps, features = (_PRECISION_TEXT.get(p) if p else None for p in recorded_precisions(self.config))
        if steps is None:
            return None
        features = features or steps
        return steps if features == steps else f"{steps} steps on {features} features"

    def settings(self, activation: bool = False) -> str:
        """The recipe, tiling, ground truth and anything else that sets this run's numbers apart."""
        model = self.data.get("model") or {}
        how = ", ".join(filter(None, (self.length, self.training_precision and f"{self.training_precision} training")))
        recipe = f"recipe {_recipe(model.get('recipe'))}" + (f" ({how})" if how else "")
        parts = [recipe, f"tiling {self.data.get('tiling', '?')}", f"truth {_truth(self.data)}"]
        if activation and self.kind == "deepcount" and self.activation != "prelu":
            parts.append(f"activation {self.activation}")
        if self.width != 1.0:
            parts.append(f"width {self.width:g}")
        if self.data.get("features"):
            parts.append("frontend features cached")
        if self.data.get("engine", "auto") != "auto":
            parts.append(f"engine {self.data['engine']}")
        trained = model.get("dataset")

        if isinstance(trained, str) and trained and registry_name(trained) != self.dataset:
            parts.append(f"trained on {trained}")
        ds = self.data.get("dataset") or {}
        if ds.get("evaluated") is not None and ds.get("evaluated") != ds.get("images"):
            parts.append(f"{ds.get('evaluated')} of {ds.get('images')} images")
        return ", ".join(parts)

    def describe(self) -> str:
        """The run-list entry: every setting, the weights and the file."""
        model = self.data.get("model") or {}
        ds = self.data.get("dataset") or {}
        sha = model.get("sha256")
        if self.kind == "deepcount":
            arch_text = (f"DeepCount width {self.width:g}, {self.activation}, branches "
                         f"{','.join(map(str, self.branches)) or 'none'}")
        else:
            arch_text = f"{self.kind} width {self.width:g}"
        return (f"`{self.path}`: {model.get('name', '?')}"
                + (f" (sha256 {sha[:12]})" if sha else "")
                + (f", seed {self.seed}" if self.seed is not None else "")
                + f"; {arch_text}; {DATASET_TEXT.get(self.dataset, self.dataset)} {ds.get('split', '?')}, "
                + f"{ds.get('evaluated', '?')} of {ds.get('images', '?')} images; {self.settings()}; "
                + f"deepcount {self.data.get('deepcount_version', '?')}, {self.data.get('timestamp', '?')}")


# Lightning's precision names (and the feature cache's) as a reader says them.
_PRECISION_TEXT = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "32-true": "fp32", "32": "fp32",
                   "fp32": "fp32", "16-mixed": "fp16", "16-true": "fp16", "64-true": "fp64"}


def _recipe(recipe: Any) -> str:
    if recipe is None or recipe == "":
        return "unknown"
    if isinstance(recipe, dict):
        return str(recipe.get("name") or "custom")
    return str(recipe)


def _truth(data: dict) -> str:
    protocol = data.get("protocol", "?")
    gt = data.get("ground_truth")
    if protocol != "blurred" or not isinstance(gt, dict):
        return str(protocol)
    kernel = gt.get("kernel") or gt.get("kernel_size") or "?"
    mass = "kept" if gt.get("keep_mass") else "lost"
    name = gt.get("name")
    preset = f"{name} " if name in ("paper", "official") else ""
    return f"blurred ({preset}sigma {gt.get('sigma', '?'):g}, {kernel}x{kernel}, mass {mass})"


def find_evaluations(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The JSON files named, and those under the folders named (recursively, sorted); plus a
    message for each named path that does not exist or holds no JSON."""
    files: list[Path] = []
    problems: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.json"))
            if not found:
                problems.append(f"{p}: no .json files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def load_runs(paths: Sequence[str | Path], strict: bool = True) -> tuple[list[Run], list[str]]:
    """Runs from evaluation JSONs (files, or folders searched for them).  A file named
    explicitly that is not an evaluation is a problem; other JSONs found in folders (a weights
    sidecar, say) are skipped.  ``strict`` raises ValueError on the first problem."""
    from .evaluation import load_evaluation

    named = {Path(p) for p in paths if Path(p).is_file()}
    files, problems = find_evaluations(paths)
    runs: list[Run] = []
    seen: set[Path] = set()
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        try:
            data = load_evaluation(f)
        except ValueError as e:
            if f in named:
                problems.append(str(e))
            continue
        runs.append(Run(len(runs) + 1, f, data))
    if strict and problems:
        raise ValueError("; ".join(problems))
    return runs, problems


# ----------------------------------------------------------------------------- FLOPs (eq. 7)
def branch_flops(architecture: dict | None = None) -> dict[int, float]:
    """Million FLOPs of each branch of a DeepCount for one 384x512 crop by eq. 7
    (H x W x C x K1 x K2 x C' per convolution or transposed convolution, output size H x W),
    counted on a meta-device forward pass (no memory, no arithmetic)."""
    import torch
    from torch import nn

    from .model import INPUT_SIZE, build

    arch = {"model": "deepcount", "width": 1.0, "activation": "prelu", "branches": list(ALL),
            **(architecture or {})}
    with torch.device("meta"):
        model = build(arch)
    totals: dict[int, float] = {}
    handles = []
    for key, branch in model.branches.items():
        for m in branch.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                def hook(mod, _inputs, out, k=int(key)):
                    k1, k2 = mod.kernel_size
                    totals[k] = totals.get(k, 0.0) + (out.shape[-2] * out.shape[-1] * out.shape[-3]
                                                      * k1 * k2 * mod.in_channels // mod.groups)
                handles.append(m.register_forward_hook(hook))
    model.forward_maps(torch.empty(1, 3, *INPUT_SIZE, device="meta"))
    for h in handles:
        h.remove()
    return {k: totals[k] / 1e6 for k in sorted(totals)}


# ----------------------------------------------------------------------------- tables
def _num(value: str | None) -> str:
    """A paper number as printed, or a dash."""
    return DASH if value is None else str(value)


def _ours(runs: Run | Sequence[Run], output: str = "count", rmse: bool = False, key: str = "mae") -> str:
    """A cell: one run's MAE (/ RMSE) and its [n]; several seeds' mean, then the range of their
    MAE (the spread between seeds, against which a difference between cells is read)."""
    runs = [runs] if isinstance(runs, Run) else list(runs)
    found = [(r, m) for r in runs if (m := r.metric(output)) is not None]
    if not found:
        return DASH
    refs = ", ".join(str(r.index) for r, _ in found)
    mean = lambda k: sum(m[k] for _, m in found) / len(found)  # noqa: E731
    text = f"{mean(key):.2f}" + (f" / {mean('rmse'):.2f}" if rmse else "")
    if len(found) > 1:
        maes = [m[key] for _, m in found]
        seeds = ", ".join(str(r.seed) for r, _ in found)
        text += f" (mean of seeds {seeds}: {min(maes):.2f}-{max(maes):.2f})"
    return f"{text} [{refs}]"


def _ours_rmse(runs: Run | Sequence[Run], output: str = "count") -> str:
    return _ours(runs, output, key="rmse")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(align) + " |"]
            + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


class _Slots:
    """Groups runs under a label (a row or a column): runs with the same label share it, and
    runs that differ only by their training seed share a cell (their mean and spread); two runs
    of the same seed (or of unknown seeds) that want the same cell do not: the later one gets a
    new group, ``label (#2)``."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, dict[Any, list[Run]]]] = []

    def add(self, label: str, cell: Any, run: Run) -> None:
        n = 1
        for name, cells in self.groups:
            if name.split(" (#")[0] != label:
                continue
            there = cells.get(cell)
            if there is None:
                cells[cell] = [run]
                return
            if run.seed is not None and all(r.seed is not None and r.seed != run.seed for r in there):
                there.append(run)
                return
            n += 1
        self.groups.append((label if n == 1 else f"{label} (#{n})", {cell: [run]}))


def _results_table(title: str, caption: str, columns: Sequence[str], datasets: Sequence[str],
                   paper: Sequence[tuple], runs: Sequence[Run]) -> list[str]:
    """Tables 2-4: paper rows, with our DeepCount rows after the paper's DeepCount and our
    CSRNet rows after the paper's CSRNet (or at the end)."""
    ours: dict[str, _Slots] = {"deepcount": _Slots(), "csrnet": _Slots()}
    for run in runs:
        if run.dataset not in datasets:
            continue
        if run.is_main_deepcount:
            ours["deepcount"].add(run.settings(activation=True), run.dataset, run)
        elif run.kind == "csrnet":
            ours["csrnet"].add(run.settings(), run.dataset, run)

    def our_rows(kind: str, name: str) -> list[list[str]]:
        rows = []
        for label, cells in ours[kind].groups:
            row = [f"{name}, this repo: {label}"]
            for ds in datasets:
                found = cells.get(ds)
                row += [DASH, DASH] if found is None else [_ours(found), _ours_rmse(found)]
            rows.append(row)
        return rows

    rows: list[list[str]] = []
    placed = {"deepcount": False, "csrnet": False}
    for entry in paper:
        method, values = entry[0], entry[1:]
        rows.append([f"{method} (paper)", *(_num(v) for v in values)])
        for kind, stem in (("deepcount", "DeepCount"), ("csrnet", "CSRNet")):
            if method.startswith(stem):
                rows += our_rows(kind, "DeepCount" if kind == "deepcount" else "CSRNet")
                placed[kind] = True
    for kind, name in (("deepcount", "DeepCount"), ("csrnet", "CSRNet")):
        if not placed[kind]:
            rows += our_rows(kind, name)
    return [f"## {title}", "", caption, "", *_table(["Method", *columns], rows), ""]


def table2(runs: Sequence[Run]) -> list[str]:
    return _results_table("Table 2: Shanghai Tech Part A and Part B",
                          "MAE and RMSE of the count (a DeepCount's backbone).",
                          ["Part A MAE", "Part A RMSE", "Part B MAE", "Part B RMSE"], ("sha", "shb"),
                          PAPER_TABLE2, runs)


def table3(runs: Sequence[Run]) -> list[str]:
    return _results_table("Table 3: UCF-QNRF", "MAE and RMSE of the count.", ["MAE", "RMSE"],
                          ("ucf_qnrf",), PAPER_TABLE3, runs)


def table4(runs: Sequence[Run]) -> list[str]:
    return _results_table("Table 4: Mall", "MAE and RMSE of the count.", ["MAE", "RMSE"], ("mall",),
                          PAPER_TABLE4, runs)


def table7(runs: Sequence[Run]) -> list[str]:
    from .model import MAP_SIZES

    header = ["", *(f"Branch {k}" for k in ALL), "Backbone"]
    outputs = [*(f"branch{k}" for k in ALL), "count"]
    rows = [["Output", *(f"{h}×{w}" for h, w in MAP_SIZES.values()), "1×1"]]
    slots: dict[str, _Slots] = {ds: _Slots() for ds in PAPER_TABLE7}
    for run in runs:
        if run.is_main_deepcount and run.dataset in slots:
            slots[run.dataset].add(run.settings(activation=True), "run", run)
    widths = {1.0}
    for ds, paper in PAPER_TABLE7.items():
        rows.append([f"{DATASET_TEXT[ds]} (paper)", *(_num(v) for v in paper)])
        for label, cells in slots[ds].groups:
            found = cells["run"]
            widths.update(r.width for r in found)
            rows.append([f"{DATASET_TEXT[ds]}, this repo: {label}", *(_ours(found, o, rmse=True) for o in outputs)])
    rows.append(["Million FLOPs (paper)", *(_num(v) for v in PAPER_TABLE7_FLOPS), "-"])
    for width in sorted(widths, reverse=True):
        flops = branch_flops({"width": width})
        rows.append(["Million FLOPs, eq. 7 on this repo's Table 1" + ("" if width == 1.0 else f" at width {width:g}"),
                     *(f"{flops[k]:.0f}" for k in ALL), "-"])
    return ["## Table 7: outputs of the branches and the backbone", "",
            "Paper: MAE. This repo: MAE / RMSE of each branch's density-map sum and of the backbone count "
            "(branch sums leave out map cells wholly in padding).  The paper's branch-1 FLOPs (6034) "
            "disagree with its own Table 5, whose branch-1 layers add up to 8596.", "",
            *_table(header, rows), ""]


def _column_table(title: str, caption: str, first: str, row_keys: Sequence[tuple[Any, str]],
                  paper: dict, runs: Sequence[Run], key: Callable[[Run], Any],
                  label: Callable[[Run], str], extra_label: Callable[[Any], str]) -> list[str]:
    """Tables 8-9: one row per variant (the paper's, then any others found), a paper column and
    one column of ours per group of settings."""
    slots = _Slots()
    for run in runs:
        slots.add(label(run), key(run), run)
    keys = [k for k, _ in row_keys]
    names = dict(row_keys)
    for _, cells in slots.groups:
        for k in cells:
            if k not in keys:
                keys.append(k)
                names[k] = extra_label(k)
    header = [first, "SHT Part B MAE (paper)", *(f"this repo: {name}" for name, _ in slots.groups)]
    rows = [[names[k], _num(paper.get(k)), *(_ours(cells[k]) if k in cells else DASH for _, cells in slots.groups)]
            for k in keys]
    return [f"## {title}", "", caption, "", *_table(header, rows), ""]


def table8(runs: Sequence[Run]) -> list[str]:
    chosen = [r for r in runs if r.dataset == "shb" and r.is_full_deepcount]
    return _column_table(
        "Table 8: ReLU vs PReLU", "MAE of the backbone count on Shanghai Tech Part B, all five branches attached.",
        "Activation", [("relu", "ReLU"), ("prelu", "PReLU")], PAPER_TABLE8, chosen,
        key=lambda r: r.activation, label=lambda r: r.settings(),
        extra_label=lambda k: {"leaky_relu": "leaky ReLU (authors' code)"}.get(k, str(k)))


def _detached_text(detached: tuple[int, ...]) -> str:
    if not detached:
        return "No ablation"
    if detached == tuple(range(1, len(detached) + 1)):
        return "Branch 1 detached" if len(detached) == 1 else f"Branches 1-{len(detached)} detached"
    return f"Branches {','.join(map(str, detached))} detached (not in the paper)"


def table9(runs: Sequence[Run]) -> list[str]:
    chosen = [r for r in runs if r.dataset == "shb" and r.kind == "deepcount"]
    rows = [(k, _detached_text(k)) for k in PAPER_TABLE9]
    return _column_table(
        "Table 9: ablation on branches", "MAE of the backbone count on Shanghai Tech Part B by the "
        "branches detached during training.", "Ablation", rows, PAPER_TABLE9, chosen,
        key=lambda r: tuple(b for b in ALL if b not in r.branches), label=lambda r: r.settings(activation=True),
        extra_label=_detached_text)


def _absolute_errors(run: Run) -> dict[str, float] | None:
    """The backbone's absolute error per image: from an evaluation's rows, or from the
    ``per_image`` columns that ``deepcount analyses`` keeps (None when it has neither)."""
    kept = run.data.get("per_image")
    if isinstance(kept, dict) and {"image", "truth", "count"} <= set(kept):
        return {i: abs(float(c) - float(t)) for i, t, c in zip(kept["image"], kept["truth"], kept["count"])}
    rows = run.data.get("images")
    if isinstance(rows, list) and rows and all("truth" in r and "count" in r for r in rows):
        return {r["image"]: abs(float(r["count"]) - float(r["truth"])) for r in rows}
    return None


PAIRED_RESAMPLES = 10_000


def paired_difference(errors: Sequence[float], reference: Sequence[float], resamples: int = PAIRED_RESAMPLES,
                      seed: int = 0) -> tuple[float, float, float]:
    """The MAE of ``errors`` minus that of ``reference`` (absolute errors on the same images, in
    the same order) and its 95% bootstrap interval over the images (percentile, ``resamples``
    resamples of the images, generator seeded with ``seed``)."""
    diff = np.asarray(errors, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError("paired_difference needs the same non-empty list of images on both sides")
    picks = np.random.default_rng(seed).integers(0, diff.size, (resamples, diff.size))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def paired_table(runs: Sequence[Run]) -> list[str]:
    """Not a paper table: Tables 8 and 9's variants against their baseline image by image.

    The baseline is every Shanghai Tech Part B run with all five branches and PReLU (the
    paper's model; several seeds are averaged image by image); a variant is any other
    DeepCount run on the same images under the same settings (recipe, steps, precision,
    tiling).  Each row: the variant's MAE minus the baseline's, with the 95% bootstrap interval
    over the test images.  The interval covers which images the test set happens to hold, not
    which seed trained the run; the baseline seeds' own row is the yardstick for that."""
    base = [r for r in runs if r.dataset == "shb" and r.is_main_deepcount and r.activation == "prelu"]
    by_label: dict[str, list[Run]] = {}
    for r in base:
        by_label.setdefault(r.settings(), []).append(r)
    rows = []
    for label, group in by_label.items():
        paired = [(r, e) for r in group if (e := _absolute_errors(r)) is not None]
        if not paired or any(e.keys() != paired[0][1].keys() for _, e in paired):
            continue
        images = sorted(paired[0][1])
        reference = np.mean([[e[i] for i in images] for _, e in paired], axis=0)
        block = [[f"baseline: {label}", str(len(images)), "0", "-", " ".join(f"[{r.index}]" for r, _ in paired)]]
        seeds = sorted(((r.seed, e) for r, e in paired if r.seed is not None), key=lambda x: x[0])
        if len(seeds) >= 2 and seeds[0][0] != seeds[-1][0]:
            (s0, e0), (s1, e1) = seeds[0], seeds[-1]
            d, lo, hi = paired_difference([e1[i] for i in images], [e0[i] for i in images])
            block.append([f"PReLU, all branches: seed {s1} against seed {s0} (the yardstick)", str(len(images)),
                          f"{d:+.2f}", f"{lo:+.2f} to {hi:+.2f}", ""])
        for r in runs:
            if r in group or r.dataset != "shb" or r.kind != "deepcount" or r.settings() != label:
                continue
            e = _absolute_errors(r)
            if e is None or e.keys() != paired[0][1].keys():
                continue
            d, lo, hi = paired_difference([e[i] for i in images], reference)
            what = _detached_text(tuple(b for b in ALL if b not in r.branches))
            if r.activation != "prelu":
                what = f"{'ReLU' if r.activation == 'relu' else r.activation}, {what[0].lower()}{what[1:]}"
            block.append([what + (f", seed {r.seed}" if r.seed is not None else ""), str(len(images)),
                          f"{d:+.2f}", f"{lo:+.2f} to {hi:+.2f}", f"[{r.index}]"])
        if len(block) > 1:
            rows += block
    if not rows:
        return []
    return ["## Variants against the baseline, image by image (not a paper table)", "",
            "Backbone MAE of each run minus the baseline's (PReLU, all five branches; several seeds averaged "
            "image by image) on the same Shanghai Tech Part B images, with a 95% bootstrap interval over the "
            f"images ({PAIRED_RESAMPLES:,} resamples, seed 0).  The interval covers the choice of test images, "
            "not the training seed: the baseline seeds' row says how far two seeds of one recipe land apart.", "",
            *_table(["Run", "Images", "MAE minus the baseline's", "95% interval", "[n]"], rows), ""]


def settings_table(runs: Sequence[Run]) -> list[str]:
    """Not a paper table: the same weights on the same data under different tiling / ground
    truth, side by side (shown only when some weights were evaluated more than one way)."""
    groups: dict[tuple, dict[str, Run]] = {}
    columns: list[str] = []
    for run in runs:
        model = run.data.get("model") or {}
        ident = (model.get("sha256") or model.get("name"), run.dataset,
                 (run.data.get("dataset") or {}).get("split"), (run.data.get("dataset") or {}).get("evaluated"))
        col = f"tiling {run.data.get('tiling', '?')}, truth {_truth(run.data)}" + (
            f", engine {run.data['engine']}" if run.data.get("engine", "auto") != "auto" else "")
        if col not in columns:
            columns.append(col)
        groups.setdefault(ident, {}).setdefault(col, run)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if not multi:
        return []
    rows = []
    for (_, ds, split, n), cells in multi.items():
        any_run = next(iter(cells.values()))
        name = (any_run.data.get("model") or {}).get("name", "?")
        rows.append([f"{name} on {DATASET_TEXT.get(ds, ds)} {split} ({n} images)",
                     *(_ours(cells[c], rmse=True) if c in cells else DASH for c in columns)])
    return ["## Evaluation settings side by side (not a paper table)", "",
            "MAE / RMSE of the count of the same weights on the same images under each tiling and "
            "ground-truth protocol.", "", *_table(["Weights and data", *columns], rows), ""]


def report(runs: Sequence[Run]) -> str:
    """The whole Markdown report."""
    lines = ["# DeepCount: the paper's tables and this repository's runs", "",
             f"{PAPER_NOTE} Every number of this repo names its settings in its row or column and "
             f"links its run, [n], listed at the end. {DASH}: no run.", ""]
    for part in (table2, table3, table4, table7, table8, table9, paired_table, settings_table):
        lines += part(runs)
    lines += ["## Runs", ""]
    lines += [f"{r.index}. {r.describe()}" for r in runs] or ["(none)"]
    return "\n".join(lines) + "\n"
