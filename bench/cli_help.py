"""The command line's start-up: ``deepcount COMMAND --help`` for every command, in a fresh
interpreter each time (what a user waits for), and whether it imported torch or Lightning
(none should: only the invoked command's parser is built, and the heavy imports come with the
run).  Target: under 1 s each (issue 17).

    python bench/cli_help.py [--smoke] [--out FILE] [--repeat N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import _common as C

from deepcount.cli import COMMANDS

# the --help run, then which heavy modules it left imported (printed as JSON on stderr)
PROBE = ("import json, sys\nfrom deepcount.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write(json.dumps({m: m in sys.modules for m in ('torch', 'lightning')}))\n")


def main() -> int:
    p = C.parser("cli_help", __doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per command (the median is reported)")
    args = p.parse_args()
    run = C.Run("cli_help", args)
    repeat = 1 if args.smoke else args.repeat
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(C.REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    rows, result = [], {}
    for command in ["", *COMMANDS]:
        argv = [command, "--help"] if command else ["--help"]
        seconds, imported = [], {}
        for _ in range(repeat):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                                  cwd=C.REPO, env=env, timeout=300)
            seconds.append(time.perf_counter() - t)
            if "usage:" not in proc.stdout:
                raise SystemExit(f"deepcount {' '.join(argv)} printed no usage: {proc.stderr[-2000:]}")
            imported = json.loads(proc.stderr.strip().splitlines()[-1])
        name = command or "(none)"
        result[name] = {"median_s": statistics.median(seconds), "runs": len(seconds), "imports": imported,
                        "under_1s": statistics.median(seconds) < 1.0}
        rows.append([f"deepcount {' '.join(argv)}", statistics.median(seconds), min(seconds),
                     ", ".join(m for m, yes in imported.items() if yes) or "-"])
    run["result"] = result
    C.table(["command", "median s", "min s", "imported"], rows, title="--help start-up, a fresh interpreter each")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
