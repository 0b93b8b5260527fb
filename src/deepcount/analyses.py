"""The paper's analyses of gradient fusion, rerun on one recipe: Table 7 (the backbone and each
branch's map sum), Table 8 (ReLU vs PReLU) and Table 9 (branches detached from the largest map).

``deepcount analyses`` trains every run of :data:`PLAN` from one base config (by default
``configs/shb_cpu.yaml``, the frozen-frontend CPU recipe) with the same steps and crops, the
variants' settings read from ``configs/ablations/*.yaml`` (the files a user passes to
``deepcount train`` by hand), then evaluates each run on the full test split (the backbone and
every attached branch) and lays the evaluations out as ``deepcount report`` does, the paper's
numbers beside ours and runs that differ only by their seed sharing a cell (mean and range).

Everything is resumable, so the command is rerun until it is done: a finished evaluation is
kept, a run whose weights exist is evaluated, and a run with checkpoints resumes from its last
one (bit-identical to a run never stopped, :mod:`deepcount.training`).  Every run exports its
last step: each variant gets the same budget and none gets a checkpoint picked for it on the
validation images.

With the frontend frozen, its features are the same for every variant: the test images'
features are computed once (a :class:`~deepcount.features.FeatureCache`, float32 compute, kept
in float16 as training keeps them) and every evaluation runs only the trained layers on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import atomic_path

__all__ = ["PLAN", "Job", "Variant", "check_precisions", "jobs", "precision", "run_analyses", "state"]


@dataclass(frozen=True)
class Variant:
    """One setting of the analyses: its name, the ``configs/ablations`` file that makes it
    (None: the base recipe) and the seeds it is trained with."""

    name: str
    overlay: str | None
    seeds: tuple[int, ...]
    tables: str  # which of the paper's tables it fills


# At least two seeds for the baseline and for the run with no branch at all, so the spread
# between seeds is known before a difference between variants is called real.
PLAN: tuple[Variant, ...] = (
    Variant("baseline", None, (0, 1), "Tables 7, 8 (PReLU) and 9 (no ablation)"),
    Variant("relu", "relu.yaml", (0,), "Table 8 (ReLU)"),
    Variant("detach-1-1", "detach_1-1.yaml", (0,), "Table 9 (branch 1 detached)"),
    Variant("detach-1-2", "detach_1-2.yaml", (0,), "Table 9 (branches 1-2 detached)"),
    Variant("detach-1-3", "detach_1-3.yaml", (0,), "Table 9 (branches 1-3 detached)"),
    Variant("detach-1-4", "detach_1-4.yaml", (0,), "Table 9 (branches 1-4 detached)"),
    Variant("detach-1-5", "detach_1-5.yaml", (0, 1), "Table 9 (branches 1-5 detached)"),
)


@dataclass(frozen=True)
class Job:
    """One training run of the plan and where its evaluation goes."""

    variant: Variant
    seed: int
    argv: tuple[str, ...]  # `deepcount train` arguments
    run_dir: Path
    evaluation: Path  # the kept evaluation: evaluation.json (the whole one: run_dir/evaluation/)

    @property
    def name(self) -> str:
        return self.run_dir.name


def jobs(out: str | os.PathLike, base: str | os.PathLike = "configs/shb_cpu.yaml",
         ablations: str | os.PathLike | None = None, steps: int | None = None,
         only: Sequence[str] = (), extra: Sequence[str] = (),
         evaluations: str | os.PathLike | None = None) -> list[Job]:
    """The plan's runs under ``out`` (``out/<base name>-<variant>-s<seed>/``), each run's
    evaluation in ``evaluations/<run name>/`` (default: ``out/evaluations``; small files worth
    keeping under version control: a run evaluated there is never trained again).  ``ablations``: the folder of the variants' YAML files (default:
    ``ablations/`` beside ``base``); ``steps``: every run's ``trainer.max_steps`` (default: the
    base's); ``only``: variant names to keep; ``extra``: more ``deepcount train`` overrides for
    every run (e.g. ``--model.width 0.125`` for a quick trial)."""
    from .config import ConfigError, parse_config

    base, out = Path(base), Path(out)
    evaluations = Path(evaluations) if evaluations is not None else out / "evaluations"
    folder = Path(ablations) if ablations is not None else base.parent / "ablations"
    if not base.is_file():
        raise ConfigError(f"base config {base} not found (run from the repository, or pass --base)")
    known = {v.name for v in PLAN}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; the plan has {', '.join(v.name for v in PLAN)}")
    stem = parse_config(["--config", str(base)]).name
    result = []
    for variant in PLAN:
        if only and variant.name not in only:
            continue
        overlay = []
        if variant.overlay is not None:
            path = folder / variant.overlay
            if not path.is_file():
                raise ConfigError(f"{variant.name}: {path} not found (--ablations names the folder)")
            overlay = ["--config", str(path)]
        for seed in variant.seeds:
            name = f"{stem}-{variant.name}-s{seed}"
            argv = ("--config", str(base), *overlay, "--seed", str(seed), "--out", str(out), "--name", name,
                    "--export.source", "last",
                    *(("--trainer.max_steps", str(steps)) if steps is not None else ()), *extra)
            result.append(Job(variant, seed, argv, out / name, evaluations / name))
    return result


def state(job: Job) -> str:
    """``evaluated``, ``trained`` (weights written), ``partial`` (checkpoints) or ``new``."""
    if (job.evaluation / "evaluation.json").is_file():
        return "evaluated"
    if (job.run_dir / f"{job.name}.safetensors").is_file():
        return "trained"
    if (job.run_dir / "checkpoints" / "last.ckpt").is_file():
        return "partial"
    return "new"


def precision(job: Job) -> tuple[str, str]:
    """``(trainer.precision, data.feature_precision)`` of ``job``: as its run recorded them once
    it has trained (its kept evaluation, else its weights' sidecar), else what this machine's
    ``auto`` makes of them (:func:`deepcount.training.resolve_precisions`)."""
    from .config import parse_config, recorded_precisions

    for path, inner in ((job.evaluation / "evaluation.json", ("model", "config")),
                        (job.run_dir / f"{job.name}.json", ("config",))):
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in inner:
                config = config.get(key) or {}
            steps, features = recorded_precisions(config)
            return steps or "?", features or "?"
    from .training import resolve_precisions

    cfg = resolve_precisions(parse_config(list(job.argv)))
    return cfg.trainer.precision, cfg.data.feature_precision


def check_precisions(plan: Sequence[Job]) -> None:
    """Refuse to train a run of ``plan`` in another precision than its finished runs trained in
    (ConfigError): on a CPU ``auto`` means bf16 where it is native (AVX-512 BF16, AMX) and
    float32 elsewhere, so a plan carried to another machine would otherwise compare runs of two
    recipes as if they were one."""
    import warnings

    from .config import ConfigError

    done = {j.name: precision(j) for j in plan if state(j) in ("evaluated", "trained")}
    todo = {j.name: precision(j) for j in plan if state(j) in ("new", "partial")}
    kinds = set(done.values())
    if len(kinds) > 1:
        warnings.warn("the finished runs trained in different precisions: "
                      + "; ".join(f"{n}: {p[0]}, {p[1]} features" for n, p in done.items()), stacklevel=2)
    if len(kinds) != 1 or not todo:
        return
    (steps, features), = kinds
    apart = {n: p for n, p in todo.items() if p != (steps, features)}
    if apart:
        name, (s, f) = next(iter(apart.items()))
        raise ConfigError(
            f"{name} would train in {s} on {f} features here, but the finished runs ({', '.join(done)}) trained in "
            f"{steps} on {features} features: the tables would compare two recipes as one.  Run it where `auto` "
            f"gives {steps} (bf16 needs AVX-512 BF16 or AMX on a CPU, or a GPU), or ask for it after `--`: "
            f"--trainer.precision {steps} --data.feature_precision {features} (bf16 on a CPU without it is "
            "emulated, 10-120x slower), or keep these runs apart with another --evaluations folder")


def _evaluate(job: Job, split: str, device: str, progress: bool, limit: int | None) -> dict:
    from .config import parse_config
    from .datasets import dataset_root, load_dataset
    from .evaluation import evaluate
    from .features import FeatureCache
    from .weights import load_network

    cfg = parse_config(list(job.argv))
    net, info = load_network(str(job.run_dir / f"{job.name}.safetensors"))
    dataset = load_dataset(cfg.data.dataset, cfg.data.root, split)
    level = cfg.model.frozen
    # keyed by the frozen weights' digest: the first variant computes the features, the rest read them
    features = None if level is None else FeatureCache(net, level, root=cfg.data.feature_cache, precision="fp32")
    result = evaluate(net, dataset, tiling="features" if level else None, info=info, device=device,
                      limit=limit, progress=progress, dataset_name=cfg.data.dataset,
                      root=dataset_root(cfg.data.dataset, cfg.data.root), features=features)
    result.write(job.run_dir / "evaluation")  # whole: settings, metrics, every image's row
    # the kept copy: everything but the per-image rows, which shrink to the true and backbone
    # counts (enough to pair variants image by image), so nine runs stay a few kilobytes each
    slim = {k: v for k, v in result.to_dict().items() if k != "images"}
    slim["per_image"] = {"image": [r.image for r in result.rows], "truth": [r.truth for r in result.rows],
                         "count": [round(r.outputs["count"], 3) for r in result.rows]}
    job.evaluation.mkdir(parents=True, exist_ok=True)
    path = job.evaluation / "evaluation.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(slim, indent=1) + "\n", encoding="utf-8")
    return result.metrics["count"]


def run_analyses(plan: Sequence[Job], *, split: str = "test", device: str = "auto", progress: bool = True,
                 limit: int | None = None, log: Callable[[str], Any] = print,
                 report_of: Sequence[Job] | None = None) -> str:
    """Train and evaluate what ``plan`` still lacks (resuming where runs stopped); returns the
    report (:func:`deepcount.report.report`) of every evaluated run of ``report_of`` (default:
    ``plan``; the whole plan when ``plan`` is a part of it, so that a report written after a
    part is run still holds the runs finished before).  ``limit``: evaluate the first ``limit``
    images of the split only (a trial: the report says how many)."""
    from .config import parse_config
    from .report import load_runs, report
    from .training import train

    check_precisions(plan)
    for i, job in enumerate(plan, 1):
        now = state(job)
        log(f"[{i}/{len(plan)}] {job.name} ({job.variant.tables}): {now}")
        if now in ("new", "partial"):
            cfg = parse_config([*job.argv, *(("--resume", "last") if now == "partial" else ())])
            train(cfg)
        if state(job) == "trained":
            log(f"[{i}/{len(plan)}] {job.name}: evaluating on the {split} split")
            m = _evaluate(job, split, device, progress, limit)
            log(f"[{i}/{len(plan)}] {job.name}: MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f} ({job.evaluation})")
    runs, problems = load_runs([j.evaluation for j in (plan if report_of is None else report_of)
                                if state(j) == "evaluated"], strict=False)
    if problems:
        raise ValueError("; ".join(problems))
    return report(runs)
