"""Benchmark 7: phantom counts, what a model counts where nobody is: blank pictures (grey, black,
white, one 384x512 tile each), a 1-pixel-high grey strip 5,000 pixels long (10 tiles that are
all padding but one row), and a 1x1 picture (one tile of padding), with every tiling a model
can use.  A DeepCount is shown as it counts (tile counts clamped at 0) and, beside it, with the
clamp taken off (the sum of its raw tile counts), so what training taught it about padding is
visible apart from the clamp.  Not a timing benchmark.

    python bench/phantom_counts.py [--smoke] [--out FILE] [--model NAME|PATH ...]
"""

from __future__ import annotations

import warnings

import _common as C
import numpy as np
import torch

from deepcount.model import DeepCount

PICTURES = {
    "grey 384x512": np.full((384, 512, 3), 128, np.uint8),
    "black 384x512": np.zeros((384, 512, 3), np.uint8),
    "white 384x512": np.full((384, 512, 3), 255, np.uint8),
    "grey strip 1x5000": np.full((1, 5000, 3), 128, np.uint8),
    "grey 1x1": np.full((1, 1, 3), 128, np.uint8),
}


def raw_count(model: DeepCount, image: np.ndarray, tiling: str, level: str | None) -> float:
    """The sum of a DeepCount's tile counts without the clamp at 0."""
    from deepcount.features import frontend_features
    from deepcount.tiling import feature_batches, plan_tiles, tile_batches

    plan = plan_tiles(*image.shape[:2], tiling)
    batches = (feature_batches(frontend_features(model, image, level), plan, 8) if tiling == "features"
               else tile_batches(image, plan, 8))
    with torch.inference_mode():
        return float(sum(float(model(b, **({"level": level} if tiling == "features" else {})).sum())
                         for b, _ in batches))


def main() -> int:
    p = C.parser("phantom_counts", __doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=None,
                   help="models to measure (default: csrnet-baseline and default; --smoke: a small untrained DeepCount)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("phantom_counts", args)
    from deepcount.predict import Counter

    counters: dict[str, Counter] = {}
    if args.smoke:
        torch.manual_seed(0)
        small = DeepCount(width=0.125, branches=[1]).eval()
        counters["small untrained"] = Counter(small, {"name": "small", "feature_level": "conv4_2"},
                                              torch.device("cpu"))
    else:
        for name in args.model or ["csrnet-baseline", "default"]:
            counters[name] = Counter.load(name, device="cpu")
    rows, results = [], {}
    for name, counter in counters.items():
        tilings = ["pad", "grid"] + (["features"] if getattr(counter.model, "feature_levels", ()) else [])
        for tiling in tilings:
            c = Counter(counter.model, {**counter.info, "tiling": tiling}, counter.device, tiling)
            for picture, image in PICTURES.items():
                result = c.count(image)
                raw = raw_count(c.model, image, tiling, c.level) if not getattr(c.model, "counts_by_map", True) else None
                results.setdefault(name, {}).setdefault(tiling, {})[picture] = {
                    "count": result.count, "tiles": result.tiles, "unclamped": raw}
                rows.append([name, tiling, picture, result.tiles, result.count, raw])
    run["models"] = {n: c.description for n, c in counters.items()}
    run["results"] = results
    C.table(["model", "tiling", "picture", "tiles", "count", "count without the clamp"], rows,
            title="Phantom counts (nobody is there)")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
