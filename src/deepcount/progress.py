"""Progress bars on long work, one way everywhere (tqdm on stderr).

On a terminal the bar redraws in place.  In a log (stderr redirected to a file or a pipe, as under
``nohup``) a redrawn bar is noise, and no bar at all leaves an hour-long evaluation silent: there
the bar writes one plain line now and then (every :data:`LOG_INTERVAL` seconds), and only once the
work has lasted :data:`LOG_DELAY` seconds, so short runs, and scripts that read stderr, see nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

LOG_DELAY = 30.0  # seconds of work before a log gets its first line
LOG_INTERVAL = 60.0  # seconds between a log's lines

__all__ = ["LOG_DELAY", "LOG_INTERVAL", "progress_bar"]


class _Lines:
    """A stream for tqdm that turns its in-place redraws (``\\r`` + the bar) into whole lines,
    leaving out a line that only repeats the last one's progress (tqdm redraws it on closing)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        progress = line.split(" [", 1)[0]  # the line without its times and rate
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
