"""Benchmark 5a: ground-truth pyramids (the five sum-pooled maps and the count of each whole
image, Section 3.2) for every ShanghaiTech B image (400 train + 316 test = 716), from the
annotation files: cold (an empty cache), cached (the same cache again) and uncached; and the
same passes with the previous algorithm and cache (dense factors, per-head kernel cache),
alternating, for the speed-up.

Every pass includes reading the annotations (``load_dataset``) and the image sizes (the
JPEG headers), i.e. everything from the files on disk to the targets in memory.

    python bench/ground_truth.py [--smoke] [--out FILE] [--rounds N]
"""

from __future__ import annotations

import tempfile
import time

import _common as C
import numpy as np
from PIL import Image

from deepcount.targets import PAPER, POOL_FACTORS, GroundTruthCache, HeadKernels, sum_pool_axis


def items(limit: int | None):
    out = [it for split in ("train", "test") for it in C.shb(split)]
    return out[:limit] if limit else out


def dense_pyramid(k: HeadKernels) -> tuple[list[np.ndarray], float]:
    """The algorithm before this benchmark (kept as the reference): dense (heads x pixels)
    factors over the whole image, each pooled from scratch at every factor."""
    ky, kx = k._factors(0, 0, k.height, k.width)
    maps = [(sum_pool_axis(ky, f).T @ sum_pool_axis(kx, f)).astype(np.float32) for f in POOL_FACTORS]
    return maps, float(ky.sum(1) @ kx.sum(1))


def pyramids(limit: int | None, how: str, cache: GroundTruthCache | None) -> tuple[int, float]:
    """All pyramids from the files; (images, total count) as a check that the work was done."""
    total, n = 0.0, 0
    for it in items(limit):
        with Image.open(it.image) as im:
            w, h = im.size
        if how == "pyramid cache":
            count = cache.pyramid(it.points, h, w, PAPER).count
        elif how == "kernel cache + dense (before)":
            count = dense_pyramid(cache.get(it.points, h, w, PAPER))[1]
        elif how == "dense (before)":
            count = dense_pyramid(HeadKernels.from_points(it.points, h, w, PAPER))[1]
        else:
            count = HeadKernels.from_points(it.points, h, w, PAPER).pyramid().count
        total += count
        n += 1
    return n, total


def main() -> int:
    p = C.parser("ground_truth", __doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="repetitions of each pass (default 3)")
    args = p.parse_args()
    run = C.Run("ground_truth", args)
    limit = 20 if args.smoke else None
    rounds = args.rounds or (1 if args.smoke else 3)
    expected = sum(it.count for it in items(limit))
    rows, results = [], {}
    # (pass name, algorithm, which cache): the current code, then the previous algorithm with
    # the cache it had (per-head kernels), alternating in each round
    passes = (("uncached", "sparse", None), ("cold", "pyramid cache", "new"), ("cached", "pyramid cache", "new"),
              ("before: uncached", "dense (before)", None), ("before: cold", "kernel cache + dense (before)", "old"),
              ("before: cached", "kernel cache + dense (before)", "old"))
    for name, _, _ in passes:
        results[name] = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as new, tempfile.TemporaryDirectory() as old:
            caches = {"new": GroundTruthCache(new), "old": GroundTruthCache(old), None: None}
            for name, how, which in passes:
                start = time.perf_counter()
                n, total = pyramids(limit, how, caches[which])
                seconds = time.perf_counter() - start
                assert abs(total - expected) < 1e-3 * max(1, n), (name, total, expected)  # keep_mass: sums = heads
                results[name].append(seconds)
    out = {}
    for name, secs in results.items():
        s = C.stats(secs, n)
        out[name] = {**s, "images": n, "ms_per_image": 1000 * s["median_s"] / n}
        rows.append([name, n, s["median_s"], s["min_s"], s["max_s"], out[name]["ms_per_image"]])
    run["speedup_vs_before"] = {k: C.paired_ratio(results[f"before: {k}"], results[k]) for k in ("uncached", "cold", "cached")}
    run["images"] = n
    run["heads"] = expected
    run["passes"] = out
    run["target_s"] = 10.0
    run["target_met"] = bool(out["cold"]["median_s"] <= 10.0) if not args.smoke else None
    C.table(["pass", "images", "median s", "min s", "max s", "ms / image"], rows,
            title=f"ShanghaiTech B ground-truth pyramids ({n} images, {expected:,} heads, {rounds} rounds)")
    print("speed-up over the previous code (paired): " + ", ".join(
        f"{k} {v['median']:.1f}x" for k, v in run["speedup_vs_before"].items()))
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
