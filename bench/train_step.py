"""Benchmark 5b: training-step throughput (crops/s) of the full-width DeepCount (all five
branches, PReLU): ``forward_maps`` + ``loss.paper_loss`` + ``backward`` + an SGD step on real
ShanghaiTech B training crops with their targets (made before timing), at a couple of batch
sizes.  Three variants are timed alternately in one process: NCHW and channels_last, each
with glibc's default malloc (freed activations returned to the OS and page-faulted back), and
channels_last with the memory retained (``engines.retain_cpu_memory``), which is what
``deepcount train`` runs on a CPU by default (``--trainer.memory_format contiguous`` gives
NCHW).  ``deepcount.training`` is not used: this is the step itself.

    python bench/train_step.py [--smoke] [--out FILE] [--batches 1 4] [--rounds N]
"""

from __future__ import annotations

import copy
import warnings

import _common as C
import torch

from deepcount.engines import glibc_malloc_defaults, retain_cpu_memory
from deepcount.loss import WEIGHT_DECAY, paper_loss
from deepcount.model import DeepCount


def crops(n: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, str]:
    """``n`` training crops and their targets: ShanghaiTech B train (CrowdCrops, seeded) or noise."""
    try:
        from deepcount.crops import CrowdCrops

        data = CrowdCrops(C.shb("train"))
        torch.manual_seed(0)
        samples = [data[i] for i in range(n)]
        x = torch.stack([s[0] for s in samples])
        maps = [torch.stack([s[1][k] for s in samples]) for k in range(5)]
        count = torch.stack([s[1][5] for s in samples])
        return x, maps, count, "ShanghaiTech B train crops (CrowdCrops, seed 0)"
    except Exception as e:  # noqa: BLE001
        g = torch.Generator().manual_seed(0)
        from deepcount.model import MAP_SIZES

        maps = [torch.rand(n, 1, *MAP_SIZES[k], generator=g) * 0.01 for k in sorted(MAP_SIZES)]
        return torch.randn(n, 3, 384, 512, generator=g), maps, maps[0].sum((1, 2, 3)), f"noise ({type(e).__name__})"


def main() -> int:
    p = C.parser("train_step", __doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("train_step", args)
    width = 0.125 if args.smoke else 1.0
    batches = args.batches or ([1, 2] if args.smoke else [1, 4])
    rounds = args.rounds or (2 if args.smoke else 3)
    torch.manual_seed(0)
    base = DeepCount(width=width).train()
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    variants = {"nchw": base, "channels_last": cl, "channels_last_retain": copy.deepcopy(cl)}
    retain_cpu_memory()  # every variant but the *_retain one runs inside glibc_malloc_defaults()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-9, momentum=0.9, weight_decay=WEIGHT_DECAY)
            for k, m in variants.items()}
    x_all, maps_all, count_all, source = crops(max(batches))
    run["width"], run["input"], run["rounds"] = width, source, rounds
    run["batches"] = {}
    rows = []
    for b in batches:
        x, maps, count = x_all[:b], [m[:b] for m in maps_all], count_all[:b]
        xs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}
        xs["channels_last_retain"] = xs["channels_last"]
        losses = {}

        def step(name: str) -> float:
            if name.endswith("_retain"):
                return _step(name)
            with glibc_malloc_defaults():
                return _step(name)

        def _step(name: str) -> float:
            model, opt = variants[name], opts[name]
            opt.zero_grad(set_to_none=True)
            c, m = model.forward_maps(xs[name])
            loss, _ = paper_loss(c, m, count, maps)
            loss.backward()
            opt.step()
            losses[name] = float(loss)
            return losses[name]

        times = C.alternate({k: (lambda k=k: step(k)) for k in variants}, rounds, warmup=1)
        res = {k: {**C.stats(v, b), "last_loss": losses[k]} for k, v in times.items()}
        res["speedup_vs_nchw"] = {k: C.paired_ratio(times["nchw"], times[k]) for k in variants if k != "nchw"}
        run["batches"][str(b)] = res
        for k in variants:
            rows.append([b, k, res[k]["per_s"], res[k]["median_s"], f"{res[k]['spread_pct']:.0f}%",
                         res["speedup_vs_nchw"][k]["median"] if k != "nchw" else None])
    C.table(["batch", "variant", "crops/s", "s / step", "spread", "vs nchw (paired)"], rows,
            title=f"Training step, DeepCount width {width}, all 5 branches, {rounds} rounds")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
