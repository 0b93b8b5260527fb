"""``deepcount evaluate``: MAE/RMSE of a model on a dataset split (Tables 2-4, 7), printed and written."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..evaluation import PROTOCOLS, evaluate, resolve_ground_truth
from .common import BATCH_SIZE_HELP, TILING_HELP, TILING_MODES, add_device_option, add_model_option, positive_int
from . import COMMANDS

# ----------------------------------------------------------------------------- command line
def _branch_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(t) for t in re.split(r"[,\s]+", text.strip()) if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected branch numbers such as 1,3,5 or 'none', got {text!r}") from None
    if not values or any(v not in range(1, 6) for v in values):
        raise argparse.ArgumentTypeError(f"branches are 1..5 (or 'none'), got {text!r}")
    return values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _run(args: argparse.Namespace) -> int:
    from ..datasets import dataset_root, load_dataset
    from ..engines import out_of_memory
    from ..images import ImageLoadError
    from ..engines import resolve_device
    from ..weights import load_network

    def fail(message: str, code: int = 2) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    gt_options = [opt for opt, value in (("--ground-truth", args.ground_truth), ("--sigma", args.sigma),
                                         ("--kernel-size", args.kernel_size), ("--keep-mass", args.keep_mass))
                  if value is not None]
    if args.protocol == "points" and gt_options:
        return fail(f"{', '.join(gt_options)} only apply to --protocol blurred "
                    "(--protocol points counts the annotations)")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        return fail(str(e))
    try:
        model, info = load_network(args.model)
    except (OSError, ImportError, KeyError, ValueError, RuntimeError) as e:  # incl. HashMismatchError
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return fail(f"cannot load weights {args.model!r}: {text}")
    print(f"model: {info.get('name', '?')}: {info.get('description') or 'weights from ' + str(info.get('file'))}",
          file=sys.stderr)
    try:
        dataset = load_dataset(args.dataset, args.root, args.split)
        root = dataset_root(args.dataset, args.root)
    except (OSError, ValueError) as e:
        return fail(f"cannot load dataset {args.dataset} {args.split}: {e}")
    ground_truth = gt_source = None
    if args.protocol == "blurred":
        try:
            ground_truth, gt_source = resolve_ground_truth(info, args.ground_truth, args.sigma, args.kernel_size,
                                                   args.keep_mass)
        except ValueError as e:
            return fail(str(e))
    tiling = args.tiling or info.get("tiling") or "pad"
    out = Path(args.out) if args.out else Path("runs") / "evaluation" / _slug(
        f"{info.get('name', 'model')}_{args.dataset}_{args.split}_{tiling}_{args.protocol}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create the output folder {out}: {e.strerror or e}")
    try:
        result = evaluate(model, dataset, tiling=tiling, protocol=args.protocol, ground_truth=ground_truth,
                          branches=args.branches, batch_size=args.batch_size, device=device,
                          limit=args.limit, progress=not args.quiet, info=info, dataset_name=args.dataset,
                          root=root)
    except KeyboardInterrupt:
        return fail("interrupted; nothing written", 130)
    except ImageLoadError as e:
        return fail(f"cannot read a dataset image: {e}", 1)
    except ValueError as e:
        return fail(str(e))
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return fail(f"out of memory ({type(e).__name__}); try --batch-size 1", 1)
    if ground_truth is not None:
        result.ground_truth_source = gt_source  # why this ground truth, not just "given"
    print(result.headline())
    print(result.table())
    try:
        written = result.write(out)
    except OSError as e:
        return fail(f"cannot write the results into {out}: {e.strerror or e}")
    for path in written:
        print(f"wrote {path}")
    return 0


def add_command(subparsers) -> None:
    """Register the `evaluate` subcommand on the `deepcount` parser."""
    p = subparsers.add_parser(
        "evaluate", help=COMMANDS["evaluate"][1],
        description="Evaluate weights on a test split: MAE and RMSE (eq. 5-6) of the count (a "
                    "DeepCount's backbone, a CSRNet's map sum) and of each attached branch's map sum "
                    "(Table 7), printed and written into DIR as evaluation.json (settings, metrics "
                    "and per-image rows; what `deepcount report` reads), evaluation.md (the same as a "
                    "Markdown table) and per_image.csv (image, height, width, tiles, annotations, "
                    "truth, count, branch1..5). Exit code 2 for a usage, weights or dataset error, 1 "
                    "if an image cannot be read, 130 if interrupted (nothing written).")
    add_model_option(p)
    p.add_argument("--weights", dest="model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--dataset", default="shb", choices=["sha", "shb", "mall", "ucf_qnrf", "jhu", "nwpu", "custom"],
                   help="dataset (default: %(default)s)")
    p.add_argument("--split", default="test", help="split (default: %(default)s)")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="the dataset's folder (default: its release folder in $DEEPCOUNT_DATA)")
    p.add_argument("--tiling", default=None, choices=list(TILING_MODES),
                   help=TILING_HELP)
    p.add_argument("--protocol", default="points", choices=list(PROTOCOLS),
                   help="ground truth: points = number of annotations (standard, default); blurred = "
                        "sum of the blurred density map (authors' code)")
    p.add_argument("--ground-truth", default=None, choices=["paper", "official"],
                   help="blurred only: paper = sigma 5, 31x31, mass kept; official = sigma 10, 49x49, "
                        "mass off the image lost (default: what the weights were trained with if "
                        "their description says, else official)")
    p.add_argument("--sigma", type=float, default=None, help="blurred only: override the Gaussian's sigma")
    p.add_argument("--kernel-size", type=int, default=None,
                   help="blurred only: override the odd kernel size (default with --sigma: 2*ceil(3 sigma)+1)")
    p.add_argument("--keep-mass", default=None, action=argparse.BooleanOptionalAction,
                   help="blurred only: keep each head's mass inside the image (or, --no-keep-mass, lose "
                        "what falls off it)")
    p.add_argument("--branches", type=_branch_list, default=None, metavar="LIST",
                   help="DeepCount branches to evaluate, e.g. 1,5, or none (default: all attached)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="the first N images only")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=BATCH_SIZE_HELP)
    add_device_option(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for evaluation.json, evaluation.md and per_image.csv (default: "
                        "runs/evaluation/<model>_<dataset>_<split>_<tiling>_<protocol>, under the current folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
