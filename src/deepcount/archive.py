"""Counting an archive of images (millions of camera frames) as a batch job on a Ray cluster.

Ray Data does the distribution: the file names form a dataset, a pool of Ray actors each loads
one :class:`~deepcount.predict.Counter` and counts the files of the batches it is given (each
image read on the worker, from storage every node can see), and the rows stream back to the
driver, which writes them into a folder as numbered part files (Parquet or CSV), each written
whole or not at all.  A file that cannot be read or counted becomes a row with ``status``
``error`` and the reason; the job goes on.  Running the same command again resumes: every file
already in a part (counted or failed) is skipped, so a killed job loses only the rows not yet
written.  The folder reads as one table: ``pandas.read_parquet(folder)``.

On one machine this starts a local Ray instance; ``address`` (or ``RAY_ADDRESS``) joins a
running cluster instead (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on
the others; README: Counting an archive on a cluster).  Needs the ``ray`` extra.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import atomic_path
from .extras import require
from .images import DEFAULT_MAX_PIXELS

__all__ = ["FORMATS", "ROW_FIELDS", "ArchiveError", "ArchiveSummary", "CountWorker", "count_archive",
           "count_file", "done_sources", "read_parts"]

ROW_FIELDS = ("source", "count", "height", "width", "tiles", "seconds", "status", "error")
FORMATS = ("parquet", "csv")
PART_PREFIX = "part-"


class ArchiveError(ValueError):
    """A request ``count_archive`` cannot carry out (bad option, a folder holding other files)."""


@dataclass
class ArchiveSummary:
    """What one :func:`count_archive` call did: ``skipped`` files were in the folder's parts
    already (a resumed job); ``counted`` and ``failed`` are this call's rows."""

    out: Path
    skipped: int
    counted: int
    failed: int
    parts: list[Path]
    seconds: float


def count_file(counter: Any, path: str | os.PathLike, density: int | None = None, regions: Any = None
               ) -> tuple[dict[str, Any], Any, Any]:
    """The row of one file (:data:`ROW_FIELDS`), the decoded image and the ``CountResult``:
    ``status`` ``ok`` with the count, size, tiles and seconds, or ``error`` with the reason
    (unreadable image, a region mask of another size, out of memory; image and result then
    None as far as they were not made).  Any other exception is a bug and propagates.  What
    ``deepcount count`` writes per file, on one machine or on a Ray worker."""
    from .engines import out_of_memory
    from .images import ImageLoadError
    from .regions import RegionError

    row: dict[str, Any] = {**dict.fromkeys(ROW_FIELDS), "source": str(path), "status": "error", "error": ""}
    image = res = None
    try:
        image = counter.read(path)  # decoded once, for the count and any picture
        res = counter.count(image, density=density, regions=regions)
    except ImageLoadError as e:
        row["error"] = e.reason
    except RegionError as e:
        row["error"] = str(e)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        row["error"] = f"out of memory while counting ({type(e).__name__}); try batch size 1 or a smaller image"
    else:
        row.update(count=float(res.count), height=int(res.image_size[0]), width=int(res.image_size[1]),
                   tiles=int(res.tiles), seconds=round(float(res.seconds), 3), status="ok")
    return row, image, res


class CountWorker:
    """One Ray actor's counter: loads the model once, then counts the files of each batch
    (``{"source": array of paths}``) into a batch of rows.  ``threads``: torch's intra-op
    threads on this worker (its share of the node's cores)."""

    def __init__(self, model: str = "default", tiling: str | None = None, batch_size: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, device: str = "cpu", threads: int | None = None,
                 backend: str = "auto"):
        import torch

        from .predict import Counter

        if threads:
            torch.set_num_threads(int(threads))
        self.counter = Counter.load(model, device=device, tiling=tiling, batch_size=batch_size,
                                    max_pixels=max_pixels, backend=backend)

    def __call__(self, batch: Any) -> Any:
        """A pyarrow batch of ``source`` -> a pyarrow table of rows (:func:`_table`)."""
        return _table([count_file(self.counter, p)[0] for p in batch.column("source").to_pylist()])


def _table(rows: Sequence[dict[str, Any]]) -> Any:
    """Rows as a pyarrow table of the part files' schema (None stays null)."""
    import pyarrow as pa

    types = {"source": pa.string(), "count": pa.float64(), "height": pa.int64(), "width": pa.int64(),
             "tiles": pa.int64(), "seconds": pa.float64(), "status": pa.string(), "error": pa.string()}
    return pa.Table.from_pylist(list(rows), schema=pa.schema([(k, types[k]) for k in ROW_FIELDS]))


def _read_part(part: Path, columns: Sequence[str] = ROW_FIELDS) -> list[dict[str, Any]]:
    if part.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(part, columns=list(columns)).to_pylist()
    import pyarrow.csv as pacsv

    options = pacsv.ConvertOptions(column_types=_table([]).schema, include_columns=list(columns),
                                   strings_can_be_null=False)
    return pacsv.read_csv(part, convert_options=options).to_pylist()


def read_parts(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row in the folder's part files (Parquet or CSV), in part order."""
    return [row for part in _parts(Path(out)) for row in _read_part(part)]


def done_sources(out: str | os.PathLike) -> set[str]:
    """The files the folder's parts already hold a row for (counted or failed)."""
    return {row["source"] for part in _parts(Path(out)) for row in _read_part(part, ["source"])}


def _parts(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix in (".parquet", ".csv"))


def _write_part(rows: Sequence[dict[str, Any]], path: Path) -> None:
    table = _table(rows)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, tmp)


def _check_folder(out: Path, fmt: str) -> None:
    if out.exists() and not out.is_dir():
        raise ArchiveError(f"{out} is a file, not a folder for the results")
    if out.is_dir():
        other = [p.name for p in out.iterdir() if not p.name.startswith(PART_PREFIX)
                 and not p.name.startswith(".")]
        if other:
            raise ArchiveError(f"{out} holds other files ({', '.join(sorted(other)[:3])}"
                               f"{', ...' if len(other) > 3 else ''}): give an empty or new folder, "
                               "or the folder of an earlier run to resume it")
        kinds = {p.suffix for p in _parts(out)}
        if kinds and kinds != {f".{fmt}"}:
            raise ArchiveError(f"{out} holds {'/'.join(sorted(k[1:] for k in kinds))} parts of an earlier "
                               f"run: resume it with the same format, not {fmt}")


def count_archive(paths: Iterable[str | os.PathLike], out: str | os.PathLike, model: str = "default", *,
                  workers: int = 2, threads_per_worker: int = 1, tiling: str | None = None,
                  batch_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  device: str = "cpu", backend: str = "auto", fmt: str = "parquet",
                  rows_per_part: int = 1000, address: str | None = None,
                  errors: Sequence[tuple[str, str]] = (), files_per_batch: int = 4,
                  progress: bool = True) -> ArchiveSummary:
    """Count ``paths`` (image files) on a Ray cluster, one row per file, into part files in
    ``out`` (resumable: files already in a part are skipped).

    Args:
        workers: Ray actors, each with its own Counter (model loaded once per actor).
        threads_per_worker: CPUs each actor reserves and torch's threads in it.
        device: ``cpu``, or ``cuda`` (each actor then reserves one GPU).
        fmt: ``parquet`` or ``csv`` part files.
        rows_per_part: rows the driver gathers before it writes a part (what a kill loses).
        address: a running cluster's address (None: ``RAY_ADDRESS``, else a local instance).
        errors: (source, reason) rows to write as failed without counting (names that matched
            no file, from the command line).
        files_per_batch: files per Ray batch (per call of a worker).
    """
    if fmt not in FORMATS:
        raise ArchiveError(f"format must be one of {FORMATS}, got {fmt!r}")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker),
                        ("rows_per_part", rows_per_part), ("files_per_batch", files_per_batch)):
        if isinstance(value, bool) or int(value) < 1:
            raise ArchiveError(f"{name} must be at least 1, got {value!r}")
    require("ray")  # MissingExtraError: says how to install it
    import ray.data
    out = Path(out)
    _check_folder(out, fmt)
    start = time.perf_counter()
    done = done_sources(out)
    sources = list(dict.fromkeys(str(p) for p in paths))
    todo = [s for s in sources if s not in done]
    error_rows = [{**dict.fromkeys(ROW_FIELDS), "source": str(s), "status": "error", "error": reason}
                  for s, reason in errors if str(s) not in done]
    out.mkdir(parents=True, exist_ok=True)
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    parts: list[Path] = []
    counted = failed = 0

    def flush(rows: list[dict[str, Any]]) -> None:
        if rows:
            path = out / f"{PART_PREFIX}{run}-{len(parts):05d}.{fmt}"
            _write_part(rows, path)
            parts.append(path)
            rows.clear()

    pending: list[dict[str, Any]] = list(error_rows)
    failed += len(error_rows)
    try:
        if todo:
            from .progress import progress_bar

            started_here = not ray.is_initialized()
            if started_here:
                cpus = None if address or os.environ.get("RAY_ADDRESS") else workers * threads_per_worker
                ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            try:
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False
                ds = ray.data.from_items([{"source": s} for s in todo],
                                         override_num_blocks=max(1, min(len(todo), workers * 8)))
                ds = ds.map_batches(
                    CountWorker, batch_size=files_per_batch, batch_format="pyarrow",
                    fn_constructor_kwargs={"model": str(model), "tiling": tiling, "batch_size": batch_size,
                                           "max_pixels": max_pixels, "device": device,
                                           "threads": threads_per_worker, "backend": backend},
                    compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads_per_worker,
                    num_gpus=1 if str(device).startswith("cuda") else 0)
                with progress_bar(total=len(todo), enabled=progress, unit="image") as bar:
                    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                        for row in batch.to_pylist():
                            pending.append(row)
                            counted += row["status"] == "ok"
                            failed += row["status"] != "ok"
                            bar.update(1)
                            if len(pending) >= rows_per_part:
                                flush(pending)
            finally:
                if started_here:
                    ray.shutdown()
    finally:
        flush(pending)  # the rows gathered so far are kept whole, also when interrupted
    return ArchiveSummary(out, len(sources) - len(todo), counted, failed, parts, time.perf_counter() - start)
