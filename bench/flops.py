"""Benchmark 1: FLOPs and parameters per layer and per module, counted by
``torch.utils.flop_counter.FlopCounterMode`` on a 384x512 input (meta tensors: nothing is
computed), next to the paper's Table 5 columns and Table 7 FLOPs row.

The paper's "FLOPs" are multiply-adds (its eq. 7, H*W*C*K1*K2*C'), so the comparable column is
``MACs = FLOPs / 2``.  Its eq. 7 also uses the *output* size for transposed convolutions,
where each output pixel only receives K1*K2/stride^2 taps: the "eq. 7" column applies the
paper's formula to our layer shapes to show where every paper number comes from.

    python bench/flops.py [--smoke] [--out FILE]
"""

from __future__ import annotations

import _common as C
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepcount.model import ALL_BRANCHES, INPUT_SIZE, CSRNet, DeepCount, count_parameters

# Table 5, million "FLOPs" (multiply-adds), row by row; Table 6 parameters; Table 7 FLOPs row.
PAPER_TABLE5 = {
    "csrnet_backend": [7248, 7248, 7248, 3624, 906, 226, 0.2],
    "deepcount_branch1": [37, 101, 403, 1611, 6442, 2],
    "deepcount_backbone": [3624, 906, 906, 226, 226, 57, 57, 14, 14, 3, 0.001],
}
PAPER_TABLE7_MFLOPS = {1: 6034, 2: 2152, 3: 541, 4: 138, 5: 38}
PAPER_PARAMS_M = {"csrnet": 16.3, "deepcount_backbone": 21.4}

LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def describe(m: nn.Module, out_shape: torch.Size) -> str:
    """The layer as Table 5 writes it, e.g. ``Conv-s2 3x3x256x512``."""
    if isinstance(m, nn.Linear):
        return f"FC {m.in_features}x{m.out_features}"
    kind = "Conv-tr" if isinstance(m, nn.ConvTranspose2d) else "Conv"
    cin, cout = (m.in_channels, m.out_channels)
    k1, k2 = m.kernel_size
    extra = f" d{m.dilation[0]}" if m.dilation[0] != 1 else ""
    return f"{kind}-s{m.stride[0]} {k1}x{k2}x{cin}x{cout}{extra}"


def eq7_macs(m: nn.Module, out_shape: torch.Size) -> float:
    """The paper's eq. 7 on this layer: output H*W*C'*K1*K2*C (what Table 5 prints)."""
    if isinstance(m, nn.Linear):
        return float(m.in_features * m.out_features)
    h, w = out_shape[-2:]
    k1, k2 = m.kernel_size
    return float(h * w * k1 * k2 * m.in_channels * m.out_channels)


def layer_table(model: nn.Module, run, x: torch.Tensor, prefix: str = "") -> tuple[list[dict], int]:
    """Every conv / conv-transpose / linear layer that ``run(model, x)`` calls, in call order:
    its FLOPs counted by FlopCounterMode on its own input, its parameters and output shape;
    and the FLOPs FlopCounterMode counts for the whole call (which must equal their sum)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, tuple, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp, out.shape)))
             for m in model.modules() if isinstance(m, LAYERS)]
    try:
        with FlopCounterMode(display=False) as whole:
            run(model, x)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for mod, inp, out_shape in calls:
        with FlopCounterMode(display=False) as one:
            mod(*inp)
        flops = one.get_total_flops()
        rows.append({"layer": prefix + names[mod], "kind": describe(mod, out_shape),
                     "output": "x".join(str(v) for v in (*out_shape[2:], out_shape[1])) if len(out_shape) == 4
                     else str(out_shape[-1]),
                     "flops": flops, "macs": flops / 2, "params": count_parameters(mod),
                     "eq7_macs": eq7_macs(mod, out_shape)})
    return rows, whole.get_total_flops()


def _sum(rows: list[dict], key: str, start: str = "") -> float:
    return sum(r[key] for r in rows if r["layer"].startswith(start))


def main() -> int:
    p = C.parser("flops", __doc__.splitlines()[0])
    args = p.parse_args()
    run = C.Run("flops", args)
    with torch.device("meta"):
        dc = DeepCount(branches=ALL_BRANCHES).eval()
        cs = CSRNet().eval()
        x = torch.empty(1, 3, *INPUT_SIZE)

    bb_rows, bb_total = layer_table(dc, lambda m, t: m(t), x)
    cs_rows, cs_total = layer_table(cs, lambda m, t: m.density(t), x)
    branches = {}
    for k in ALL_BRANCHES:
        rows, total = layer_table(dc, lambda m, t, k=k: m.forward_maps(t, [k]), x)
        branch_rows = [r for r in rows if r["layer"].startswith(f"branches.{k}.")]
        branches[k] = {"rows": branch_rows, "flops": _sum(branch_rows, "flops"),
                       "whole_flops": total, "eq7_macs": _sum(branch_rows, "eq7_macs"),
                       "paper_table7_mmacs": PAPER_TABLE7_MFLOPS[k],
                       "params": count_parameters(dc.branches[str(k)])}

    frontend = [r for r in bb_rows if r["layer"].startswith("backbone.frontend.")]
    columns = {
        "csrnet_backend": [r for r in cs_rows if not r["layer"].startswith("frontend.")],
        "deepcount_branch1": branches[1]["rows"],
        "deepcount_backbone": [r for r in bb_rows if not r["layer"].startswith("backbone.frontend.")],
    }
    table5 = {}
    for key, rows in columns.items():
        paper = PAPER_TABLE5[key]
        for r, pm in zip(rows, paper):
            r["paper_mmacs"] = pm
        table5[key] = {"rows": rows, "flops": _sum(rows, "flops"), "macs": _sum(rows, "macs"),
                       "eq7_macs": _sum(rows, "eq7_macs"), "paper_mmacs": sum(paper),
                       "paper_rows": len(paper), "rows_match_paper": len(paper) == len(rows)}

    front_flops = _sum(frontend, "flops")
    totals = {
        "frontend_flops": front_flops,
        "csrnet_flops": cs_total, "deepcount_backbone_flops": bb_total,
        "deepcount_branch1_flops": branches[1]["whole_flops"],
        "csrnet_over_backbone": cs_total / bb_total,
        "csrnet_over_backbone_backends": table5["csrnet_backend"]["flops"] / table5["deepcount_backbone"]["flops"],
        "layer_sums_match": {
            "deepcount_backbone": _sum(bb_rows, "flops") == bb_total,
            "csrnet": _sum(cs_rows, "flops") == cs_total,
            **{f"branch{k}": bb_total + branches[k]["flops"] == branches[k]["whole_flops"] for k in ALL_BRANCHES},
        },
    }
    params = {
        "frontend": count_parameters(dc.backbone.frontend),
        "deepcount_backbone": count_parameters(dc.backbone),
        "csrnet": count_parameters(cs),
        "csrnet_backend": count_parameters(cs.backend) + count_parameters(cs.output_layer),
        **{f"branch{k}": branches[k]["params"] for k in ALL_BRANCHES},
        "paper_m": PAPER_PARAMS_M,
    }
    run["input"] = list(x.shape)
    run["table5"] = table5
    run["table7"] = {k: {kk: v for kk, v in b.items() if kk != "rows"} for k, b in branches.items()}
    run["frontend_rows"] = frontend
    run["totals"] = totals
    run["params"] = params

    for key, col in table5.items():
        C.table(["layer", "kind", "output", "MFLOPs (torch)", "M MACs = /2", "paper M", "eq. 7 M", "params"],
                [[r["layer"], r["kind"], r["output"], r["flops"] / 1e6, r["macs"] / 1e6, r.get("paper_mmacs"),
                  r["eq7_macs"] / 1e6, r["params"]] for r in col["rows"]]
                + [["total", "", "", col["flops"] / 1e6, col["macs"] / 1e6, float(col["paper_mmacs"]),
                    col["eq7_macs"] / 1e6, sum(r["params"] for r in col["rows"])]],
                title=f"Table 5, {key} (1 x 3 x 384 x 512)")
    C.table(["branch", "output", "M MACs (torch)", "paper Table 7 M", "eq. 7 M (branch only)", "params"],
            [[k, branches[k]["rows"][-1]["output"], branches[k]["flops"] / 2e6, float(branches[k]["paper_table7_mmacs"]),
              branches[k]["eq7_macs"] / 1e6, branches[k]["params"]] for k in ALL_BRANCHES],
            title="Table 7, FLOPs row (the branch alone, on top of the backbone)")
    C.table(["network", "G MACs (torch)", "GFLOPs (torch)", "params"],
            [["VGG16 frontend (shared)", front_flops / 2e9, front_flops / 1e9, params["frontend"]],
             ["CSRNet", cs_total / 2e9, cs_total / 1e9, params["csrnet"]],
             ["DeepCount backbone", bb_total / 2e9, bb_total / 1e9, params["deepcount_backbone"]],
             ["DeepCount + branch 1", branches[1]["whole_flops"] / 2e9, branches[1]["whole_flops"] / 1e9,
              params["deepcount_backbone"] + params["branch1"]],
             ["CSRNet / DeepCount backbone", totals["csrnet_over_backbone"], None, None]],
            title="Whole networks per 384x512 crop")
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
