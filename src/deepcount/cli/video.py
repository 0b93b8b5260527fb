"""``deepcount video``: count every frame of a video, a webcam or a stream: CSV rows, a plot,
optional overlaid frames."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..video import (VideoError, VideoRun, describe_source, is_url, open_source, parse_source, source_stem,
                     write_csv, write_plot)
from .common import (BATCH_SIZE_HELP, TILING_HELP, TILING_MODES, add_device_option, add_model_option,
                     positive_int, region_option)
from . import COMMANDS

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _run(args: argparse.Namespace) -> int:
    from ..predict import Counter
    from ..regions import RegionError

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        source = parse_source(args.source)
    except (TypeError, ValueError) as e:
        return fail(str(e))
    regions, problem = region_option(args.region)
    if problem:
        return fail(problem)
    out_dir = Path(args.out)
    stem = source_stem(source)
    csv_path = Path(args.csv) if args.csv else out_dir / f"{stem}_counts.csv"
    output = Path(args.output) if args.output else None
    if output is not None and isinstance(source, str) and _same_file(output, Path(source)):
        return fail(f"--output {str(output)!r} is the source video itself")
    try:
        cap = open_source(source)  # before loading the model: a bad source fails at once
    except VideoError as e:
        return fail(str(e))
    try:
        try:
            counter = Counter.load(args.model, device=args.device, tiling=args.tiling,
                                   batch_size=args.batch_size)
        except (KeyError, ValueError, OSError) as e:
            return fail(str(e).strip("'\""))
        print(f"model: {counter.description}", file=sys.stderr)
        for path in (csv_path, output, Path(args.plot) if args.plot else None):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        live = isinstance(source, int) or is_url(source)
        if live and args.max_frames is None:
            print("note: reading until the stream ends or Ctrl-C; --max-frames N stops after N "
                  "counted frames", file=sys.stderr)
        interrupted = False
        with VideoRun(counter, cap, args.every, args.max_frames, output,
                      progress=not args.quiet, regions=regions) as run:
            run.name = describe_source(source)
            try:
                for _ in run:
                    pass
            except KeyboardInterrupt:  # keep what was counted: files are still written
                interrupted = True
                print("\ninterrupted", file=sys.stderr)
            except (VideoError, RegionError) as e:  # RegionError: a mask of another size than the frames
                return fail(str(e))
    finally:
        cap.release()
    counts = run.counts
    written = [csv_path]
    write_csv(counts, csv_path)
    if args.plot:
        write_plot(counts, args.plot, f"{stem}: people over time\nmodel: {counter.name}")
        written.append(Path(args.plot))
    if output is not None and counts:
        written.append(output)
    values = [c.count for c in counts]
    fps_note = "" if run.fps_reported else " (assumed: the source reports none)"
    print(f"source          {describe_source(source)}, {run.fps:g} fps{fps_note}"
          + (f", {run.frame_size[1]}x{run.frame_size[0]}" if run.frame_size else ""))
    print(f"frames read     {run.frames_read}")
    print(f"frames counted  {len(counts)}" + (f" (every {args.every})" if args.every > 1 else "")
          + (f", {run.reused} of them repeats of the frame before, given its result" if run.reused else ""))
    if values:
        print(f"count           mean {sum(values) / len(values):.1f}   "
              f"min {min(values):.1f}   max {max(values):.1f}")
    for path in written:
        print(f"wrote           {path}")
    return 130 if interrupted else 0


def add_command(subparsers) -> None:
    """Register the `video` subcommand on the `deepcount` parser."""
    p = subparsers.add_parser(
        "video", help=COMMANDS["video"][1],
        description="Count people in every Nth frame of a video file, a webcam (its index, e.g. 0) "
                    "or a stream URL (rtsp://, http://, ...): a CSV of counts over time, and "
                    "optionally a plot and an annotated video with the density map.")
    p.add_argument("source", help="video file, webcam index (all digits) or stream URL")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="count every Nth frame (default 1: all)")
    p.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                   help="stop after N counted frames (for webcams and streams)")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="folder for the default CSV, <source stem>_counts.csv (default: .)")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="CSV of frame,time_s,count (default: DIR/<stem>_counts.csv)")
    p.add_argument("--plot", default=None, metavar="FILE", help="also a count-over-time PNG")
    p.add_argument("--output", default=None, metavar="FILE.mp4",
                   help="also an annotated video (mp4v): the counted frames with the density map "
                        "and the count, at source fps / N; computes the map (slower)")
    p.add_argument("--region", metavar="FILE",
                   help="also count inside regions (a JSON polygon file or a mask image, as for "
                        "`count --region`): a region:<name> column per region in the CSV, outlines on "
                        "--output, lines on --plot; computes the density map (slower)")
    add_model_option(p)
    p.add_argument("--tiling", default=None, choices=list(TILING_MODES),
                   help=TILING_HELP)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=BATCH_SIZE_HELP)
    add_device_option(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
