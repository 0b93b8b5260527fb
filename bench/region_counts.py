"""Benchmark 8: counting inside regions, against the annotated points inside them, on the
validation split carved from ShanghaiTech B's training set (seed 0, 10%; never the test set).
Two polygons per image (the left half; a quadrilateral in the middle, a platform's shape); per
region the density map summed inside it (``map``) and its share of the map times the
backbone's count (``scaled``, what ``count --region`` reports).  Not a timing benchmark.

    python bench/region_counts.py [--smoke] [--out FILE] [--model NAME|PATH] [--images N]
"""

from __future__ import annotations

import warnings

import _common as C
import numpy as np


def regions(h: int, w: int):
    from deepcount.regions import Region

    return [Region("left half", polygon=np.array([[-0.5, -0.5], [w / 2 - 0.5, -0.5], [w / 2 - 0.5, h - 0.5],
                                                  [-0.5, h - 0.5]])),
            Region("middle", polygon=np.array([[w * 0.25, h * 0.3], [w * 0.75, h * 0.2], [w * 0.8, h * 0.9],
                                               [w * 0.2, h * 0.8]]))]


def main() -> int:
    p = C.parser("region_counts", __doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled default (--smoke: the CSRNet baseline)")
    p.add_argument("--images", type=int, default=None, help="validation images used (default 20; --smoke 2)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("region_counts", args)
    from deepcount.datasets import train_val_split
    from deepcount.predict import Counter

    counter = Counter.load(args.model or ("csrnet-baseline" if args.smoke else "default"), device="cpu")
    _, val = train_val_split(C.shb("train"), 0.1, seed=0)
    n = args.images or (2 if args.smoke else 20)
    errors: dict[str, list[float]] = {"map": [], "scaled": []}
    rows = []
    for item in list(val)[:n]:
        image = counter.read(item.image)
        h, w = image.shape[:2]
        regs = regions(h, w)
        result = counter.count(image, regions=regs)
        for reg in regs:
            truth = int(reg.inside(item.points, h, w).sum())
            got = result.regions[reg.name]
            for key in errors:
                errors[key].append(abs(got[key] - truth))
            rows.append([item.image.name, reg.name, truth, got["map"], got["scaled"]])
    mae = {k: float(np.mean(v)) for k, v in errors.items()}
    run["model"] = counter.description
    run["images"], run["regions"] = n, len(rows)
    run["mae"] = mae
    C.table(["image", "region", "annotated inside", "map inside", "scaled"], rows,
            title=f"Region counts, {counter.name}, ShanghaiTech B validation split")
    C.table(["region count", "MAE"], [[k, v] for k, v in mae.items()], title=f"{len(rows)} regions of {n} images")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
