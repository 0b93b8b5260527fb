"""Benchmark 9: accuracy on the full test sets (Tables 2, 4 and 7; not a timing benchmark).

Every (model, dataset, tiling) evaluation not yet under ``--results`` (default
``docs/results/``) is run with :func:`deepcount.evaluation.evaluate`: the standard protocol (the
true count is the number of annotated points), the backbone and every branch the weights hold,
float32 on the CPU (``--engine bf16``: bfloat16 compute).  Each lands in ``<results>/<model>/<dataset>_test_<tiling>/``
(``evaluation.json``, ``evaluation.md``, ``per_image.csv``), written only once it is whole, so an
interrupted run resumes where it stopped (``--force`` runs one again).  The table printed (and
``bench/results/accuracy.json``) covers every evaluation asked for; ``deepcount report
docs/results`` lays them out beside the paper's tables.

    python bench/accuracy.py --model default csrnet-baseline runs/sha-cpu/sha-cpu.safetensors \\
        --dataset shb sha mall [--tiling own features pad grid] [--force] [--smoke]

``--tiling own`` (the default) is the model's own tiling; ``features`` applies to a DeepCount only
(skipped for a CSRNet, said).  ``--feature-cache``: tiling ``features`` reads each test image's
frozen-frontend features from the feature cache (computed once in float32, kept in float16, keyed
by the frozen weights), so models that share a frozen frontend (every CPU-trained one) pay the
frontend once per test set; those evaluations land in ``<dataset>_test_features_cached/``.  ``--smoke``: the first 2 images of each set, into a temporary
folder unless ``--results`` says where.

``--split val``: the validation images instead, the 10% (seed 0) that training carves from each
training set (``deepcount.datasets.train_val_split``, the images ``deepcount train`` validates
on), into ``<dataset>_val_<tiling>/``: how models are compared and chosen (the bundled default
among them, docs/RESULTS.md) without looking at a test image.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import _common as C
from deepcount.datasets import DATASET_NAMES

DATASETS = {k: DATASET_NAMES[k] for k in ("shb", "sha", "mall", "ucf_qnrf")}


def main() -> int:
    p = C.parser("accuracy", __doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=None, metavar="NAME|FILE",
                   help="registered names or .safetensors files (default: the bundled default; --smoke: the CSRNet baseline)")
    p.add_argument("--dataset", nargs="+", default=["shb"], choices=sorted(DATASETS))
    p.add_argument("--tiling", nargs="+", default=["own"], choices=["own", "features", "pad", "grid"])
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test: the full test sets (default); val: the validation images training carves from "
                        "each training set (10%%, seed 0), for choosing between models")
    p.add_argument("--results", default=None, metavar="DIR", help="evaluations folder (default: docs/results; --smoke: a temporary one)")
    p.add_argument("--force", action="store_true", help="run evaluations again that are already there")
    p.add_argument("--limit", type=int, default=None, help="the first N images of each set (default: all; --smoke 2)")
    p.add_argument("--engine", default="auto", choices=["auto", "bf16"],
                   help="auto: float32 (the CPU's fastest float32-exact path, default); bf16: bfloat16 "
                        "compute (evaluations land in <dataset>_test_<tiling>_bf16/)")
    p.add_argument("--feature-cache", action="store_true",
                   help="tiling features: read the frozen frontend's features of each test image from the "
                        "feature cache (float32, kept in float16; computed by the first model that needs them)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("accuracy", args)
    from deepcount.config import DataConfig, TrainConfig
    from deepcount.datasets import load_dataset, train_val_split
    from deepcount.evaluation import evaluate, load_evaluation
    from deepcount.features import FeatureCache
    from deepcount.weights import load_network

    limit = args.limit or (2 if args.smoke else None)
    temporary = args.smoke and args.results is None
    results = Path(tempfile.mkdtemp(prefix="accuracy-")) if temporary else Path(args.results or C.REPO / "docs" / "results")
    rows, records = [], []
    # --split val: what training carves with its default val_fraction and seed
    fraction, seed = DataConfig.val_fraction, TrainConfig.seed
    sets = {dataset: load_dataset(dataset, None, "test") if args.split == "test"
            else train_val_split(load_dataset(dataset, None, "train"), fraction, seed=seed)[1]
            for dataset in args.dataset}
    for spec in args.model or ["csrnet-baseline" if args.smoke else "default"]:
        net, info = load_network(spec)
        name = str(info.get("name") or Path(spec).stem)
        own = info.get("tiling") or "pad"
        for dataset in args.dataset:
            data = sets[dataset]
            for asked in args.tiling:
                tiling = own if asked == "own" else asked
                if tiling == "features" and not getattr(net, "feature_levels", ()):
                    print(f"# {name}: tiling features needs a DeepCount, skipped")
                    continue
                cache = None
                if tiling == "features" and args.feature_cache:
                    level = info.get("feature_level")
                    if level is None:
                        print(f"# {name}: no frozen frontend level in its sidecar, features computed from the images")
                    else:
                        cache = FeatureCache(net, level, precision="fp32")
                folder = results / name / (f"{dataset}_{args.split}_{tiling}{'_cached' if cache else ''}"
                                           f"{f'_first{limit}' if limit else ''}"
                                           f"{'_bf16' if args.engine == 'bf16' else ''}")
                if (folder / "evaluation.json").is_file() and not args.force:
                    found = load_evaluation(folder / "evaluation.json")
                    seconds, ran = found.get("seconds"), False
                    metrics = found["metrics"]
                else:
                    result = evaluate(net, data, tiling=tiling, info=info, dataset_name=dataset, limit=limit,
                                      device="cpu", root=C.data_root(), engine=args.engine, features=cache)
                    part = folder.with_name(folder.name + ".part")
                    shutil.rmtree(part, ignore_errors=True)
                    result.write(part)
                    shutil.rmtree(folder, ignore_errors=True)
                    part.rename(folder)
                    seconds, ran, metrics = result.seconds, True, result.metrics
                count = metrics["count"]
                branches = {k: v for k, v in metrics.items() if k.startswith("branch")}
                rows.append([name, DATASETS[dataset], tiling, count["n"], f"{count['mae']:.2f}", f"{count['rmse']:.2f}",
                             " ".join(f"{k[-1]}:{v['mae']:.2f}" for k, v in sorted(branches.items())) or "-",
                             f"{seconds:.0f}" if seconds is not None else "?", "run" if ran else "found"])
                records.append({"model": name, "sha256": info.get("sha256"), "dataset": dataset, "split": args.split,
                                "tiling": tiling,
                                "engine": args.engine, "feature_cache": cache is not None,
                                "folder": str(folder), "metrics": metrics, "seconds": seconds, "ran": ran})
    run["results"], run["limit"] = str(results), limit
    run["evaluations"] = records
    C.table(["model", f"{args.split} set", "tiling", "images", "MAE", "RMSE", "branch MAEs", "seconds", ""], rows,
            title="Accuracy, standard protocol (true count: annotated points), "
                  f"{'bfloat16' if args.engine == 'bf16' else 'float32'}, CPU")
    run.finish()
    if temporary:
        shutil.rmtree(results, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
