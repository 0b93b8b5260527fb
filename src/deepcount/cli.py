"""The ``deepcount`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _count(args: argparse.Namespace) -> int:
    from .images import IMAGE_EXTENSIONS, ImageLoadError
    from .predict import Counter

    files: list[Path] = []
    failed = 0
    for p in map(Path, args.paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                print(f"error: {p}: no images in this folder", file=sys.stderr)
                failed += 1
            files += found
        else:
            files.append(p)
    counter = Counter.load(args.model, device=args.device, tiling=args.tiling, batch_size=args.batch_size)
    print(f"model: {counter.description}", file=sys.stderr)
    width = max([len(str(f)) for f in files] + [5])
    print(f"{'image':<{width}}  {'count':>9}  tiles")
    for f in files:
        try:
            res = counter.count(f)
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{str(f):<{width}}  {res.count:>9.1f}  {res.tiles}")
    return 1 if failed else 0


def _summary(args: argparse.Namespace) -> int:
    from .model import CSRNet, DeepCount, count_parameters

    model = DeepCount(width=args.width)
    rows = [("frontend (VGG16 conv1_1..conv4_3)", count_parameters(model.backbone.frontend)),
            ("backbone (inference model)", count_parameters(model.backbone))]
    rows += [(f"branch {k}", count_parameters(b)) for k, b in model.branches.items()]
    rows += [("DeepCount, all branches (training)", count_parameters(model)),
             ("CSRNet (baseline)", count_parameters(CSRNet(width=args.width)))]
    print(f"width {args.width}")
    for name, n in rows:
        print(f"{name:<36} {n:>12,}  {n / 1e6:7.2f} M")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepcount", description="DeepCount crowd counting")
    parser.add_argument("--version", action="version", version=f"deepcount {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("count", help="count people in images")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--model", default="default", help="registered model name or a .safetensors path")
    p.add_argument("--tiling", default=None, choices=["pad", "grid"],
                   help="pad: keep scale, pad to whole 384x512 tiles; grid: resize to a grid of "
                        "tiles (authors' code); default: the model's own")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=_count)

    p = sub.add_parser("summary", help="parameter counts per module (Table 1)")
    p.add_argument("--width", type=float, default=1.0)
    p.set_defaults(func=_summary)

    # Each of these modules owns its subcommand (its parser and what it runs).
    from . import export, serve, video
    for module in (video, export, serve):
        module.add_command(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
