"""Progress bars on long work, one way everywhere: tqdm on stderr (:func:`progress_bar`), and
Lightning's bar in training (:func:`training_progress_bar`, on stdout).

On a terminal the bar redraws in place.  In a log (stderr redirected to a file or a pipe, as under
``nohup``) a redrawn bar is noise, and no bar at all leaves an hour-long evaluation silent: there
the bar writes one plain line now and then (every :data:`LOG_INTERVAL` seconds), and only once the
work has lasted :data:`LOG_DELAY` seconds, so short runs, and scripts that read stderr, see nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

LOG_DELAY = 30.0  # seconds of work before a log gets its first line
LOG_INTERVAL = 60.0  # seconds between a log's lines

__all__ = ["LOG_DELAY", "LOG_INTERVAL", "progress_bar", "training_progress_bar"]


_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's moves between stacked bars
_BAR = re.compile(r"\|[^|]*\|")  # the bar itself: its width follows the length of the rate text


class _Lines:
    """A stream for tqdm that turns its in-place redraws (``\\r`` or a cursor move, then the bar)
    into whole lines, leaving out a line that only repeats the last one's progress (tqdm redraws it on
    closing, maybe with a rate of another length, and so a bar of another width)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = _CURSOR_MOVES.sub("", text.replace("\r", "")).strip()
        progress = _BAR.sub("|", line.split(" [", 1)[0])  # the line without its bar, times and rate
        if line and progress != self.last:
            self.stream.write(line + "\n")
            self.last = progress

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm`` over ``iterable`` (or with ``total=``) on stderr: in place on a terminal,
    elsewhere as a line every :data:`LOG_INTERVAL` seconds once the work has lasted
    :data:`LOG_DELAY`; nothing at all when not ``enabled``.  ``kwargs`` go to tqdm (``desc``,
    ``unit``, ``total``)."""
    from tqdm import tqdm

    stream = sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    # maxinterval: tqdm's monitor thread would otherwise force a redraw every 10 s
    return tqdm(iterable, file=_Lines(stream), ncols=100, delay=LOG_DELAY, mininterval=LOG_INTERVAL,
                maxinterval=max(LOG_INTERVAL, 1.0), **kwargs)


def training_progress_bar() -> Any:
    """Lightning's progress bar for :class:`lightning.pytorch.Trainer`, with the same manners as
    :func:`progress_bar`: on a terminal (Lightning writes to stdout) it is Lightning's own bar; in a
    log each bar writes a whole line at most every :data:`LOG_INTERVAL` seconds (and its last
    state), not a redraw after every step.  Either way a run resumed inside an epoch names that
    epoch and its length, where Lightning's bar would say ``Training: 76/?``."""
    bar, log_bar = _training_bar_classes()
    return bar() if _is_terminal(sys.stdout) else log_bar()


@functools.cache  # Lightning is imported on first use only
def _training_bar_classes() -> tuple[type, type]:
    from lightning.pytorch.callbacks import TQDMProgressBar

    class TrainingBar(TQDMProgressBar):
        """Lightning's bar, which also names the epoch of a run resumed inside it (Lightning calls
        no ``on_train_epoch_start`` then, which is where its bar learns the epoch and its length)."""

        def on_train_start(self, trainer: Any, *args: Any) -> None:
            super().on_train_start(trainer, *args)
            if getattr(trainer.fit_loop, "restarted_mid_epoch", False):
                self.train_progress_bar.total = _finite(self.total_train_batches)
                self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    class LogTrainingBar(TrainingBar):
        """Lightning's bar in a log: whole lines (:class:`_Lines`), refreshed by time."""

        def __init__(self) -> None:
            super().__init__()
            self._last_line = -math.inf

        def _should_update(self, current: int, total: int) -> bool:
            now = time.monotonic()
            if self.is_enabled and (current == total or now - self._last_line >= LOG_INTERVAL):
                self._last_line = now
                return True
            return False

    for name in ("init_sanity_tqdm", "init_train_tqdm", "init_validation_tqdm", "init_test_tqdm",
                 "init_predict_tqdm"):
        setattr(LogTrainingBar, name, _in_lines(getattr(TQDMProgressBar, name)))
    return TrainingBar, LogTrainingBar


def _finite(total: float) -> int | None:
    return None if math.isinf(total) else int(total)


def _in_lines(init: Any) -> Any:
    def wrapped(self: Any) -> Any:
        with contextlib.redirect_stdout(_Lines(sys.stdout)):  # Lightning's bars take file=sys.stdout
            return init(self)
    return wrapped
