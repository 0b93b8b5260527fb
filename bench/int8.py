"""Benchmark: int8 (onnxruntime static quantization) against float32 for the trained default model.

The model (default: the bundled ``default``, tiling ``features``) is exported to ONNX (its frozen
frontend as a file of its own) and quantized by :func:`deepcount.export.quantize_int8`: the
whole frontend file, and of the count graph the first K convolutions for each ``--convs K``
(``all``: every one); calibration on ``--calibration`` ShanghaiTech B training images outside
the validation split (never validation or test images).  Each copy and the float32 export then
count the images of ``--split`` (``val``: the 10% validation split carved from the training set,
seed 0, where choices are made; ``test``: the full test set, to report) with ``Counter``
(onnxruntime, its default threads), one image at a time, the copies taking turns on every image
so that load changes hit all alike.  Printed and written: seconds per image, the speed-up over
float32 (paired per image), MAE, RMSE and bias of each, and how far each copy's counts move from
float32's.

    python bench/int8.py [--smoke] [--model NAME|FILE] [--convs 2 4 all] [--calibration 16]
                         [--split val|test] [--limit N]
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import numpy as np


def main() -> int:
    p = C.parser("int8", __doc__.splitlines()[0])
    p.add_argument("--model", default="default", metavar="NAME|FILE")
    p.add_argument("--convs", nargs="+", default=["2", "4"], metavar="K|all",
                   help="count-graph convolutions to quantize, one copy each (default: 2 4)")
    p.add_argument("--calibration", type=int, default=16, metavar="N", help="training images to calibrate on")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--limit", type=int, default=None, help="the first N images of the split only")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("int8", args)
    from deepcount import Counter
    from deepcount.datasets import train_val_split
    from deepcount.export import export, quantize_int8
    from deepcount.images import load_image

    train, val = train_val_split(C.shb("train"), 0.1, seed=0)
    images = val if args.split == "val" else C.shb("test")
    items = list(images)[: 1 if args.smoke else args.limit]
    calib_n = 1 if args.smoke else args.calibration
    step = max(1, len(train) // calib_n)
    calibration = [train[i].image for i in range(0, len(train), step)][:calib_n]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        t0 = time.perf_counter()
        export(args.model, "onnx", fp32)
        copies = {"fp32": fp32}
        quantization = {}
        for k in args.convs:
            path = Path(tmp) / f"int8-{k}.onnx"
            t = time.perf_counter()
            quantization[k] = quantize_int8(fp32, path, calibration, None if k == "all" else int(k))
            quantization[k]["seconds"] = round(time.perf_counter() - t, 1)
            copies[f"int8, count convs {k}"] = path
        run["export_and_quantize_s"] = round(time.perf_counter() - t0, 1)
        counters = {name: Counter.load(path) for name, path in copies.items()}
        counts = {name: [] for name in counters}
        seconds = {name: [] for name in counters}
        names = list(counters)
        for i, item in enumerate(items):
            image = load_image(item.image)
            if i == 0:
                for c in counters.values():  # first calls (session warm-up) are not timed
                    c.count(image)
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                t = time.perf_counter()
                counts[name].append(counters[name].count(image).count)
                seconds[name].append(time.perf_counter() - t)
    truth = np.array([float(it.count) for it in items])
    base = np.array(counts["fp32"])
    rows, results = [], {}
    for name in names:
        c = np.array(counts[name])
        err = c - truth
        moved = c - base
        ratio = C.paired_ratio(seconds["fp32"], seconds[name])
        results[name] = {"seconds": C.stats(seconds[name], 1), "speedup_vs_fp32": ratio,
                         "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                         "bias": float(err.mean()), "counts": c.tolist(),
                         "moved_mean_abs": float(np.abs(moved).mean()),
                         "moved_max_rel": float(np.max(np.abs(moved) / np.maximum(base, 1.0)))}
        rows.append([name, statistics.median(seconds[name]), ratio["median"], results[name]["mae"],
                     results[name]["rmse"], results[name]["bias"], results[name]["moved_mean_abs"],
                     results[name]["moved_max_rel"]])
    run["model"], run["split"], run["images"] = args.model, args.split, len(items)
    run["calibration_images"] = [Path(p).name for p in calibration]
    run["quantization"], run["results"] = quantization, results
    C.table(["copy", "s/image (median)", "speed-up vs fp32 (paired)", "MAE", "RMSE", "bias",
             "mean |count - fp32|", "max rel. move"], rows,
            title=f"int8 vs float32, onnxruntime, ShanghaiTech B {args.split} ({len(items)} images), "
                  f"calibrated on {len(calibration)} training images")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
