"""The one image loader of deepcount: any image source -> ``(H, W, 3)`` uint8 RGB array.

Everything in the package that reads pixels goes through :func:`load_image`, so every
caller gets the same answers to the awkward questions:

* **Sources.** A path (``str`` / ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``,
  ``memoryview``), a binary file-like object, a ``PIL.Image.Image`` or a numpy array.
* **Orientation.** The EXIF Orientation tag (values 2-8) is applied, so the array is the
  upright picture a viewer shows; :func:`image_size` reports that same upright size.
* **Modes.** ``1``, ``L``, ``LA``, ``P`` (with or without transparency), ``PA``, ``RGB``,
  ``RGBA``, ``RGBX``, ``CMYK``, ``YCbCr``, 16-bit (``I;16``, ``I;16B``, ``I;16L``,
  ``I;16N``, ``I``) and ``F`` all become RGB.  Alpha is *dropped* (the RGB channels are
  kept as stored, never composited onto a background).  16-bit data is scaled to 8 bit
  with ``>> 8`` -- Pillow's own ``convert("L")`` clips 16-bit values at 255, which turns
  most 16-bit photographs white.
* **Decompression bombs.** The pixel count is read from the header and checked against
  ``max_pixels`` before any pixel is decoded.
* **Errors.** Every failure is an :class:`ImageLoadError` naming the file (or the kind
  of object) and the reason, with the underlying exception chained as ``__cause__``;
  no bare ``OSError`` / ``ValueError`` from Pillow escapes.
"""

from __future__ import annotations

import io
import numbers
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoadError",
    "image_files",
    "image_size",
    "load_image",
    "natural_key",
    "to_tensor",
]

#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (about a quarter gigabyte of 24-bit
#: pixels).  Written out with Pillow's formula rather than read from ``Image`` at import
#: time, so that a program that has already changed Pillow's global does not change ours.
DEFAULT_MAX_PIXELS: int = int(1024 * 1024 * 1024 // 4 // 3)  # 89,478,485

#: File extensions (lower-case, with the dot) that folder scanning treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png",
        ".bmp", ".dib",
        ".tif", ".tiff",
        ".webp",
        ".gif",
        ".ppm", ".pgm", ".pbm", ".pnm",
    }
)



def natural_key(path: str | os.PathLike) -> tuple:
    """Sort key of a file name with its numbers compared as numbers (IMG_2 before IMG_10),
    case-insensitively, the name itself breaking ties."""
    name = os.path.basename(os.fspath(path))
    parts = re.split(r"(\d+)", name.lower())
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts), name


def image_files(folder: str | os.PathLike, special: bool = False) -> list[Path]:
    """The image files (by :data:`IMAGE_EXTENSIONS`) directly inside ``folder``, in natural
    order; ``special``: entries that are neither folders nor regular files too (a FIFO, a
    device), so the caller can say why each cannot be read."""
    keep = (lambda p: not p.is_dir()) if special else (lambda p: p.is_file())
    return sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and keep(p)),
                  key=natural_key)


_ORIENTATION_TAG = 0x0112


class ImageLoadError(ValueError):
    """An input that cannot be used as an image; names the file (or the object kind) and the reason.

    ``str(error) == f"{error.source}: {error.reason}"``.  The exception that caused it, if
    any, is chained as ``__cause__``.
    """

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = str(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):  # keep it picklable (e.g. across DataLoader worker processes)
        return (type(self), (self.source, self.reason))


# --------------------------------------------------------------------------------------
# Scoped lifting of Pillow's global decompression-bomb limit
#
# Pillow has no per-call limit: ``Image.open`` (and a few plugins while decoding) compare
# the size with the module global ``Image.MAX_IMAGE_PIXELS`` and warn above it / raise
# above twice it.  Our own ``max_pixels`` check replaces that check, so while *this module*
# opens a header -- and while it decodes, when the caller allowed more than Pillow would --
# the global is set to ``None`` and restored afterwards.  The lifting is reference counted
# under a lock, so concurrent loads in several threads nest correctly and the original
# value is always put back.
#
# Thread-safety caveat: during that window the global is process-wide, so Pillow calls
# made *elsewhere* in other threads run without Pillow's bomb check, and a value assigned
# to ``Image.MAX_IMAGE_PIXELS`` by another thread inside the window is overwritten when it
# closes.  The window is short (header parsing) in the default configuration.
# --------------------------------------------------------------------------------------

_limit_lock = threading.Lock()
_lift_depth = 0
_saved_limit: int | None = None


@contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    global _lift_depth, _saved_limit
    with _limit_lock:
        if _lift_depth == 0:
            _saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _lift_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _lift_depth -= 1
            if _lift_depth == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit
                _saved_limit = None


def _pillow_limit() -> int | None:
    """Pillow's limit as the program set it (not our temporary ``None``)."""
    with _limit_lock:
        return _saved_limit if _lift_depth else Image.MAX_IMAGE_PIXELS


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_max_pixels(max_pixels: Any) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral):
        raise TypeError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return int(max_pixels)


def _path_label(path: Any) -> str:
    try:
        return os.fsdecode(os.fspath(path))
    except (TypeError, ValueError):
        return repr(path)


def _stream_label(stream: Any) -> str:
    name = getattr(stream, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)):
        return _path_label(name)
    return f"<{type(stream).__name__} object>"


def _pil_label(im: Image.Image) -> str:
    filename = getattr(im, "filename", None)
    if isinstance(filename, (str, bytes, os.PathLike)) and os.fspath(filename):
        return _path_label(filename)
    return f"<PIL.Image.Image mode={im.mode} size={im.size[0]}x{im.size[1]}>"


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read file ({exc.strerror or _describe(exc)})"


def _open_encoded(fp: Any, label: str) -> Image.Image:
    """``Image.open`` on a binary stream: reads the header only, never decodes pixels."""
    try:
        with _pillow_limit_lifted():
            return Image.open(fp)
    except UnidentifiedImageError as e:
        raise ImageLoadError(label, "not a recognised image format") from e
    except MemoryError:
        raise
    except Exception as e:  # plugins raise OSError, SyntaxError, ValueError, struct.error ...
        raise ImageLoadError(label, f"truncated or corrupt image data ({_describe(e)})") from e


def _read_stream(stream: Any, label: str) -> bytes:
    try:
        data = stream.read()
    except MemoryError:
        raise
    except Exception as e:
        raise ImageLoadError(label, f"cannot read from the file object ({_describe(e)})") from e
    if isinstance(data, str):
        raise ImageLoadError(label, "file object is in text mode; open it in binary mode ('rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageLoadError(label, f"file object's read() returned {type(data).__name__}, not bytes")
    return bytes(data)


@contextmanager
def _opened(source: Any) -> Iterator[tuple[Image.Image, str, bool]]:
    """Yield ``(image, label, ours)`` for any non-array source; ``image`` is not yet decoded
    when it was opened here (``ours`` is True) and anything opened is closed afterwards."""
    if isinstance(source, Image.Image):
        yield source, _pil_label(source), False
        return

    if isinstance(source, (str, os.PathLike)):
        label = _path_label(source)
        try:
            st = os.stat(source)
        except OSError as e:
            raise ImageLoadError(label, _os_reason(e)) from e
        if stat.S_ISDIR(st.st_mode):
            raise ImageLoadError(label, "is a directory, not an image file")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise ImageLoadError(label, "empty file (0 bytes)")
        try:
            fp = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise ImageLoadError(label, _os_reason(e)) from e
        with fp:
            with _open_encoded(fp, label) as im:
                yield im, label, True
        return

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = f"<{type(source).__name__}>"
        data = bytes(source)
        if not data:
            raise ImageLoadError(label, "empty data (0 bytes)")
    elif callable(getattr(source, "read", None)):
        label = _stream_label(source)
        data = _read_stream(source, label)
        if not data:
            raise ImageLoadError(label, "empty file (0 bytes left to read)")
    else:
        raise ImageLoadError(
            f"<{type(source).__name__}>",
            "unsupported source type; expected a path, bytes, a binary file object, "
            "a PIL.Image.Image or a numpy array",
        )
    with _open_encoded(io.BytesIO(data), label) as im:
        yield im, label, True


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(label, f"image has no pixels (size {width}x{height})")
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageLoadError(
            label,
            f"{width}x{height} = {pixels:,} pixels exceeds the limit of {max_pixels:,} "
            f"(decompression-bomb guard); pass max_pixels={pixels} (or None) to allow",
        )


def _decode(im: Image.Image, label: str, max_pixels: int | None) -> None:
    """Decode all pixel data now, so truncation is an error here and not a grey band later."""
    limit = _pillow_limit()
    # Only lift Pillow's limit while decoding when the caller allowed more than Pillow
    # would; otherwise everything that passed our check is already within Pillow's limit.
    lift = limit is not None and (max_pixels is None or max_pixels > limit)
    try:
        with _pillow_limit_lifted() if lift else _nothing():
            im.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(label, f"decoded size exceeds Pillow's decompression-bomb limit ({e})") from e
    except Exception as e:
        raise ImageLoadError(label, f"truncated or corrupt image data ({_describe(e)})") from e


def _orientation(im: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation 1..8; 1 when absent or unreadable (a damaged EXIF block does
    not make the pixels unusable)."""
    try:
        # Image.Image.getexif reads only what the header already gave; PngImageFile's
        # override would decode the whole image to look for a late eXIf chunk.
        exif = Image.Image.getexif(im) if header_only else im.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


# Same transposes as PIL.ImageOps.exif_transpose, done on the final (H, W, 3) array.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (90 degrees anticlockwise)
}


# --------------------------------------------------------------------------------------
# Pixel conversion
# --------------------------------------------------------------------------------------


def _array_to_rgb(a: np.ndarray, label: str) -> np.ndarray:
    """(H, W) / (H, W, 1|3|4) array of a supported dtype -> (H, W, 3) uint8 (maybe a view)."""
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        pass
    elif a.ndim != 2:
        raise ImageLoadError(
            label,
            f"unsupported array shape {tuple(a.shape)}; expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4), channels last",
        )
    if a.size == 0:
        raise ImageLoadError(label, f"empty array (shape {tuple(a.shape)})")

    kind, itemsize = a.dtype.kind, a.dtype.itemsize
    if kind == "u" and itemsize == 1:
        out = a
    elif kind == "u" and itemsize == 2:
        out = (a >> 8).astype(np.uint8)
    elif kind == "b":
        out = a.astype(np.uint8) * np.uint8(255)
    elif kind == "f":
        if np.isnan(a).any():
            raise ImageLoadError(label, "float array contains NaN")
        work = a.astype(np.float64 if itemsize > 4 else np.float32, copy=False)
        out = np.rint(np.clip(work, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(
            label,
            f"unsupported array dtype {a.dtype}; expected uint8, uint16 (scaled by >> 8), "
            "bool, or float in [0, 1]",
        )

    if out.ndim == 2:
        out = out[:, :, None]
    channels = out.shape[2]
    if channels == 1:
        out = np.repeat(out, 3, axis=2)
    elif channels == 4:
        out = out[:, :, :3]  # alpha dropped, RGB kept as stored
    return out


def _pil_to_rgb(im: Image.Image, label: str) -> np.ndarray:
    """A decoded PIL image -> (H, W, 3) uint8."""
    mode = im.mode
    try:
        if mode in ("RGB", "L", "RGBA", "RGBX", "1", "F") or mode.startswith("I;16"):
            # uint8 / bool / uint16 (any byte order) / float32 -> the array rules.
            a = np.asarray(im)
        elif mode in ("LA", "La"):
            a = np.asarray(im if mode == "LA" else im.convert("LA"))[:, :, 0]
        elif mode == "I":
            # 32-bit integer grey, in practice 16-bit data: clip to 0..65535, then >> 8.
            a = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        elif mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in im.info
            a = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        else:  # CMYK, YCbCr, LAB, HSV, RGBa, La, ...: Pillow's own converter
            a = np.asarray(im.convert("RGB"))
    except MemoryError:
        raise
    except Exception as e:
        raise ImageLoadError(label, f"cannot convert image mode {mode!r} to RGB ({_describe(e)})") from e
    return _array_to_rgb(a, label)


def _finish(a: np.ndarray, source: Any) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=np.uint8)
    if (
        not out.flags.writeable
        or (isinstance(source, np.ndarray) and np.may_share_memory(out, source))
        or (out.base is not None and not isinstance(out.base, np.ndarray))
    ):
        out = out.copy()
    return out


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def load_image(source: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load any image source as a C-contiguous ``(H, W, 3)`` uint8 RGB array.

    Args:
        source: a path (``str`` / ``os.PathLike``); encoded image bytes (``bytes``,
            ``bytearray``, ``memoryview``); a binary file-like object (read from its current
            position to the end); a ``PIL.Image.Image``; or a numpy array of shape
            ``(H, W)`` grey, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA with
            dtype uint8, uint16 (scaled by ``>> 8``), bool (True -> 255) or float in
            ``[0, 1]`` (scaled by 255, rounded, out-of-range values clipped; NaN refused).
        max_pixels: refuse images with more than this many pixels (width * height),
            checked from the header before any pixel is decoded; ``None`` disables the
            check.  The default is Pillow's own default limit.  Pillow's global
            ``Image.MAX_IMAGE_PIXELS`` is not changed permanently, and Pillow's
            ``DecompressionBombWarning`` / ``DecompressionBombError`` do not fire for
            images this limit allows (see the thread-safety caveat in the module source).
            Not applied to numpy arrays, which are already decoded.

    Returns:
        A new array (never a view of ``source``) that the caller may modify.

    Conversion rules (files, bytes and PIL images):
        * The EXIF Orientation tag is applied, as ``PIL.ImageOps.exif_transpose`` does;
          an unreadable EXIF block is ignored.
        * Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) is dropped: the stored
          colour channels are returned unchanged, not composited onto a background.
        * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` clipped to
          0..65535) is scaled to 8 bit by ``>> 8``, not clipped as Pillow's
          ``convert("L")`` does.
        * ``F`` (32-bit float) follows the float-array rule: ``[0, 1]`` -> 0..255 (so
          ``load_image(im) == load_image(np.asarray(im))``); an ``F`` image holding
          0..255 values, as ``convert("F")`` makes, must be divided by 255 first.
        * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` and other modes Pillow can convert use
          Pillow's RGB conversion.
        * Multi-frame files (GIF, TIFF, WebP) give their first frame.
        * The pixel data are decoded completely, so a truncated file is an error (unless
          the program itself set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, which is honoured
          and never changed here).

    Raises:
        ImageLoadError: for every unusable input -- missing path, directory, empty file,
            unrecognised format, truncated or corrupt data, too many pixels, unsupported
            array shape or dtype, unsupported source type -- naming the file (or object
            kind) and the reason, with the original exception chained.
        TypeError, ValueError: ``max_pixels`` is not a positive int or None.
    """
    limit = _check_max_pixels(max_pixels)

    if isinstance(source, np.ndarray):
        return _finish(_array_to_rgb(source, f"<numpy.ndarray shape={tuple(source.shape)}>"), source)

    with _opened(source) as (im, label, _):
        _check_pixels(im.size, label, limit)
        _decode(im, label, limit)
        orientation = _orientation(im)
        rgb = _pil_to_rgb(im, label)
    if orientation in _ORIENT:
        rgb = _ORIENT[orientation](rgb)
    return _finish(rgb, source)


def image_size(source: Any) -> tuple[int, int]:
    """``(height, width)`` of the upright image, read from the header without decoding.

    Accepts the same sources as :func:`load_image`.  EXIF orientations 5-8 (the rotated
    ones) swap the stored width and height, so the result is the shape
    :func:`load_image` returns (minus the channel axis).  No pixel limit applies: this
    only reads the header.  For a PNG whose EXIF chunk comes after the pixel data (rare;
    Pillow writes it before) the orientation is not seen without decoding and the stored
    size is reported.

    Raises:
        ImageLoadError: the file is missing, a directory, empty, not an image, has a
            corrupt header, or the source is an unsupported array or object.
    """
    if isinstance(source, np.ndarray):
        a = source
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) or a.size == 0:
            # Reuse the array validation for the message.
            _array_to_rgb(a, f"<numpy.ndarray shape={tuple(a.shape)}>")
        return int(a.shape[0]), int(a.shape[1])

    with _opened(source) as (im, label, ours):
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(label, f"image has no pixels (size {width}x{height})")
        orientation = _orientation(im, header_only=ours)
    if orientation >= 5:
        width, height = height, width
    return int(height), int(width)


# ----------------------------------------------------------------------------- model input
#: ImageNet statistics the VGG16 frontend was trained with (Section 3.4: "input images are
#: normalised in the same manner as how the VGG16 model was trained").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> "torch.Tensor":
    """An (H, W, 3) uint8 RGB array -> a normalised (3, H, W) float32 tensor."""
    import torch

    arr = np.ascontiguousarray(image)
    if not arr.flags.writeable:  # torch warns on read-only buffers (e.g. np.asarray(PIL image))
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)
