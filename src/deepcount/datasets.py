"""Readers for crowd-counting datasets in their original, published formats.

Every reader returns a :class:`CrowdDataset`: a named, ordered list of :class:`AnnotatedImage`
(image path + head points). Points are always a float64 ``(N, 2)`` array of ``(x, y)`` in
0-based pixel coordinates: pixel ``(row i, column j)`` has its centre at ``x=j, y=i``.
MATLAB annotations (ShanghaiTech, Mall, UCF-QNRF) are 1-based and are converted in exactly one
place, :func:`from_matlab`. The readers take their roots from the caller; :func:`dataset_root`
gives the conventional one (``$DEEPCOUNT_DATA/<release folder>``) for commands and configs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, overload

import numpy as np
import scipy.io

from .images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, image_files, image_size,
                     load_image, natural_key)

__all__ = [
    "AnnotatedImage",
    "CrowdDataset",
    "DATASETS",
    "SPLITS",
    "custom",
    "dataset_root",
    "data_root",
    "DataNotFoundError",
    "from_matlab",
    "jhu_crowd",
    "load_dataset",
    "mall",
    "nwpu_crowd",
    "shanghaitech",
    "train_val_split",
    "ucf_qnrf",
]

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------- core types


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make generated __eq__/__hash__ meaningless
class AnnotatedImage:
    """One image and its annotated head points.

    ``points`` is float64 ``(N, 2)`` with columns ``(x, y)``, 0-based pixel coordinates.
    ``annotation`` is the file the points were read from (a shared file such as Mall's
    ``mall_gt.mat`` when all images share one), or ``None`` when there is none.
    """

    image: Path
    points: np.ndarray
    annotation: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        if self.annotation is not None:
            object.__setattr__(self, "annotation", Path(self.annotation))
        object.__setattr__(self, "points", _as_points(self.points, self.annotation or self.image))

    @property
    def count(self) -> int:
        """Number of annotated heads."""
        return int(len(self.points))


class CrowdDataset(Sequence[AnnotatedImage]):
    """A named, ordered list of :class:`AnnotatedImage` (``name``, ``split``, ``items``)."""

    def __init__(self, name: str, split: str, items: Sequence[AnnotatedImage]):
        self.name = name
        self.split = split
        self.items: list[AnnotatedImage] = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> AnnotatedImage: ...
    @overload
    def __getitem__(self, index: slice) -> CrowdDataset: ...
    def __getitem__(self, index: int | slice) -> AnnotatedImage | CrowdDataset:
        if isinstance(index, slice):
            return CrowdDataset(self.name, self.split, self.items[index])
        return self.items[index]

    def __iter__(self) -> Iterator[AnnotatedImage]:
        return iter(self.items)

    @property
    def counts(self) -> np.ndarray:
        """Per-image head counts, int64 ``(len(self),)``."""
        return np.array([it.count for it in self.items], dtype=np.int64)

    @property
    def total_count(self) -> int:
        """Total number of annotated heads over all images."""
        return int(sum(it.count for it in self.items))

    def __repr__(self) -> str:
        return (f"CrowdDataset(name={self.name!r}, split={self.split!r}, "
                f"images={len(self)}, heads={self.total_count})")


# ----------------------------------------------------------------------------- helpers


def _as_points(points: Any, source: Any = None) -> np.ndarray:
    """Coerce to a fresh float64 ``(N, 2)`` array; empty input becomes ``(0, 2)``."""
    arr = np.array(points, dtype=np.float64)  # np.array copies: callers never alias file buffers
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    where = f" in {source}" if source is not None else ""
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected (N, 2) head points{where}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"non-finite head coordinates{where}")
    return arr


def from_matlab(points: Any) -> np.ndarray:
    """Convert MATLAB 1-based ``(x, y)`` points to 0-based pixel coordinates.

    This is the only place in the library where 1 is subtracted: every ``.mat`` reader calls it.
    """
    return _as_points(points) - 1.0


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _child(parent: Path, names: Sequence[str], what: str) -> Path:
    """First existing entry of ``parent`` among ``names`` (case-insensitive), else FileNotFoundError."""
    _require_dir(parent, f"folder containing {what}")
    by_lower = {p.name.lower(): p for p in parent.iterdir()}
    for n in names:
        if (parent / n).exists():
            return parent / n
        if n.lower() in by_lower:
            return by_lower[n.lower()]
    raise FileNotFoundError(f"{what} not found in {parent}: expected one of {list(names)}")


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, in natural order."""
    return image_files(_require_dir(folder, "image folder"))


def _paired(images: list[Path], annotation_of: Callable[[Path], Path],
            read: Callable[[Path], np.ndarray]) -> list[AnnotatedImage]:
    """Each image with the points of its own annotation file (which must exist)."""
    items = []
    for img in images:
        ann = annotation_of(img)
        if not ann.is_file():
            raise FileNotFoundError(f"annotation for {img.name} not found: expected {ann}")
        items.append(AnnotatedImage(img, read(ann), ann))
    return items


def _check_split(split: str, valid: Sequence[str], dataset: str) -> None:
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {dataset}; valid splits: {list(valid)}")


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for unreadable files; report which one
        raise ValueError(f"cannot read MATLAB file {path}: {exc}") from exc


def _mat_key(mat: dict, key: str, path: Path) -> Any:
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: expected key {key!r}, found {keys}")
    return mat[key]


# ----------------------------------------------------------------------------- ShanghaiTech


def _read_shanghaitech_mat(path: Path) -> np.ndarray:
    """Points of one ``GT_IMG_<n>.mat``: ``image_info[0,0][0,0]`` -> (location, number)."""
    info = _mat_key(_loadmat(path), "image_info", path)
    try:
        record = info[0, 0][0, 0]
        location, number = record["location"], record["number"]
    except (IndexError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: 'image_info' lacks the (location, number) record") from exc
    points = from_matlab(location)
    number = np.asarray(number).ravel()
    if number.size and int(number[0]) != len(points):  # the redundant count guards against truncated files
        raise ValueError(f"{path}: 'number' is {int(number[0])} but 'location' has {len(points)} points")
    return points


def shanghaitech(root: str | Path, part: str, split: str) -> CrowdDataset:
    """ShanghaiTech Part A or B (Zhang et al., CVPR 2016).

    ``root`` holds ``part_A_final``/``part_B_final`` (or ``part_A``/``part_B``), each with
    ``{train,test}_data/images/IMG_<n>.jpg`` and ``ground_truth/`` (or ``ground-truth/``)
    ``GT_IMG_<n>.mat``. Images are ordered by ``n``.
    """
    part = str(part).upper()
    if part not in ("A", "B"):
        raise ValueError(f"unknown ShanghaiTech part {part!r}; valid parts: ['A', 'B']")
    _check_split(split, ("train", "test"), "ShanghaiTech")
    root = _require_dir(Path(root), "ShanghaiTech root")
    part_dir = _child(root, (f"part_{part}_final", f"part_{part}"), f"ShanghaiTech part {part}")
    split_dir = _child(part_dir, (f"{split}_data",), f"ShanghaiTech {split} split")
    images = _images_in(_child(split_dir, ("images",), "ShanghaiTech images folder"))
    gt_dir = _child(split_dir, ("ground_truth", "ground-truth"), "ShanghaiTech ground-truth folder")
    items = _paired(images, lambda img: gt_dir / f"GT_{img.stem}.mat", _read_shanghaitech_mat)
    return CrowdDataset(f"sh{part.lower()}", split, items)


# ----------------------------------------------------------------------------- Mall

MALL_TRAIN_FRAMES = 800  # standard protocol: frames 1-800 train, 801-2000 test


def mall(root: str | Path, split: str) -> CrowdDataset:
    """Mall dataset (Chen et al., BMVC 2012): ``frames/seq_%06d.jpg`` + ``mall_gt.mat``.

    ``split`` is ``train`` (frames 1-800), ``test`` (801-2000) or ``all``.
    """
    _check_split(split, ("train", "test", "all"), "Mall")
    root = _require_dir(Path(root), "Mall root (mall_dataset folder)")
    frames = _require_dir(root / "frames", "Mall frames folder")
    gt_path = root / "mall_gt.mat"
    if not gt_path.is_file():
        raise FileNotFoundError(f"Mall ground truth not found: expected {gt_path}")
    mat = _loadmat(gt_path)
    frame = _mat_key(mat, "frame", gt_path)
    counts = np.asarray(_mat_key(mat, "count", gt_path)).ravel()
    n = frame.size
    if counts.size != n:
        raise ValueError(f"{gt_path}: {frame.size} frames but {counts.size} counts")
    lo, hi = {"train": (0, MALL_TRAIN_FRAMES), "test": (MALL_TRAIN_FRAMES, n), "all": (0, n)}[split]
    items = []
    for i in range(lo, hi):
        try:
            loc = frame.flat[i]["loc"][0, 0]
        except (IndexError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{gt_path}: frame {i + 1} has no 'loc' field") from exc
        points = from_matlab(loc)
        if len(points) != int(counts[i]):
            raise ValueError(f"{gt_path}: frame {i + 1} has {len(points)} points but count {int(counts[i])}")
        img = frames / f"seq_{i + 1:06d}.jpg"
        if not img.is_file():
            raise FileNotFoundError(f"Mall frame not found: {img}")
        items.append(AnnotatedImage(img, points, gt_path))
    return CrowdDataset("mall", split, items)


# ----------------------------------------------------------------------------- UCF-QNRF


def ucf_qnrf(root: str | Path, split: str) -> CrowdDataset:
    """UCF-QNRF (Idrees et al., ECCV 2018): ``Train|Test/img_<n>.jpg`` + ``img_<n>_ann.mat`` (``annPoints``)."""
    _check_split(split, ("train", "test"), "UCF-QNRF")
    root = _require_dir(Path(root), "UCF-QNRF root (UCF-QNRF_ECCV18 folder)")
    folder = _child(root, (split.capitalize(),), f"UCF-QNRF {split} folder")
    anns = {p.name.lower(): p for p in folder.iterdir() if p.name.lower().endswith("_ann.mat")}
    items = []
    for img in _images_in(folder):
        ann = anns.get(f"{img.stem}_ann.mat".lower())  # releases mix 'Img_' and 'img_'
        if ann is None:
            raise FileNotFoundError(f"annotation for {img.name} not found: expected {folder / (img.stem + '_ann.mat')}")
        points = _mat_key(_loadmat(ann), "annPoints", ann)
        items.append(AnnotatedImage(img, from_matlab(points), ann))
    return CrowdDataset("ucf_qnrf", split, items)


# ----------------------------------------------------------------------------- JHU-Crowd++


def _read_jhu_txt(path: Path) -> np.ndarray:
    """``x y w h o b`` per line (0-based); only ``x y`` are kept. Empty file = no heads."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            rows.append((float(fields[0]), float(fields[1])))
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: expected 'x y w h o b', got {line!r}") from exc
    return _as_points(rows, path)


def jhu_crowd(root: str | Path, split: str) -> CrowdDataset:
    """JHU-Crowd++ (Sindagi et al.): ``<split>/images/<id>.jpg`` + ``<split>/gt/<id>.txt``."""
    _check_split(split, ("train", "val", "test"), "JHU-Crowd++")
    root = _require_dir(Path(root), "JHU-Crowd++ root")
    split_dir = _child(root, (split,), f"JHU-Crowd++ {split} folder")
    images = _images_in(_child(split_dir, ("images",), "JHU-Crowd++ images folder"))
    gt_dir = _child(split_dir, ("gt",), "JHU-Crowd++ gt folder")
    items = _paired(images, lambda img: gt_dir / f"{img.stem}.txt", _read_jhu_txt)
    return CrowdDataset("jhu", split, items)


# ----------------------------------------------------------------------------- NWPU-Crowd


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"image {stem!r} not found in {folder} (tried {list(IMAGE_SUFFIXES)})")


def _read_nwpu_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
        return _as_points(data["points"], path)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected a JSON object with a 'points' list") from exc


def nwpu_crowd(root: str | Path, split: str) -> CrowdDataset:
    """NWPU-Crowd (Wang et al., TPAMI 2020): ``images/<id>.jpg`` + ``jsons/<id>.json``.

    ``train``/``val`` follow ``train.txt``/``val.txt`` (first token of each line is the id);
    ``all`` is every image with a JSON (test images have none).
    """
    _check_split(split, ("train", "val", "all"), "NWPU-Crowd")
    root = _require_dir(Path(root), "NWPU-Crowd root")
    img_dir = _require_dir(root / "images", "NWPU-Crowd images folder")
    json_dir = _require_dir(root / "jsons", "NWPU-Crowd jsons folder")
    if split == "all":
        ids = sorted((p.stem for p in json_dir.glob("*.json")), key=natural_key)
    else:
        listing = root / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"NWPU-Crowd split list not found: expected {listing}")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    items = []
    for img_id in ids:
        js = json_dir / f"{img_id}.json"
        if not js.is_file():
            raise FileNotFoundError(f"annotation for NWPU-Crowd image {img_id} not found: expected {js}")
        items.append(AnnotatedImage(_find_image(img_dir, img_id), _read_nwpu_json(js), js))
    return CrowdDataset("nwpu", split, items)


# ----------------------------------------------------------------------------- custom data


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _csv_rows(path: Path, columns: Sequence[str]) -> list[list[str]]:
    """Rows of ``path`` restricted to ``columns`` (by header name if a header exists, else by position)."""
    with path.open(newline="") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh) if any(c.strip() for c in r)]
    if not rows:
        return []
    coord_start = len(columns) - 2  # x, y are the last two requested columns
    header = rows[0]
    # a header has a non-numeric word where coordinates go (empty cells are a 0-head row)
    has_header = any(c and not _is_number(c) for c in header[coord_start:len(columns)])
    if not has_header:
        idx = list(range(len(columns)))
    else:
        lower = [h.lower() for h in header]
        missing = [c for c in columns if c not in lower]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
        idx = [lower.index(c) for c in columns]
        rows = rows[1:]
    out = []
    for r in rows:
        r = r + [""] * (max(idx) + 1 - len(r))
        out.append([r[i] for i in idx])
    return out


def _parse_xy(x: str, y: str, path: Path) -> tuple[float, float] | None:
    """A CSV (x, y) pair; both empty means 'no point on this row' (an image with 0 heads)."""
    if x == "" and y == "":
        return None
    try:
        return float(x), float(y)
    except ValueError as exc:
        raise ValueError(f"{path}: bad coordinates ({x!r}, {y!r})") from exc


def _read_points_csv(path: Path) -> np.ndarray:
    pts = [p for x, y in _csv_rows(path, ("x", "y")) if (p := _parse_xy(x, y, path)) is not None]
    return _as_points(pts, path)


def _json_points(data: Any, path: Path) -> np.ndarray:
    if isinstance(data, dict):
        if "points" not in data:
            raise ValueError(f"{path}: expected {{'points': [[x, y], ...]}} or [[x, y], ...]")
        data = data["points"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: points must be a list of [x, y]")
    return _as_points(data, path)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else []  # an empty file is an empty annotation
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def _single_file_annotations(path: Path, images: list[Path]) -> dict[Path, np.ndarray]:
    """Map image -> points from one CSV (image,x,y) or JSON ({name: [[x, y], ...]}) file."""
    lookup: dict[str, Path] = {}
    for img in images:
        lookup.setdefault(img.name, img)
        lookup.setdefault(img.stem, img)
    found: dict[Path, list] = {}
    unknown: list[str] = []

    def add(key: str, pts: Any) -> None:
        img = lookup.get(Path(key).name) or lookup.get(key)
        if img is None:
            unknown.append(key)
        else:
            found.setdefault(img, []).extend(pts)

    suffix = path.suffix.lower()
    if suffix == ".csv":
        for name, x, y in _csv_rows(path, ("image", "x", "y")):
            p = _parse_xy(x, y, path)
            add(name, [] if p is None else [p])
    elif suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{image name: [[x, y], ...]}}")
        for name, pts in data.items():
            add(name, _json_points(pts, path).tolist())
    else:
        raise ValueError(f"{path}: single annotation file must be .csv or .json")
    if unknown:
        raise ValueError(f"{path}: annotations for images not in the folder: {sorted(set(unknown))[:10]}")
    return {img: _as_points(pts, path) for img, pts in found.items()}


def custom(images_dir: str | Path, annotations: str | Path | None = None) -> CrowdDataset:
    """Bring-your-own data: a folder of images plus 0-based ``(x, y)`` head points.

    Annotations are either one file per image, ``<stem>.csv`` (columns ``x,y``, header
    optional) or ``<stem>.json`` (``{"points": [[x, y], ...]}`` or ``[[x, y], ...]``), next to
    the images or in the folder ``annotations``; or one file ``annotations``: a CSV with
    columns ``image,x,y`` (a row ``name,,`` marks an image with 0 heads) or a JSON object
    ``{"image name": [[x, y], ...]}``. Every image needs an annotation; an empty one means 0 heads.
    """
    images_dir = _require_dir(Path(images_dir), "custom image folder")
    images = _images_in(images_dir)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {images_dir}")
    ann = Path(annotations) if annotations is not None else images_dir
    if not ann.exists():
        raise FileNotFoundError(f"annotations not found: {ann}")
    items = []
    if ann.is_file():
        table = _single_file_annotations(ann, images)
        for img in images:
            if img not in table:
                raise ValueError(f"image {img.name} has no annotation in {ann}")
            items.append(AnnotatedImage(img, table[img], ann))
    else:
        for img in images:
            csv_path, json_path = ann / f"{img.stem}.csv", ann / f"{img.stem}.json"
            if csv_path.is_file() and json_path.is_file():
                raise ValueError(f"image {img.name} has both {csv_path.name} and {json_path.name}; keep one")
            if csv_path.is_file():
                items.append(AnnotatedImage(img, _read_points_csv(csv_path), csv_path))
            elif json_path.is_file():
                items.append(AnnotatedImage(img, _json_points(_read_json(json_path), json_path), json_path))
            else:
                raise FileNotFoundError(
                    f"image {img.name} has no annotation: expected {csv_path} or {json_path}")
    return CrowdDataset("custom", "all", items)


# ----------------------------------------------------------------------------- registry


def _custom_split(root: str | Path, split: str) -> CrowdDataset:
    """Custom data via the registry: ``all`` is ``root`` itself, other splits are ``root/<split>``."""
    folder = Path(root) if split == "all" else Path(root) / split
    ds = custom(folder)
    ds.split = split
    return ds


DATASETS: dict[str, Callable[[str | Path, str], CrowdDataset]] = {
    "sha": partial(shanghaitech, part="A"),
    "shb": partial(shanghaitech, part="B"),
    "mall": mall,
    "ucf_qnrf": ucf_qnrf,
    "jhu": jhu_crowd,
    "nwpu": nwpu_crowd,
    "custom": _custom_split,
}

SPLITS: dict[str, tuple[str, ...]] = {
    "sha": ("train", "test"),
    "shb": ("train", "test"),
    "mall": ("train", "test", "all"),
    "ucf_qnrf": ("train", "test"),
    "jhu": ("train", "val", "test"),
    "nwpu": ("train", "val", "all"),
    "custom": ("all", "train", "val", "test"),
}


# How each dataset is named to a reader (tables, model descriptions).
DATASET_NAMES: dict[str, str] = {
    "sha": "ShanghaiTech A",
    "shb": "ShanghaiTech B",
    "mall": "Mall",
    "ucf_qnrf": "UCF-QNRF",
    "jhu": "JHU-Crowd++",
    "nwpu": "NWPU-Crowd",
    "custom": "custom",
}


# The folder each release unpacks to, under the data directory.
RELEASE_FOLDERS: dict[str, str] = {
    "sha": "ShanghaiTech",
    "shb": "ShanghaiTech",
    "mall": "mall_dataset",
    "ucf_qnrf": "UCF-QNRF_ECCV18",
    "jhu": "jhu_crowd_v2.0",
    "nwpu": "NWPU-Crowd",
}


# The one rule for where datasets are: the caller's root, else the release folder
# (RELEASE_FOLDERS) in the folder $DEEPCOUNT_DATA names.  The library has no default location.
DATA_ENV = "DEEPCOUNT_DATA"


class DataNotFoundError(FileNotFoundError):
    """A dataset's folder is not where the rule above says (or it has no folder to look in)."""


def data_root() -> Path | None:
    """The folder that holds the datasets' release folders: ``$DEEPCOUNT_DATA`` (None: unset)."""
    import os

    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


def dataset_root(name: str, root: str | Path | None = None) -> Path:
    """Where dataset ``name`` lives: ``root`` as given when it exists (or is absolute), else
    ``root`` (default: the release's folder name) under :func:`data_root`; a
    :class:`DataNotFoundError` (one line: where it looked, how to say where) if that is no folder."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    if root is not None and Path(root).is_absolute():
        path = Path(root)
    elif root is not None and Path(root).exists():
        return Path(root)
    elif root is None and name not in RELEASE_FOLDERS:
        raise ValueError(f"dataset {name!r} has no conventional folder: give its root")
    else:
        base = data_root()
        if base is None:
            raise DataNotFoundError(
                f"where is dataset {name!r}? give its folder (--root, --data.root) or set {DATA_ENV} "
                f"to the folder that holds {root if root is not None else RELEASE_FOLDERS[name]}/")
        path = base / (root if root is not None else RELEASE_FOLDERS[name])
    if not path.is_dir():
        raise DataNotFoundError(
            f"dataset {name!r} not found at {path}: give its folder (--root, --data.root) or set "
            f"{DATA_ENV} to the folder that holds {RELEASE_FOLDERS.get(name, 'it')}/")
    return path


# Names that CrowdDataset.name had before it became the registry name (kept for files written then).
_FORMER_NAMES = {"shanghaitech_a": "sha", "shanghaitech_b": "shb", "jhu_crowd": "jhu", "nwpu_crowd": "nwpu"}


def registry_name(name: str) -> str:
    """The :data:`DATASETS` name of a dataset, also from its former ``CrowdDataset.name``
    (``shanghaitech_A`` -> ``sha``); any other name as given."""
    return _FORMER_NAMES.get(name.lower(), name)


def load_dataset(name: str, root: str | Path | None, split: str) -> CrowdDataset:
    """Load a registered dataset by name (see :data:`DATASETS`) and split (see :data:`SPLITS`);
    ``root`` as :func:`dataset_root` resolves it (None: the conventional place)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    _check_split(split, SPLITS[name], name)
    return DATASETS[name](dataset_root(name, root), split=split)


def unreadable_images(dataset: Sequence[AnnotatedImage], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      progress: bool = True) -> list[tuple[Path, str]]:
    """Every image of ``dataset`` that cannot be used, each with the reason: its header and
    its pixels are read once (a training run checks this before it starts, so one bad file
    never stops it mid-run)."""
    from .images import ImageLoadError
    from .progress import progress_bar

    bad = []
    for item in progress_bar(dataset, enabled=progress and len(dataset) >= 50, desc="checking images", unit="image"):
        try:
            image_size(item.image)
            load_image(item.image, max_pixels=max_pixels)
        except (ImageLoadError, OSError, ValueError) as e:
            bad.append((Path(item.image), getattr(e, "reason", None) or str(e)))
    return bad


OUTSIDE_POLICIES = ("error", "drop", "clip")


def points_outside(dataset: Sequence[AnnotatedImage], tolerance: float = 4.0
                   ) -> list[tuple[AnnotatedImage, np.ndarray, float]]:
    """The images with annotated points more than ``tolerance`` pixels outside the image
    (sizes read from the headers): each with the mask of those points and the farthest
    distance.  Such points are annotation errors: a ground-truth map would pile them into the
    border pixels."""
    found = []
    for item in dataset:
        if not len(item.points):
            continue
        h, w = image_size(item.image)
        x, y = item.points[:, 0], item.points[:, 1]
        # pixel centres are on integers: the image spans -0.5 .. w - 0.5
        beyond = np.maximum.reduce([-0.5 - x, -0.5 - y, x - (w - 0.5), y - (h - 0.5), np.zeros_like(x)])
        mask = beyond > tolerance
        if mask.any():
            found.append((item, mask, float(beyond.max())))
    return found


def handle_points_outside(dataset: CrowdDataset, policy: str = "error", tolerance: float = 4.0
                          ) -> tuple[CrowdDataset, str | None]:
    """Apply ``policy`` to points more than ``tolerance`` pixels outside their image:
    ``error`` raises a ValueError naming the files, ``drop`` removes those points, ``clip``
    keeps them (the ground truth puts them in the border pixel).  Returns the dataset and a
    line saying what was found (None when nothing was)."""
    if policy not in OUTSIDE_POLICIES:
        raise ValueError(f"outside-points policy must be one of {OUTSIDE_POLICIES}, got {policy!r}")
    found = points_outside(dataset, tolerance)
    if not found:
        return dataset, None
    n = int(sum(int(mask.sum()) for _, mask, _ in found))
    listed = "; ".join(f"{item.annotation or item.image}: {int(mask.sum())} point(s), up to {far:.0f} px"
                       for item, mask, far in found[:5]) + (" ..." if len(found) > 5 else "")
    line = (f"{n} annotated point(s) in {len(found)} of {len(dataset)} images lie more than {tolerance:g} px "
            f"outside their image ({listed})")
    if policy == "error":
        raise ValueError(line + "; fix the annotations, or choose to drop or clip them")
    if policy == "drop":
        masks = {id(item): mask for item, mask, _ in found}
        items = [AnnotatedImage(it.image, it.points[~masks[id(it)]], it.annotation) if id(it) in masks else it
                 for it in dataset]
        return CrowdDataset(dataset.name, dataset.split, items), line + ": dropped"
    return dataset, line + ": clipped into the border pixels"


def train_val_split(dataset: CrowdDataset, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[CrowdDataset, CrowdDataset]:
    """Carve a validation set out of a training split with a fixed-seed permutation.

    Deterministic for a given ``seed``; both parts keep the dataset's original order.
    Refuses the test split: model selection must never see test images.
    """
    if dataset.split == "test":
        raise ValueError("refusing to carve validation from the test split: never validate on the test set")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 images to split, {dataset.name}/{dataset.split} has {n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val_idx = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True
    train = CrowdDataset(dataset.name, dataset.split, [it for it, v in zip(dataset, is_val) if not v])
    val = CrowdDataset(dataset.name, "val", [it for it, v in zip(dataset, is_val) if v])
    return train, val
