"""``deepcount count``: count the people in images (files, folders, glob patterns), a table on
stdout, optional CSV / JSON rows and density pictures."""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..images import DEFAULT_MAX_PIXELS
from .common import (BATCH_SIZE_HELP, TILING_HELP, TILING_MODES, add_device_option, add_model_option,
                     printable)
from . import COMMANDS


# ----------------------------------------------------------------------------- count
@dataclass
class _Item:
    """One entry of a ``count`` run: a file to count, or an argument that named none
    (``error`` set: a missing path, an empty folder, a pattern matching no image)."""

    label: str
    path: Path | None = None
    error: str | None = None


def _not_regular(path: Path) -> str | None:
    """Why ``path`` (after symlinks) cannot be read as an image file without blocking, or None:
    a FIFO would wait forever for a writer, a device could be endless."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the loader names the reason
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return f"not a regular file ({kind}): skipped"


def _pattern_regex(pattern: str) -> re.Pattern:
    """A glob pattern as a regular expression over ``/``-separated paths: ``**`` spans any
    number of folders (``**/`` also none), ``*`` and ``?`` stay inside one name."""
    import fnmatch

    out = ""
    parts = re.split(r"(\*\*/?)", pattern)
    for part in parts:
        if part == "**/":
            out += "(?:[^/]*/)*"
        elif part == "**":
            out += ".*"
        elif part:
            for j, seg in enumerate(part.split("/")):
                body = fnmatch.translate(seg)[4:-3] if seg else ""  # strip (?s: and )\Z
                out += ("/" if j else "") + body.replace(".*", "[^/]*").replace("(?s:.)", "[^/]")
    return re.compile(f"(?s:{out})\\Z")


def recursive_glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)`` that never follows a link to a folder while
    walking a ``**`` (links pointing up the tree would make it endless); the part before the
    first ``**`` is expanded as usual."""
    if "**" not in pattern:
        return glob.glob(pattern)
    head, _, _ = pattern.partition("**")
    base_pattern = head.rstrip("/") or "."
    bases = glob.glob(base_pattern) if glob.has_magic(base_pattern) else [base_pattern]
    found = []
    for base in bases:
        regex = _pattern_regex(pattern[len(head):])
        for root, dirs, files in os.walk(base, followlinks=False):
            rel = os.path.relpath(root, base)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in sorted(dirs + files):
                if regex.match(rel + name):
                    path = os.path.join(root, name)
                    found.append(os.path.relpath(path) if not head else path)  # as glob names them
    return found


def expand_paths(args: Sequence[str]) -> list[_Item]:
    """Files, folders (their images, by extension, in natural order) and glob patterns
    (expanded here when the shell did not, e.g. quoted ``"dir/*.jpg"``), in argument order,
    each file once.  Arguments that name no image become error items, so they are reported
    in their place and nothing is dropped silently."""
    from ..images import IMAGE_EXTENSIONS, image_files

    items: list[_Item] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            problem = _not_regular(path)
            items.append(_Item(str(path), None if problem else path, problem))

    for arg in args:
        p = Path(arg)
        if p.is_dir():
            try:
                found = image_files(p, special=True)
            except OSError as e:
                items.append(_Item(arg, error=f"cannot list this folder ({e.strerror or e})"))
                continue
            if not found:
                items.append(_Item(arg, error="no images in this folder (looked for "
                                              f"{', '.join(sorted(IMAGE_EXTENSIONS))})"))
            for f in found:
                add(f)
        elif os.path.lexists(arg):
            add(p)  # any file named explicitly is tried, whatever its extension
        elif glob.has_magic(arg):
            matches = sorted(recursive_glob(arg))
            files: list[Path] = []
            for m in map(Path, matches):
                files += image_files(m, special=True) if m.is_dir() else [m] if m.suffix.lower() in IMAGE_EXTENSIONS else []
            if not files:
                items.append(_Item(arg, error="no images match this pattern" if not matches else
                                   f"none of the {len(matches)} paths matching this pattern is an image"))
            for f in files:
                add(f)
        else:
            items.append(_Item(arg, error="no such file or folder"))
    return items


DENSITY_SUFFIX = ".density.png"  # an overlay's name: never a photo's own name


def density_names(paths: Sequence[Path]) -> list[str]:
    """One distinct PNG name per image: ``<stem>.density.png``; stems that occur more than once
    get their folder's name in front (``a_IMG_1.density.png``, ``b_IMG_1.density.png``), then
    ``-2``, ``-3`` ... if that is still not enough; a name that is one of the images' own
    (``x.density.png`` counted itself) gets a number too."""
    inputs = {p.name.lower() for p in paths}
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem.lower()] = stems.get(p.stem.lower(), 0) + 1
    used: set[str] = set()
    names = []
    for p in paths:
        base = p.stem
        if stems[p.stem.lower()] > 1:
            folder = Path(os.path.abspath(p)).parent.name or "root"
            base = f"{folder}_{p.stem}"
        name, n = base, 1
        while name.lower() in used or (name + DENSITY_SUFFIX).lower() in inputs:
            n += 1
            name = f"{base}-{n}"
        used.add(name.lower())
        names.append(name + DENSITY_SUFFIX)
    return names


def _cli_reason(reason: str) -> str:
    """The loader's advice in command-line terms."""
    reason = reason.replace("try batch size 1", "try --batch-size 1")
    return re.sub(r"pass max_pixels=(\d+) \(or None\)", r"use --max-pixels \1 (or 0 for no limit)", reason)


def _fmt_count(value: float) -> str:
    return f"{round(value, 1) + 0.0:.1f}"  # never "-0.0"


class _AtomicOutput:
    """A text file written under a temporary name beside ``path`` and renamed onto it when
    closed: ``path`` is never seen truncated or half-written (a crash, or a kill before the
    end, leaves the earlier file as it was).  ``discard()`` drops the temporary file."""

    def __init__(self, path: str, newline: str | None):
        import tempfile

        target = Path(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent or ".")
        self.path = target
        self.file = open(fd, "w", newline=newline, encoding="utf-8")

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> "_AtomicOutput":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.file.close()
        if kind is None or issubclass(kind, KeyboardInterrupt):  # whole rows so far: keep them
            os.replace(self.tmp, self.path)
        else:
            self.discard()

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _open_output(path: str, what: str) -> tuple[_AtomicOutput | None, str | None]:
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(21, "is a folder")
        return _AtomicOutput(path, "" if what == "csv" else None), None
    except OSError as e:
        return None, f"error: cannot write the {what} file {path}: {e.strerror or e}"


def _finite(value):
    """``value`` with every NaN or infinity replaced by None: JSON has no NaN."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _count(args: argparse.Namespace) -> int:
    import signal
    import threading

    def terminated(signum, frame):  # SIGTERM ends the run as Ctrl-C does: outputs kept whole
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return _count_images(args)
    except BrokenPipeError:  # whoever read stdout went away (`deepcount count dir | head`)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _count_images(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..archive import ROW_FIELDS, count_file
    from ..images import ImageLoadError
    from ..engines import resolve_device
    from ..progress import progress_bar
    from ..predict import Counter
    from .common import region_option

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.batch_size is not None and args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_pixels < 0:
        return fail(f"--max-pixels must be 0 (no limit) or more, got {args.max_pixels}")
    if args.side_by_side and args.density is None:
        return fail("--side-by-side draws the --density pictures: give --density DIR too")
    if args.density is not None:
        from matplotlib import colormaps

        from ..pictures import DEFAULT_CMAP

        args.cmap = args.cmap or DEFAULT_CMAP

        if args.cmap not in colormaps:
            return fail(f"--cmap {args.cmap!r} is not a matplotlib colormap "
                        "(e.g. jet, viridis, inferno, magma, turbo)")
    try:
        resolve_device(args.device)
    except ValueError as e:
        return fail(str(e))
    regions, problem = region_option(args.region)
    if problem:
        return fail(problem)

    if args.ray is not None or args.out is not None:
        return _count_on_ray(args, fail)
    for what, path in (("csv", args.csv), ("json", args.json)):  # checked, not touched, before the model
        if path is not None:
            folder = Path(path).parent
            problem = ("is a folder" if Path(path).is_dir() else "No such file or directory" if not folder.is_dir()
                       else "Permission denied" if not os.access(folder, os.W_OK) else None)
            if problem:
                return fail(f"cannot write the {what} file {path}: {problem}")
    try:  # the model first: a typo in --model must not touch any output file
        counter = Counter.load(args.model, device=args.device, tiling=args.tiling,
                               batch_size=args.batch_size, max_pixels=args.max_pixels or None,
                               backend=args.backend)
    except (OSError, ImportError, KeyError, ValueError, RuntimeError) as e:  # incl. HashMismatchError
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        return fail(f"cannot load model {args.model!r}: {text}")
    print(f"model: {counter.description}", file=sys.stderr)
    density_dir = Path(args.density) if args.density is not None else None
    if (density_dir is not None or regions is not None) and counter.picture_branch is None:
        return fail(f"model {counter.name} has no density map for --{'density' if density_dir else 'region'}")

    items = expand_paths(args.paths)
    for it in items:
        shown = printable(it.label)
        if shown != it.label:
            print(f"warning: {shown}: the file name is not valid UTF-8; it is written with \\x escapes",
                  file=sys.stderr)
            it.label = shown
    files = [it.path for it in items if it.path is not None]
    inputs = {os.path.realpath(f) for f in files}
    targets = {what: path for what, path in (("csv", args.csv), ("json", args.json)) if path is not None}
    for what, path in targets.items():
        if os.path.realpath(path) in inputs:
            return fail(f"--{what} {path} is one of the images to count; nothing was written")
    if len(targets) == 2 and os.path.realpath(targets["csv"]) == os.path.realpath(targets["json"]):
        return fail(f"--csv and --json are the same file ({args.csv}); nothing was written")
    pngs = dict(zip(files, density_names(files))) if density_dir is not None else {}
    if density_dir is not None:
        try:
            density_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return fail(f"cannot create the --density folder {density_dir}: {e.strerror or e}")

    with contextlib.ExitStack() as stack:
        outputs: dict[str, TextIO] = {}
        for what, path in targets.items():
            handle, problem = _open_output(path, what)
            if problem:
                print(problem, file=sys.stderr)
                return 2
            outputs[what] = stack.enter_context(handle)
        writer = None
        if "csv" in outputs:
            fields = ROW_FIELDS + (("density",) if density_dir is not None else ()) + tuple(
                f"region:{r.name}" for r in regions or ())
            writer = csv.DictWriter(outputs["csv"], fieldnames=fields, extrasaction="ignore")
            writer.writeheader()

        width = max([len(it.label) for it in items] + [len("image"), len("total")])
        out = sys.stdout

        def line(text: str) -> None:
            tqdm.write(text, file=out)

        line(f"{'image':<{width}}  {'count':>9}  {'tiles':>5}  {'size (HxW)':>11}  {'seconds':>7}")
        rows: list[dict] = []
        total = 0.0
        tiles = 0
        seconds = 0.0
        counted = failed = 0
        interrupted = False
        bar = progress_bar(total=len(items), enabled=not args.quiet, unit="image")
        try:
            for it in items:
                row = {**dict.fromkeys(ROW_FIELDS), "source": it.label, "status": "error", "error": it.error or ""}
                if it.path is not None:
                    bar.set_postfix_str(it.path.name, refresh=False)
                    row, image, res = count_file(counter, it.path, counter.picture_branch if density_dir is not None
                                                 else None, regions)
                    row["source"] = it.label
                    row["error"] = _cli_reason(row["error"])
                    if row["status"] == "ok":
                        if res.regions is not None:
                            row["regions"] = res.regions
                            row.update({f"region:{k}": v["scaled"] for k, v in res.regions.items()})
                        if density_dir is not None:
                            from ..pictures import overlay, save_png

                            target = density_dir / pngs[it.path]
                            try:
                                picture = overlay(image, res.density, res.count, args.cmap,
                                                  label=f"count {_fmt_count(res.count)} ({counter.name})",
                                                  side_by_side=args.side_by_side)
                                if regions is not None:
                                    from ..regions import draw_regions

                                    picture = draw_regions(picture, regions, res.regions)
                                save_png(picture, target)
                                row["density"] = str(target)
                            except (OSError, ImageLoadError) as e:
                                row.update(status="error", error=f"counted ({_fmt_count(res.count)}), but "
                                           f"cannot write the density picture {target}: {e}")
                if row["status"] == "ok":
                    counted += 1
                    total += res.count
                    tiles += res.tiles
                    seconds += res.seconds
                    inside = "".join(f"  {k}: {_fmt_count(v['scaled'])}" for k, v in (res.regions or {}).items())
                    line(f"{it.label:<{width}}  {_fmt_count(res.count):>9}  {res.tiles:>5}  "
                         f"{f'{res.image_size[0]}x{res.image_size[1]}':>11}  {res.seconds:>7.1f}{inside}")
                else:
                    failed += 1
                    tqdm.write(f"error: {it.label}: {row['error']}", file=sys.stderr)
                rows.append(row)
                if writer is not None:
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
                    outputs["csv"].flush()
                bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()

        summary = f"{counted} image{'s' if counted != 1 else ''}" + (f", {failed} failed" if failed else "")
        if interrupted:
            summary += f", interrupted after {len(rows)} of {len(items)}"
        line(f"{'total':<{width}}  {_fmt_count(total):>9}  {tiles:>5}  {'':>11}  {seconds:>7.1f}  {summary}")
        if "json" in outputs:
            json.dump(_finite({"model": counter.name, "description": counter.description,
                               "tiling": counter.tiling, "total": total, "counted": counted, "failed": failed,
                               "images": rows}), outputs["json"], indent=2, allow_nan=False)
            outputs["json"].write("\n")
    if interrupted:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _count_on_ray(args: argparse.Namespace, fail) -> int:
    """``count --ray N --out DIR``: the files counted by N Ray workers into part files in DIR
    (:func:`deepcount.archive.count_archive`), resumable; a summary on stdout."""
    if args.ray is None or args.out is None:
        return fail("--ray N and --out DIR go together: N Ray workers write their rows into DIR")
    if args.ray < 1:
        return fail(f"--ray must be at least 1 worker, got {args.ray}")
    unsupported = [flag for flag, value in (("--csv", args.csv), ("--json", args.json), ("--density", args.density),
                                            ("--region", args.region)) if value is not None]
    if unsupported:
        return fail(f"{', '.join(unsupported)} cannot be used with --ray: its rows go into the --out folder")
    from ..archive import ArchiveError, count_archive
    from ..extras import MissingExtraError

    items = expand_paths(args.paths)
    files = [str(it.path) for it in items if it.path is not None]
    errors = [(printable(it.label), it.error) for it in items if it.path is None]
    try:
        summary = count_archive(files, args.out, args.model, workers=args.ray,
                                threads_per_worker=args.threads_per_worker, tiling=args.tiling,
                                batch_size=args.batch_size, max_pixels=args.max_pixels or None,
                                device=args.device if args.device != "auto" else "cpu", backend=args.backend,
                                fmt=args.out_format, address=args.ray_address, errors=errors,
                                progress=not args.quiet)
    except (ArchiveError, MissingExtraError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"error: interrupted; the rows written so far are in {args.out}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    print(f"{summary.counted} counted, {summary.failed} failed, {summary.skipped} already in {summary.out} "
          f"(skipped), {len(summary.parts)} part file(s) written, {summary.seconds:.1f} s")
    return 1 if summary.failed else 0


def add_command(sub) -> None:
    """Register ``count``."""
    p = sub.add_parser(
        "count", help=COMMANDS["count"][1],
        description="Count the people in images: a table on stdout, the model and any errors on "
                    "stderr. A file that cannot be read is reported and the run goes on; the exit "
                    "code is 1 if any path failed, 2 for a usage, model or device error.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (the images in them) or glob patterns (\"dir/*.jpg\")")
    add_model_option(p)
    p.add_argument("--tiling", default=None, choices=list(TILING_MODES),
                   help=TILING_HELP)
    p.add_argument("--batch-size", type=int, default=None,
                   help=BATCH_SIZE_HELP)
    add_device_option(p)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"], help="onnxruntime: run a `deepcount export` .onnx file (auto: by the --model suffix)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels, read from the header before decoding "
                        "(decompression-bomb guard); 0 = no limit (default: %(default)s)")
    p.add_argument("--csv", metavar="FILE", help="write one row per path (source, count, height, width, "
                                                 "tiles, seconds, status, error)")
    p.add_argument("--json", metavar="FILE", help="write the same rows, with the model, as JSON")
    p.add_argument("--density", metavar="DIR",
                   help="write <image stem>.density.png per image into DIR: the model's density map "
                        "over the photo (colour and opacity follow it; the photo is unchanged where "
                        "nobody is), a colour bar in people per map cell, the count in the corner")
    p.add_argument("--region", metavar="FILE",
                   help="also count inside regions: a JSON polygon file ([[x, y], ...] in image pixels, "
                        "or {\"name\": [[x, y], ...], ...}) or a mask image (non-zero inside); from the "
                        "density map, scaled to the count (README: Counting inside a region)")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --density: the photo and the map alone next to each other instead")
    p.add_argument("--cmap", default=None,
                   help="matplotlib colormap for --density (default: inferno, perceptually ordered)")
    ray = p.add_argument_group("counting an archive on a Ray cluster (the `ray` extra; README: "
                               "Counting an archive on a cluster)")
    ray.add_argument("--ray", type=int, metavar="N", default=None,
                     help="count with N Ray workers, each with its own model, into part files in --out "
                          "(resumable: run it again and the files already there are skipped)")
    ray.add_argument("--out", metavar="DIR", help="with --ray: the folder of part files, one row per file")
    ray.add_argument("--out-format", choices=["parquet", "csv"], default="parquet",
                     help="with --ray: the part files' format (default: %(default)s)")
    ray.add_argument("--threads-per-worker", type=int, default=1,
                     help="with --ray: CPUs each worker reserves and uses (default: %(default)s)")
    ray.add_argument("--ray-address", metavar="ADDR", default=None,
                     help="with --ray: a running cluster (default: $RAY_ADDRESS, else a local Ray "
                          "instance on this machine)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_count)
