"""``deepcount models`` (the registry) and ``deepcount summary`` (Table 1's parameter counts)."""

from __future__ import annotations

import argparse
import json

from . import COMMANDS


def _summary(args: argparse.Namespace) -> int:
    from ..model import CSRNet, DeepCount, count_parameters

    model = DeepCount(width=args.width)
    rows = [("frontend (VGG16 conv1_1..conv4_3)", count_parameters(model.backbone.frontend)),
            ("backbone (inference model)", count_parameters(model.backbone))]
    rows += [(f"branch {k}", count_parameters(b)) for k, b in model.branches.items()]
    rows += [("DeepCount, all branches (training)", count_parameters(model)),
             ("CSRNet (baseline)", count_parameters(CSRNet(width=args.width)))]
    print(f"width {args.width}")
    for name, n in rows:
        print(f"{name:<36} {n:>12,}  {n / 1e6:7.2f} M")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..weights import available_models

    rows = available_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def test(row: dict) -> str:
        return "; ".join(f"{ds} MAE {m['mae']:.1f} RMSE {m['rmse']:.1f} ({m['images']} images)"
                         for ds, m in row["test"].items()) or "not measured"

    def size(row: dict) -> str:
        return f"{row['size'] / 1e6:.0f} MB" if row["size"] is not None else "-"

    table = [("name", "trained on", "test (full sets, points)", "tiling", "size", "here")]
    table += [(r["name"] + (" (default)" if r["default"] else ""), r["dataset"], test(r), r["tiling"], size(r),
               r["where"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    print("\n".join(["", *(f"{r['name']}: {r['description']}" for r in rows)]))
    return 0


def add_command(sub) -> None:
    """Register ``models`` and ``summary``."""
    p = sub.add_parser("models", help=COMMANDS["models"][1],
                       description="The models --model takes by name: what each was trained on, its "
                                   "MAE/RMSE on full test sets (docs/RESULTS.md), its file size and "
                                   "whether it is here (bundled in the package, cached, or fetched or "
                                   "converted on first use).")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=_models)

    p = sub.add_parser("summary", help=COMMANDS["summary"][1],
                       description="Parameter counts of DeepCount's frontend, backbone (the inference "
                                   "model: 21.4M in Table 1) and each branch, and of the CSRNet "
                                   "baseline, at a channel width; builds the networks, loads no weights.")
    p.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier (1.0: the paper's network; default: %(default)s)")
    p.set_defaults(func=_summary)
