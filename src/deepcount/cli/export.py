"""``deepcount export``: a model as ONNX or TorchScript, checked against PyTorch on real tiles."""

from __future__ import annotations

import argparse
import sys

from .common import add_device_option, add_model_option
from . import COMMANDS

# deepcount.export's FORMATS, OPSET, EXAMPLE_PHOTO and EXAMPLE_RESCALE, written out so that
# `deepcount export --help` needs no torch (tests/test_export.py checks they agree)
FORMATS = ("onnx", "torchscript")
OPSET = 18
EXAMPLE_PHOTO = "shanghaitech_b_test_IMG_1.jpg"
EXAMPLE_RESCALE = 0.6


def _describe_outputs(graph) -> str:
    from ..export import MAP_SIZES

    parts = ["count (N,)"]
    if graph.branch_index is not None:
        h, w = MAP_SIZES[graph.branch_index]
        parts.append(f"density (N,1,{h},{w})" + (" [CSRNet: always; count = its sum]"
                                                  if graph.counts_by_map else f" [branch {graph.branch_index}]"))
    return ", ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from ..extras import MissingExtraError, require
    from ..images import ImageLoadError

    try:
        require("export", "onnx", "onnxruntime")
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the exporter and the network (torch: seconds to import, so not at the top)
    from .. import export as ex
    from ..export import (FEATURE_SIZE, FEATURES_NAME, IMAGE_NAME, INPUT_NAME, INPUT_SIZE, META_PREFIX,
                          ExportError, frontend_path)
    from ..engines import resolve_device

    try:
        resolve_device(args.device)
        images = ex.check_images(args.check_images)  # first: a bad path fails before exporting
        result, graph = ex.export(args.model, args.format, args.output, args.density, args.opset)
    except (ExportError, ValueError, KeyError, FileNotFoundError, ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = result.metadata
    print(f"model: {meta[META_PREFIX + 'model_name']}: {meta[META_PREFIX + 'description'] or '(no description)'}")
    print(f"exported: {result.path} ({result.format})")
    print(f"  exporter: {result.exporter}")
    if graph.level is None:
        print(f"  input: {INPUT_NAME} (N,3,{INPUT_SIZE[0]},{INPUT_SIZE[1]}) float32, dynamic batch N")
    else:
        c = int(graph.example().shape[1])
        print(f"  input: {FEATURES_NAME} (N,{c},{FEATURE_SIZE[0]},{FEATURE_SIZE[1]}) float32, dynamic batch N: "
              f"48x64 tiles of the features at {graph.level} that {frontend_path(result.path).name} "
              f"makes from an {IMAGE_NAME} (1,3,H,W)")
    print(f"  outputs: {_describe_outputs(graph)}")
    print(f"  size: {result.size:,} bytes ({result.size / 2**20:.1f} MiB)")
    print(f"  sha256: {result.sha256}")
    print(f"  export time: {result.seconds:.1f} s")
    if result.format == "torchscript":
        print("  note: TorchScript is deprecated in recent torch; ONNX is what Counter "
              "(backend onnxruntime) loads")
    try:
        tiles = ex.real_tiles(images, meta[META_PREFIX + "tiling"], graph=graph)
        report = ex.check_parity(ex.exported_fn(result.path, result.format, args.device), graph, tiles,
                              device=args.device)
        if graph.level is not None:
            report.frontend_error = ex.check_frontend(result.path, graph, images, args.device)
    except (ExportError, ValueError) as e:
        print(f"parity check: FAIL ({e})")
        return 1
    what = "384x512 tiles" if graph.level is None else f"48x64 feature tiles ({graph.level})"
    print(f"parity vs PyTorch on {len(tiles)} real {what} of: " + "; ".join(n for n, _ in images))
    if report.frontend_error is not None:
        print(f"  frontend ({frontend_path(result.path).name}) over the whole images: "
              f"max rel err {report.frontend_error:.2e}")
    for row in report.rows:
        line = f"  batch {row.batch_size}: count max rel err {row.count_error:.2e}"
        if row.density_error is not None:
            line += f", density max rel err {row.density_error:.2e}"
        print(line)
    verdict = "PASS" if report.passed else "FAIL"
    print(f"{verdict}: max rel err {report.max_error:.2e} (threshold {report.threshold:.0e})")
    return 0 if report.passed else 1


def add_command(subparsers) -> None:
    """Register the `export` subcommand on the `deepcount` parser."""
    p = subparsers.add_parser(
        "export", help=COMMANDS["export"][1],
        description="Write the counting network as an ONNX or TorchScript file taking "
                    "(N,3,384,512) normalised tiles (dynamic N) and returning `count` (N,) and, "
                    "with --density, `density` (N,1,h,w); then compare it with PyTorch on real "
                    "tiles at batch 1 and 3 (PASS within 1e-4 relative, else exit 1).")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx for ONNX)")
    add_model_option(p)
    p.add_argument("--density", default=None, metavar="BRANCH|HxW",
                   help="also output this branch's density map (1..5 or e.g. 48x64); a DeepCount "
                        "export without it holds no branch")
    p.add_argument("--check-images", nargs="+", default=None, metavar="PATH",
                   help="real photos for the parity check (default: the repository's example "
                        f"photo, {EXAMPLE_PHOTO}, and the same photo at {EXAMPLE_RESCALE}x)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    add_device_option(p, "cpu", "where the parity check runs both models (the export itself is traced on the CPU)")
    p.set_defaults(func=_run)
