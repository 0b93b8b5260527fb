"""Benchmark 6: the frozen-frontend path (deepcount.features), side by side in one process.

1. Training step (crops/s): the whole network on 384x512 pixel crops (frontend at half the
   learning rate) against the network trained from cached frontend features cut at
   ``conv4_3`` (all of VGG16 frozen), ``conv4_2`` (conv4_3 trained) and ``pool3`` (conv4
   trained): forward_maps + eq. 3 + backward + an Adam step, on real ShanghaiTech B training
   crops and their targets, under the same precision (bf16 autocast, what configs/*_cpu.yaml
   train with; ``--precision fp32`` for float32), channels_last, alternating.
2. Caching (s per image): the frontend up to each level over a whole 768x1024 ShanghaiTech B
   training image (what FeatureCache computes once per image and mirror), bf16 and fp32.
3. Inference (images/s): tiling ``pad`` against ``features`` (conv4_2) on ShanghaiTech A test
   images of their own sizes (Counter, the default CPU engine, float32, backbone only),
   alternating per image.

    python bench/frozen_frontend.py [--smoke] [--out FILE] [--batch 16] [--rounds N] [--images N]
"""

from __future__ import annotations

import copy
import warnings

import _common as C
import torch

from deepcount.engines import retain_cpu_memory
from deepcount.loss import WEIGHT_DECAY, paper_loss
from deepcount.model import FRONTEND_LEVELS, DeepCount, frontend_split

LEVELS = ("conv4_3", "conv4_2", "pool3")


def main() -> int:
    p = C.parser("frozen_frontend", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="ShanghaiTech A test images timed (default 20)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    run = C.Run("frozen_frontend", args)
    width = 0.125 if args.smoke else 1.0
    batch = args.batch or (2 if args.smoke else 16)
    rounds = args.rounds or (2 if args.smoke else 3)
    n_images = args.images or (2 if args.smoke else 20)
    bf16 = args.precision == "bf16"
    retain_cpu_memory()  # what training and Counter do on a CPU
    run["width"], run["batch"], run["rounds"], run["precision"] = width, batch, rounds, args.precision

    from deepcount.crops import CrowdCrops
    from deepcount.datasets import load_dataset
    from deepcount.features import frontend_features
    from deepcount.images import load_image

    shb_train = C.shb("train")
    data = CrowdCrops(shb_train)
    torch.manual_seed(0)
    samples = [data[(i, i)] for i in range(batch)]
    x = torch.stack([s[0] for s in samples]).contiguous(memory_format=torch.channels_last)
    maps = [torch.stack([s[1][k] for s in samples]) for k in range(5)]
    count = torch.stack([s[1][5] for s in samples])
    torch.manual_seed(0)
    base = DeepCount(width=width).train().to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- 1. training step
    variants: dict[str, tuple[torch.nn.Module, torch.Tensor, str | None]] = {"whole": (base, x, None)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for level in LEVELS:
            net = copy.deepcopy(base)
            for prm in net.backbone.frontend[:frontend_split(level)].parameters():
                prm.requires_grad_(False)
            feats = net.backbone.frontend_until(x, level).float().contiguous(memory_format=torch.channels_last)
            variants[f"frozen_{level}"] = (net, feats, level)
    opts = {k: torch.optim.Adam([q for q in m.parameters() if q.requires_grad], lr=1e-9, weight_decay=WEIGHT_DECAY)
            for k, (m, _, _) in variants.items()}
    losses: dict[str, float] = {}

    def step(name: str) -> None:
        net, inputs, level = variants[name]
        opts[name].zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            c, m = net.forward_maps(inputs, level=level)
            loss, _ = paper_loss(c, m, count, maps)
        loss.backward()
        opts[name].step()
        losses[name] = float(loss)

    times = C.alternate({k: (lambda k=k: step(k)) for k in variants}, rounds, warmup=1)
    res = {k: {**C.stats(v, batch), "last_loss": losses[k],
               "trained_parameters": sum(q.numel() for q in variants[k][0].parameters() if q.requires_grad)}
           for k, v in times.items()}
    res["speedup_vs_whole"] = {k: C.paired_ratio(times["whole"], times[k]) for k in variants if k != "whole"}
    run["training"] = res
    C.table(["variant", "trained params", "crops/s", "s / step", "spread", "vs whole (paired)"],
            [[k, res[k]["trained_parameters"], res[k]["per_s"], res[k]["median_s"], f"{res[k]['spread_pct']:.0f}%",
              res["speedup_vs_whole"][k]["median"] if k != "whole" else None] for k in variants],
            title=f"Training step, width {width}, batch {batch}, {args.precision}, {rounds} rounds")

    # ---------------------------------------------------------------- 2. caching
    image = load_image(shb_train[0].image)
    net = variants["whole"][0].eval()
    cache_fns = {f"{level}_{prec}": (lambda level=level, prec=prec: frontend_features(net, image, level, precision=prec))
                 for level in LEVELS for prec in ("bf16", "fp32")}
    ctimes = C.alternate(cache_fns, rounds, warmup=1)
    run["caching"] = {"image": str(shb_train[0].image), "size": list(image.shape[:2]),
                      **{k: C.stats(v) for k, v in ctimes.items()}}
    C.table(["level", "precision", "s / image (768x1024)", "spread"],
            [[k.rsplit("_", 1)[0], k.rsplit("_", 1)[1], run["caching"][k]["median_s"],
              f"{run['caching'][k]['spread_pct']:.0f}%"] for k in cache_fns],
            title="Frontend features of one whole image (computed once per image and mirror)")

    # ---------------------------------------------------------------- 3. inference
    from deepcount.predict import Counter

    sha = load_dataset("sha", str(C.data_root() / "ShanghaiTech"), "test")[:n_images]
    images = [load_image(it.image) for it in sha]
    model = DeepCount(width=width, branches=[1]).eval()
    counters = {"pad": Counter(model, {"name": "bench"}, torch.device("cpu"), "pad"),
                "features": Counter(model, {"name": "bench", "feature_level": "conv4_2"}, torch.device("cpu"),
                                    "features")}
    tiles = {k: 0 for k in counters}

    def count_all(k: str) -> None:
        tiles[k] = sum(counters[k].count(im).tiles for im in images)

    itimes = C.alternate({k: (lambda k=k: count_all(k)) for k in counters}, max(2, rounds - 1), warmup=1)
    inf = {k: {**C.stats(v, len(images)), "tiles": tiles[k]} for k, v in itimes.items()}
    inf["speedup_features_vs_pad"] = C.paired_ratio(itimes["pad"], itimes["features"])
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    run["inference"] = {"images": len(images), "megapixels": pixels / 1e6, **inf}
    C.table(["tiling", "images/s", "tiles", "s for all", "vs pad (paired)"],
            [[k, inf[k]["per_s"], inf[k]["tiles"], inf[k]["median_s"],
              inf["speedup_features_vs_pad"]["median"] if k == "features" else None] for k in counters],
            title=f"Counting {len(images)} ShanghaiTech A test images of their own sizes ({pixels / 1e6:.1f} MP), "
                  f"width {width}, float32")
    run.finish()
    return 0


if __name__ == "__main__":
    assert set(LEVELS) <= set(FRONTEND_LEVELS)
    raise SystemExit(main())
