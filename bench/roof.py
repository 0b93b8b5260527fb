"""Benchmark 3: the roof.  The machine's measured matmul rate (large GEMMs in the same dtype,
through every library torch can use: MKL's sgemm, oneDNN as a 1x1 convolution, oneDNN's bf16
matmul) times nothing but the network's FLOP count gives the best possible crops/s; the
backbone's measured crops/s under each engine is reported as a percentage of it.  GEMMs and
networks are timed alternately in one process, so the load they see is the same.

CPU: DeepCount backbone (and CSRNet) at batch 8, float32 engines against the float32 roof and
the bf16 engine against the bf16 roof.  GPU (when one is present): the bf16 roof and the
backbone at batch 64 under the bf16 engines.

    python bench/roof.py [--smoke] [--out FILE] [--rounds N] [--batch B]
"""

from __future__ import annotations

import contextlib
import warnings

import _common as C
import torch
from torch.utils.flop_counter import FlopCounterMode

from deepcount.engines import PRESETS, Engine, engine_runner, glibc_malloc_defaults
from deepcount.model import INPUT_SIZE, CSRNet, DeepCount


def flops_per_crop(width: float) -> dict[str, int]:
    """FlopCounterMode's count for one 384x512 crop (meta tensors)."""
    out = {}
    with torch.device("meta"):
        nets = {"deepcount_backbone": DeepCount(width=width, branches=[]), "csrnet": CSRNet(width=width)}
        x = torch.empty(1, 3, *INPUT_SIZE)
    for k, net in nets.items():
        with FlopCounterMode(display=False) as fc:
            net(x)
        out[k] = fc.get_total_flops()
    return out


def gemms(device: str, n: int, smoke: bool) -> dict[str, tuple[callable, float, str]]:
    """name -> (call, flops per call, dtype) of the GEMMs that define the roof."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        lib = ("MKL sgemm" if dtype == torch.float32 else "oneDNN bf16 matmul") if device == "cpu" else "cuBLAS"
        out[f"matmul {str(dtype)[6:]} {n}^3 ({lib})"] = (lambda a=a, b=b: a @ b, 2.0 * n ** 3, str(dtype)[6:])
    if device == "cpu":  # oneDNN's own GEMM: a 1x1 convolution, NHWC, float32
        c, hw, batch = (256, 32, 2) if smoke else (1024, 64, 8)
        conv = torch.nn.Conv2d(c, c, 1, bias=False).eval()
        x = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)

        def one_by_one(conv=conv, x=x):
            with torch.inference_mode():
                return conv(x)
        out[f"1x1 conv {batch}x{c}x{hw}x{hw} -> {c} (oneDNN, NHWC)"] = (one_by_one, 2.0 * batch * hw * hw * c * c, "float32")
    if device == "cpu":  # MLAS, onnxruntime's GEMM
        try:
            run_ort = _ort_matmul(n)
            out[f"matmul float32 {n}^3 (onnxruntime MLAS)"] = (run_ort, 2.0 * n ** 3, "float32")
        except Exception as e:  # noqa: BLE001 - onnxruntime not installed
            print(f"# onnxruntime GEMM skipped: {e}")
    if device == "cuda":
        for precision in ("tf32",):
            a = torch.randn(n, n, generator=g, device=device)
            b = torch.randn(n, n, generator=g, device=device)

            def tf32(a=a, b=b):
                from deepcount.engines import precision_context
                with precision_context("tf32", "cuda"):
                    return a @ b
            out[f"matmul tf32 {n}^3 (cuBLAS)"] = (tf32, 2.0 * n ** 3, "tf32")
    return out


def _ort_matmul(n: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((n, n), dtype=np.float32)
    return lambda: sess.run(None, {"A": a})


def measure(device: str, batch: int, rounds: int, width: float, smoke: bool) -> dict:
    flops = flops_per_crop(width)
    n = 512 if smoke else (4096 if device == "cpu" else 8192)
    gemm = gemms(device, n, smoke)
    nets = {k: v.to(device) for k, v in C.models(width).items()}
    x = torch.randn(batch, 3, *INPUT_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    if device == "cpu":
        engines = {"eager": (PRESETS["eager"], "float32"), "channels_last": (PRESETS["channels_last"], "float32"),
                   "bf16": (PRESETS["bf16"], "bfloat16")}
    else:
        engines = {"bf16_channels_last": (PRESETS["bf16"], "bfloat16"),
                   "bf16_compile": (Engine("bf16_compile", channels_last=True, precision="bf16", compile=True), "bfloat16"),
                   "cudagraphs": (PRESETS["cudagraphs"], "bfloat16"),
                   "channels_last": (PRESETS["channels_last"], "tf32")}
    fns = {f"gemm|{k}": v[0] for k, v in gemm.items()}
    for ename, (eng, _) in engines.items():
        for net_key, label in (("deepcount", "deepcount_backbone"), ("csrnet", "csrnet")):
            runner = engine_runner(nets[net_key], eng, device)
            plain = ename == "eager" and device == "cpu"

            def call(runner=runner, plain=plain):
                with torch.inference_mode(), (glibc_malloc_defaults() if plain else contextlib.nullcontext()):
                    return runner(x)
            fns[f"{ename}|{label}"] = call
    if device == "cpu" and not smoke:
        try:
            from throughput import onnx_runners
            ort = onnx_runners(nets, torch.get_num_threads())
            xc = x.contiguous()
            for label in ("deepcount_backbone", "csrnet"):
                fns[f"onnxruntime|{label}"] = lambda r=ort[label]: r(xc)
            engines["onnxruntime"] = (None, "float32")
        except Exception as e:  # noqa: BLE001
            print(f"# onnxruntime skipped: {e}")
    for fn in fns.values():  # compile / first-call costs out of the rounds
        fn()
    repeat = {k: 3 if device == "cpu" and not smoke and k.split("|")[0] in ("channels_last", "bf16") else 1 for k in fns}
    times = C.alternate(fns, rounds, warmup=1 if not smoke else 0, device=device, repeat=repeat)
    rates = {}
    for k, (_, f, dtype) in gemm.items():
        s = C.stats(times[f"gemm|{k}"])
        rates[k] = {"dtype": dtype, "gflops": f / s["median_s"] / 1e9, "best_gflops": f / s["min_s"] / 1e9,
                    "median_s": s["median_s"]}
    roof = {}
    for dtype in {v["dtype"] for v in rates.values()}:
        best = max((k for k, v in rates.items() if v["dtype"] == dtype), key=lambda k: rates[k]["gflops"])
        roof[dtype] = {"gflops": rates[best]["gflops"], "gemm": best}
    nets_out = {}
    rows = []
    for ename, (_, dtype) in engines.items():
        for label in ("deepcount_backbone", "csrnet"):
            s = C.stats(times[f"{ename}|{label}"], batch)
            achieved = flops[label] * s["per_s"] / 1e9
            r = roof.get(dtype)
            best_crops = r["gflops"] * 1e9 / flops[label] if r else None
            pct = 100.0 * s["per_s"] / best_crops if best_crops else None
            nets_out[f"{ename}|{label}"] = {**s, "engine": ename, "network": label, "dtype": dtype,
                                           "achieved_gflops": achieved, "roof_crops_per_s": best_crops,
                                           "pct_of_roof": pct}
            rows.append([ename, label, dtype, s["per_s"], achieved, best_crops, pct])
    extra = {}
    if device == "cpu":
        extra["page_faults"] = page_faults({k: v for k, v in fns.items() if not k.startswith("gemm|")}, repeat)
        extra["profile"] = op_profile(fns["channels_last|deepcount_backbone"], repeat["channels_last|deepcount_backbone"])
        C.table(["engine|network", "minor page faults / call", "system s / call", "user s / call"],
                [[k, v["minor_faults"], v["system_s"], v["user_s"]] for k, v in extra["page_faults"].items()],
                title=f"{device}: page faults per call (steady state), batch {batch}")
        C.table(["op", "share of CPU time"], [[k, f"{100 * v:.1f}%"] for k, v in extra["profile"].items()],
                title=f"{device}: where the time goes, DeepCount backbone, channels_last, batch {batch} (torch.profiler)")
    C.table(["GEMM", "dtype", "GFLOP/s (median)", "GFLOP/s (best)"],
            [[k, v["dtype"], v["gflops"], v["best_gflops"]] for k, v in rates.items()],
            title=f"{device}: measured matmul rates ({rounds} rounds)")
    C.table(["engine", "network", "roof dtype", "crops/s", "GFLOP/s", "roof crops/s", "% of roof"], rows,
            title=f"{device}: batch {batch}, {flops['deepcount_backbone'] / 1e9:.1f} / {flops['csrnet'] / 1e9:.1f} "
                  "GFLOPs per crop (DeepCount backbone / CSRNet)")
    return {"batch": batch, "rounds": rounds, "flops_per_crop": flops, "gemm": rates, "roof": roof,
            "networks": nets_out, **extra}


def page_faults(fns: dict, repeat: dict) -> dict:
    """Minor page faults and system / user CPU seconds of one call of each function, after the
    calls a turn makes before its timed one (the steady state the timings measure)."""
    import resource

    out = {}
    for key, fn in fns.items():
        for _ in range(repeat.get(key, 1) - 1):
            fn()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[key] = {"minor_faults": r1.ru_minflt - r0.ru_minflt, "system_s": r1.ru_stime - r0.ru_stime,
                    "user_s": r1.ru_utime - r0.ru_utime}
    return out


def op_profile(fn, repeat: int) -> dict[str, float]:
    """Share of the CPU time of one steady-state call per operator group (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(repeat - 1):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {"convolution": ("mkldnn_convolution", "convolution_overrideable"), "prelu": ("prelu",),
              "relu": ("clamp_min", "relu"), "max_pool": ("max_pool",),
              "copy / layout": ("copy_", "contiguous", "clone")}
    totals = {g: 0.0 for g in groups}
    totals["other"] = 0.0
    all_time = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        all_time += t
        for g, names in groups.items():
            if any(n in e.key for n in names):
                totals[g] += t
                break
        else:
            totals["other"] += t
    return {g: t / all_time for g, t in totals.items()} if all_time else totals


def main() -> int:
    p = C.parser("roof", __doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("roof", args)
    width = 0.125 if args.smoke else 1.0
    run["width"] = width
    run["cpu"] = measure("cpu", args.batch or (1 if args.smoke else 8), args.rounds or (2 if args.smoke else 5),
                         width, args.smoke)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        run["cuda"] = measure("cuda", args.batch or (2 if args.smoke else 64), args.rounds or (3 if args.smoke else 20),
                              width, args.smoke)
    else:
        run["cuda"] = C.NOT_MEASURED_NO_GPU
        print(f"\n## cuda: {C.NOT_MEASURED_NO_GPU}")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
