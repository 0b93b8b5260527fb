"""What every benchmark shares: arguments, the machine's description, alternating timers,
statistics, tables and the JSON file.

Rules (docs/PERFORMANCE.md): contenders are timed side by side in one process, alternating
(the order rotates each round), and compared by the median of their paired ratios; the load
average before and after a run is recorded with it, because this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

NOT_MEASURED_NO_GPU = "not measured: no GPU"


# The benches' data: $DEEPCOUNT_DATA, else ../shared/data beside the repository, set here so
# that deepcount.datasets.load_dataset(name, None, ...) finds it from any folder
os.environ["DEEPCOUNT_DATA"] = os.environ.get("DEEPCOUNT_DATA") or str(REPO.parent / "shared" / "data")


def data_root() -> Path:
    """Where the datasets are (see above)."""
    return Path(os.environ["DEEPCOUNT_DATA"])


def shb(split: str):
    """ShanghaiTech B ``split`` (FileNotFoundError / ValueError when the data is not there)."""
    from deepcount.datasets import load_dataset

    return load_dataset("shb", str(data_root() / "ShanghaiTech"), split)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run that only checks the benchmark still works (CI); its numbers mean nothing")
    p.add_argument("--out", default=None,
                   help=f"JSON file to write (default: bench/results/{name}[-smoke].json)")
    return p


def out_path(name: str, args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    return REPO / "bench" / "results" / f"{name}{'-smoke' if args.smoke else ''}.json"


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


class Run:
    """One benchmark run: the header (machine, command, load) and the sections it writes."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.args = args
        self.started = time.time()
        self.data: dict[str, Any] = {
            "benchmark": name,
            "command": "python " + " ".join([f"bench/{name}.py", *sys.argv[1:]]),
            "smoke": bool(args.smoke),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "machine": machine(),
            "loadavg_start": loadavg(),
        }
        print(f"# {self.data['command']}")
        m = self.data["machine"]
        print(f"# {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
              f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}; "
              f"load average {self.data['loadavg_start']}")

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def finish(self) -> Path:
        self.data["loadavg_end"] = loadavg()
        self.data["wall_s"] = round(time.time() - self.started, 3)
        path = out_path(self.name, self.args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1, default=_jsonable) + "\n")
        print(f"# load average at the end {self.data['loadavg_end']}; "
              f"{self.data['wall_s']:.1f} s; wrote {path}")
        return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


# ----------------------------------------------------------------------------- timing
def sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device | None = None) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
              device: str | torch.device | None = None,
              repeat: int | dict[str, int] = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in turn: every round runs each once, the
    order rotating by one each round, so load changes hit all of them alike.  ``repeat`` (one
    number, or one per name): each turn calls the function that many times back to back and
    times the last call only (its steady state, whatever another function's turn left)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range((repeat.get(name, 1) if isinstance(repeat, dict) else repeat) - 1):
                fns[name]()
            times[name].append(timed(fns[name], device))
    return times


def stats(seconds: Sequence[float], items: int = 1) -> dict[str, Any]:
    """Median and spread of per-call seconds, and ``items`` per second at the median."""
    s = sorted(seconds)
    med = statistics.median(s)
    q1, q3 = (statistics.quantiles(s, n=4)[0], statistics.quantiles(s, n=4)[2]) if len(s) >= 2 else (med, med)
    return {"seconds": [round(v, 6) for v in seconds], "median_s": med, "min_s": s[0], "max_s": s[-1],
            "iqr_s": q3 - q1, "spread_pct": 100.0 * (s[-1] - s[0]) / med if med > 0 else None,
            "per_s": items / med if med > 0 else None}


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> dict[str, float]:
    """How many times faster ``fast`` is than ``slow``: the median of the per-round ratios
    (the two were timed in the same rounds), with their min and max."""
    r = sorted(a / b for a, b in zip(slow, fast) if b > 0)
    return {"median": statistics.median(r), "min": r[0], "max": r[-1]}


# ----------------------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table (also valid as the body of a Markdown table)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n## {title}")
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def models(width: float, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The networks compared, random weights (speed does not depend on them): a DeepCount
    with branch 1 attached (its backbone alone is what counts) and a CSRNet."""
    from deepcount.model import CSRNet, DeepCount

    torch.manual_seed(0)
    return {"deepcount": DeepCount(width=width, branches=[1]).eval().to(device),
            "csrnet": CSRNet(width=width).eval().to(device)}


# The three contenders of Tables 5-6 at equal input: (label, network, branch asked for).
CONTENDERS = (("deepcount_backbone", "deepcount", None),
              ("csrnet", "csrnet", None),
              ("deepcount_branch1", "deepcount", 1))
