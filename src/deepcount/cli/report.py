"""``deepcount report``: the paper's tables with this repository's evaluations beside them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report import load_runs, report
from . import COMMANDS

# ----------------------------------------------------------------------------- command line
def _run(args: argparse.Namespace) -> int:
    runs, problems = load_runs(args.paths, strict=False)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    if not runs:
        print("error: no deepcount evaluation JSON among the paths given (write them with "
              "`deepcount evaluate`)", file=sys.stderr)
        return 2
    text = report(runs)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as e:
            print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
    if not args.quiet:
        sys.stdout.write(text)
    print(f"{len(runs)} run{'s' if len(runs) != 1 else ''}" + (f"; wrote {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def add_command(subparsers) -> None:
    """Register the `report` subcommand on the `deepcount` parser."""
    p = subparsers.add_parser(
        "report", help=COMMANDS["report"][1],
        description="Gather `deepcount evaluate` JSONs into the paper's table layouts (Tables 2, 3, 4, "
                    "7, 8, 9), the paper's numbers side by side with this repo's, each of ours naming "
                    "its recipe, tiling and ground-truth protocol; a Markdown report on stdout "
                    "(and in --out). Exit code 2 if a path is missing or not an evaluation.")
    p.add_argument("paths", nargs="+", metavar="EVAL",
                   help="evaluation.json files, or folders searched for them (other JSON files "
                        "found in folders are skipped)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the report here (e.g. report.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the report (with --out)")
    p.set_defaults(func=_run)
