"""Counting people in videos: ``deepcount video SOURCE`` and :func:`count_video`.

>>> from deepcount import Counter
>>> from deepcount.video import count_video
>>> counter = Counter.load("default")
>>> counts = count_video(counter, "mall.mp4", every=5)            # a list of FrameCount
>>> counts = count_video(counter, 0, max_frames=100)               # webcam 0
>>> counts = count_video(counter, "rtsp://cam/stream", max_frames=100, output="annotated.mp4")

All video I/O goes through OpenCV (the ``video`` extra, see :mod:`deepcount.extras`).  A source is a file, a
webcam index (an int, or an all-digit string on the command line) or a stream URL (anything with
``://``: rtsp, http, ...).  Frames are converted from OpenCV's BGR to RGB before counting.

Decisions:

* Frame ``i`` of the source (0-based, every frame read counts, counted or not) is at
  ``time_s = i / fps``, ``fps`` as the container reports it; when it reports none (0, NaN, or
  more than 1000 as some live streams do) 25 is assumed, and the summary says so.
* A counted frame whose decoded pixels equal the last counted frame's (a frozen or paused
  camera, a stream that repeats frames to fill its rate) takes that frame's result without
  running the network: the same input gives the same output, so this is exact.  Nothing else
  is reused between frames: in a real video every pixel moves a little from frame to frame
  (sensor noise, compression), the frontend's 3x3 convolutions spread any change over their
  receptive field, and so a feature or a tile reused from an earlier frame would be an
  approximation, not the frame's count.  ``VideoRun.reused`` says how many frames were reused.
* Counting alone runs the backbone only.  A density map (the model's finest: branch 1 of a
  DeepCount, the CSRNet map) is computed only when an annotated video is asked for.
* The annotated video holds *only the counted frames*, each with the density overlay of
  :func:`deepcount.pictures.overlay` and the count and time in the corner, written with the
  ``mp4v`` fourcc at ``fps / every``: it lasts as long as the source and every frame in it shows
  its own count and map.  Frames in between are not written (repeating an overlay over them
  would show maps that do not belong to them; writing them plain at the source rate would make
  the overlay flicker).  ``mp4v`` is MPEG-4 Part 2: desktop players and OpenCV read it, most web
  browsers do not.
* Messages that OpenCV and FFmpeg print while a source is opened are caught and, when opening
  fails, become part of one ``cannot open video source ...`` error (exit status 2).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse


if TYPE_CHECKING:  # heavy imports stay out of ``deepcount --help``
    import numpy as np

    from .predict import Counter

DEFAULT_FPS = 25.0  # assumed when the container reports no frame rate
MAX_FPS = 1000.0  # above this a reported rate is taken as bogus (some streams report 90000)
STREAM_TIMEOUT_MS = 15000  # open/read timeout for stream URLs, so a dead camera does not hang
OUTPUT_FOURCC = "mp4v"

__all__ = ["FrameCount", "VideoError", "VideoOutputError", "VideoRun", "VideoSourceError",
           "count_video", "parse_source"]


class VideoError(OSError):
    """A video that cannot be read or written; ``str(error)`` is a complete, user-facing message."""


class VideoSourceError(VideoError):
    """A source that cannot be opened (or yields no frame)."""


class VideoOutputError(VideoError):
    """An annotated video that cannot be written."""


@dataclass(frozen=True)
class FrameCount:
    """The count of one frame: its index in the source (0-based), its time and the count."""

    frame: int
    time_s: float
    count: float
    regions: dict[str, float] | None = None  # per region: its count (deepcount.regions, "scaled")


def _cv2():
    from .extras import MissingExtraError, require

    try:
        (cv2,) = require("video", "cv2")
    except MissingExtraError as e:  # an optional dependency
        raise VideoError(str(e)) from e
    return cv2


def parse_source(source: str | int | os.PathLike) -> str | int:
    """A webcam index (an int or an all-digit string) as an int; a path or URL as a string."""
    if isinstance(source, bool):
        raise TypeError("a video source is a path, a URL or a webcam index, not a bool")
    if isinstance(source, int):
        return source
    text = os.fspath(source)
    return int(text) if text.isdigit() else text


def is_url(source: str | int) -> bool:
    return isinstance(source, str) and "://" in source


def describe_source(source: str | int) -> str:
    return f"webcam {source}" if isinstance(source, int) else repr(source)


def source_stem(source: str | int | os.PathLike) -> str:
    """A file-name stem for a source: the file's stem, ``camera0``, or the stream's last path
    component (else its host)."""
    source = parse_source(source)
    if isinstance(source, int):
        return f"camera{source}"
    if is_url(source):
        url = urlparse(source)
        stem = Path(url.path).stem or (url.hostname or "stream")
    else:
        stem = Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"


@contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what native code (OpenCV, FFmpeg) writes to file descriptor 2 meanwhile; the
    lines are in the yielded list once the block ends.  Other threads' writes to fd 2 during the
    block are collected too, so keep it short (opening a source)."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (e.g. a GUI process): nothing to collect
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def _native_reason(lines: list[str]) -> str:
    """The gist of OpenCV/FFmpeg messages: ``[mov,mp4 @ 0x..] moov atom not found`` ->
    ``moov atom not found``; OpenCV's ``[ WARN:0@0.01] global file.cpp:12 ...`` prefix dropped."""
    out: list[str] = []
    for line in lines:
        line = re.sub(r"^\[[^\]]*@ ?0x[0-9a-fA-F]+\]\s*", "", line.strip())
        line = re.sub(r"^\[\s*(WARN|ERROR|INFO)[^\]]*\]\s*(global\s+)?\S+:\d+\s*", "", line)
        if line and line not in out:
            out.append(line)
    return "; ".join(out[-3:])


def open_source(source: str | int | os.PathLike):
    """An opened ``cv2.VideoCapture`` of a file, webcam index or stream URL, or
    :class:`VideoSourceError` saying why not."""
    cv2 = _cv2()
    source = parse_source(source)
    name = describe_source(source)
    if isinstance(source, str) and not is_url(source):
        path = Path(source)
        if not path.exists():
            raise VideoSourceError(f"cannot open video source {name}: no such file")
        if path.is_dir():
            raise VideoSourceError(f"cannot open video source {name}: is a folder, not a video")
    with _native_stderr() as said:
        if is_url(source):
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
            cap = cv2.VideoCapture(source, cv2.CAP_ANY, params)
        else:
            cap = cv2.VideoCapture(source)
        opened = cap.isOpened()
    if not opened:
        cap.release()
        if isinstance(source, int):
            why = f"no camera at index {source} (or it is in use)"
        elif is_url(source):
            why = "cannot connect, or not a stream OpenCV can read"
        else:
            why = "not a video OpenCV can read"
        # A missing camera's messages (V4L2, "libavdevice") say no more than the reason does.
        detail = "" if isinstance(source, int) else _native_reason(said)
        raise VideoSourceError(f"cannot open video source {name}: {why}"
                               + (f" ({detail})" if detail else ""))
    if said:  # it opened: pass on what the libraries had to say
        print("\n".join(said), file=sys.stderr)
    return cap


class VideoRun:
    """Counting one video frame by frame; iterate it for :class:`FrameCount` as frames are counted.

    ``source`` is a path, a webcam index, a stream URL or an open ``cv2.VideoCapture`` (then the
    caller keeps it: it is not released).  It is opened here, so a bad source fails at
    construction.  Every ``every``-th frame is counted (frames 0, every, 2 * every, ...), up to
    ``max_frames`` counted frames.  ``output`` writes the annotated video (see the module notes);
    ``density`` picks its map (a branch 1..5 or ``"48x64"``; default the model's finest).
    After (or during) the run: ``frames_read``, ``counts``, ``fps``, ``fps_reported``,
    ``frame_count`` (the container's, None when unknown) and ``frame_size`` (height, width).
    Use it as a context manager, or call :meth:`close`, so that the annotated video is finalised.
    """

    def __init__(self, counter: Counter, source: Any, every: int = 1, max_frames: int | None = None,
                 output: str | os.PathLike | None = None, progress: bool = True,
                 density: int | str | None = None, regions: Any = None):
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_frames is not None and int(max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1 (or None), got {max_frames}")
        cv2 = _cv2()
        self.counter = counter
        self.every = int(every)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.output = Path(output) if output is not None else None
        self.progress = progress
        if regions is not None:  # a region file, a Region or a list of them (deepcount.regions)
            from .regions import as_regions

            regions = as_regions(regions)
        self.regions = regions
        self.branch = self._density_branch(density) if self.output is not None or regions is not None else None
        if isinstance(source, cv2.VideoCapture):
            self.source, self.name, self._cap, self._owns_cap = "<capture>", "<capture>", source, False
            if not source.isOpened():
                raise VideoSourceError("cannot open video source <capture>: it is not opened")
        else:
            self.source = parse_source(source)
            self.name = describe_source(self.source)
            self._cap, self._owns_cap = open_source(self.source), True
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps_reported = bool(math.isfinite(fps) and 0 < fps <= MAX_FPS)
        self.fps = float(fps) if self.fps_reported else DEFAULT_FPS
        n = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(n) if math.isfinite(n) and n > 0 else None
        self.frame_size: tuple[int, int] | None = None
        self.frames_read = 0
        self.reused = 0  # counted frames equal to the last counted one, which took its result
        self._last: tuple[np.ndarray, Any] | None = None
        self.counts: list[FrameCount] = []
        self._writer = None
        self._writer_size: tuple[int, int] | None = None

    def _density_branch(self, density: int | str | None) -> int | None:
        from .model import parse_density

        if density is not None:
            return parse_density(density)  # Counter.count checks the model has it
        branches = self.counter.density_branches
        return min(branches) if branches else None

    def _progress_total(self) -> int | None:
        last = None if self.max_frames is None else (self.max_frames - 1) * self.every + 1
        known = [n for n in (self.frame_count, last) if n is not None]
        return min(known) if known else None

    def __iter__(self) -> Iterator[FrameCount]:
        import numpy as np

        from .progress import progress_bar

        cv2 = _cv2()
        bar = progress_bar(total=self._progress_total(), enabled=self.progress, unit="frame")
        try:
            while self.max_frames is None or len(self.counts) < self.max_frames:
                index = self.frames_read
                wanted = index % self.every == 0
                if wanted:
                    ok, frame = self._cap.read()
                else:
                    ok, frame = self._cap.grab(), None  # decoded, never converted
                if not ok:
                    break
                self.frames_read += 1
                bar.update(1)
                if not wanted:
                    continue
                rgb = _to_rgb(cv2, frame)
                if self.frame_size is None:
                    self.frame_size = rgb.shape[:2]
                if self._last is not None and np.array_equal(rgb, self._last[0]):
                    result = self._last[1]  # the same pixels: the same result (exact)
                    self.reused += 1
                else:
                    extra = {"regions": self.regions} if self.regions is not None else {}
                    result = self.counter.count(rgb, density=self.branch, **extra)
                    self._last = (rgb, result)
                inside = None if result.regions is None else {k: v["scaled"] for k, v in result.regions.items()}
                item = FrameCount(index, index / self.fps, result.count, inside)
                if self.output is not None:
                    self._write(cv2, rgb, result, item)
                self.counts.append(item)
                bar.set_postfix(count=f"{item.count:.1f}", refresh=False)
                yield item
        finally:
            bar.close()
        if self.frames_read == 0:
            raise VideoSourceError(f"cannot read any frame from video source {self.name}")

    def _write(self, cv2, rgb: np.ndarray, result, item: FrameCount) -> None:
        from .pictures import overlay

        picture = overlay(rgb, result.density, result.count, scale=False,  # frames keep the source's size
                          label=f"count {item.count:.1f}   {item.time_s:.1f} s")
        if self.regions is not None:
            from .regions import draw_regions

            picture = draw_regions(picture, self.regions, result.regions)
        bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        if self._writer is None:
            height, width = bgr.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*OUTPUT_FOURCC)
            with _native_stderr() as said:
                writer = cv2.VideoWriter(str(self.output), fourcc, self.fps / self.every,
                                         (width, height))
                opened = writer.isOpened()
            if not opened:
                detail = _native_reason(said)
                raise VideoOutputError(f"cannot write video {str(self.output)!r} "
                                       f"({detail or 'OpenCV cannot write an mp4v video there'})")
            self._writer, self._writer_size = writer, (width, height)
        if (bgr.shape[1], bgr.shape[0]) != self._writer_size:  # a stream changed resolution
            bgr = cv2.resize(bgr, self._writer_size, interpolation=cv2.INTER_AREA)
        self._writer.write(bgr)

    def close(self) -> None:
        """Finalise the annotated video and release the source (when opened here)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._owns_cap and self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> "VideoRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_rgb(cv2, frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2 or frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def count_video(counter: Counter, source: Any, every: int = 1, max_frames: int | None = None,
                output: str | os.PathLike | None = None, progress: bool = True,
                density: int | str | None = None, regions: Any = None) -> list[FrameCount]:
    """Count every ``every``-th frame of a video file, webcam index or stream URL (up to
    ``max_frames`` counted frames), optionally writing an annotated video to ``output`` and
    counting inside ``regions`` too (a region file or :class:`deepcount.regions.Region` list).
    See :class:`VideoRun` for the details; raises :class:`VideoSourceError` /
    :class:`VideoOutputError`."""
    with VideoRun(counter, source, every, max_frames, output, progress, density, regions) as run:
        for _ in run:
            pass
        return run.counts


# ----------------------------------------------------------------------------- files
def write_csv(counts: list[FrameCount], path: str | os.PathLike) -> None:
    """``frame,time_s,count`` rows, one per counted frame, and a ``region:<name>`` column per
    region when regions were counted."""
    import csv

    names = list(counts[0].regions) if counts and counts[0].regions else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["frame", "time_s", "count", *(f"region:{n}" for n in names)])
        for c in counts:
            w.writerow([c.frame, f"{c.time_s:.3f}", f"{c.count:.3f}", *(f"{c.regions[n]:.3f}" for n in names)])


def write_plot(counts: list[FrameCount], path: str | os.PathLike, title: str) -> None:
    """A count-over-time PNG (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marker = "o" if len(counts) <= 60 else None
    ax.plot([c.time_s for c in counts], [c.count for c in counts], marker=marker, markersize=4, linewidth=1.5,
            label="whole frame")
    for name in (counts[0].regions or {}) if counts else ():
        ax.plot([c.time_s for c in counts], [c.regions[name] for c in counts], marker=marker, markersize=3,
                linewidth=1.2, label=f"region {name}")
    if counts and counts[0].regions:
        ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
