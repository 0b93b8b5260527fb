"""``deepcount analyses``: the paper's Tables 7, 8 and 9 rerun (train, evaluate, report), resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import COMMANDS
from .common import add_device_option, positive_int


def _run(args: argparse.Namespace) -> int:
    from ..analyses import PLAN, jobs, precision, run_analyses, state
    from ..config import ConfigError
    from ..extras import MissingExtraError, require

    extra = list(args.overrides)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        require("train", "jsonargparse", "yaml")
        plan = jobs(args.out, args.base, args.ablations, args.steps, args.only or (), extra, args.evaluations)
        whole = jobs(args.out, args.base, args.ablations, args.steps, (), extra, args.evaluations)
    except (ConfigError, MissingExtraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # jsonargparse's answer to a bad override (it printed why)
        return 2 if e.code else 0
    if args.dry_run:
        for job in plan:
            steps, features = precision(job)
            how = "trained" if state(job) in ("evaluated", "trained") else "trains here"
            print(f"{job.name:<28} {state(job):<10} {job.variant.tables}; {how} in {steps} on {features} features"
                  f"\n    deepcount train {' '.join(job.argv)}")
        print(f"{len(plan)} runs of {len(PLAN)} variants; evaluations in {plan[0].evaluation.parent if plan else '-'}")
        return 0
    from .common import training_failure

    try:
        text = run_analyses(plan, split=args.split, device=args.device, progress=not args.quiet, limit=args.limit,
                            log=lambda line: print(line, file=sys.stderr, flush=True), report_of=whole)
    except Exception as e:  # noqa: BLE001 - ours get their exit code, the rest propagate
        code = training_failure(e)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to go on from the last checkpoint", file=sys.stderr)
        return 130
    report = Path(args.report) if args.report else Path(args.out) / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    if not args.quiet:
        sys.stdout.write(text)
    print(f"wrote {report}", file=sys.stderr)
    return 0


def add_command(subparsers) -> None:
    """Register the `analyses` subcommand on the `deepcount` parser."""
    from ..analyses import PLAN

    p = subparsers.add_parser(
        "analyses", help=COMMANDS["analyses"][1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every variant of the paper's analyses from one base recipe (same steps, "
                    "crops and seeds), evaluate each on the full test split (backbone and every "
                    "branch), and write the paper's Tables 7, 8 and 9 with ours beside them "
                    "(`deepcount report`; seeds of one variant share a cell: mean and range). "
                    "Resumable: rerun the same command after a stop and it goes on from the last "
                    "checkpoint; finished runs and evaluations are kept.\n\nThe plan:\n"
                    + "\n".join(f"  {v.name:<12} seeds {','.join(map(str, v.seeds)):<4} "
                                f"{v.overlay or '(the base recipe)':<18} {v.tables}" for v in PLAN))
    p.add_argument("--base", default="configs/shb_cpu.yaml", metavar="YAML",
                   help="the recipe every variant starts from (default: %(default)s)")
    p.add_argument("--ablations", default=None, metavar="DIR",
                   help="the variants' YAML files (default: ablations/ beside --base)")
    p.add_argument("--out", default="runs/analyses", metavar="DIR",
                   help="the runs (checkpoints, weights) and report.md go here (default: %(default)s)")
    p.add_argument("--evaluations", default=None, metavar="DIR",
                   help="each run's evaluation goes into DIR/<run name>/ (default: OUT/evaluations); a run "
                        "already evaluated there is not trained again, so keep DIR to carry finished runs "
                        "over to another machine")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="optimizer steps of every run (default: the base recipe's)")
    p.add_argument("--only", nargs="+", choices=[v.name for v in PLAN], metavar="VARIANT",
                   help="train and evaluate these variants only (default: all); the report still "
                        "holds every run of the plan evaluated so far")
    p.add_argument("--split", default="test", help="the split evaluated (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate the split's first N images only: a trial (the report says N of how many)")
    add_device_option(p, what="where the evaluations run (training: the config's trainer.accelerator)")
    p.add_argument("--report", default=None, metavar="FILE", help="the report (default: OUT/report.md)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and commands; run nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no report on stdout")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="-- TRAIN_OVERRIDES",
                   help="after --: `deepcount train` overrides for every run (e.g. -- --data.num_workers 0)")
    p.set_defaults(func=_run)
