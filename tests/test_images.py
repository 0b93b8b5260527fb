"""deepcount.images: the one image loader, exercised on a real ShanghaiTech B photo and
files derived from it (truncated, re-encoded, rotated, bombed ...)."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from deepcount.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    image_size,
    load_image,
)


# ------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photo_pil(photo_path: Path) -> Image.Image:
    with Image.open(photo_path) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (1024, 768)
        return im.copy()


@pytest.fixture(scope="session")
def photo(photo_pil: Image.Image) -> np.ndarray:
    """The upright photo as Pillow decodes it, (768, 1024, 3) uint8: the reference."""
    return np.asarray(photo_pil)


@pytest.fixture(scope="session")
def crop(photo_pil: Image.Image) -> Image.Image:
    """A small, non-square, non-symmetric piece of the photo for fast lossless round trips."""
    return photo_pil.crop((300, 200, 360, 240))  # 60 wide x 40 high


@pytest.fixture(autouse=True)
def pillow_globals_untouched():
    """No call in this module may leave Pillow's global switches changed."""
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _assert_rgb(a: np.ndarray, shape2d: tuple[int, int]) -> None:
    assert isinstance(a, np.ndarray)
    assert a.dtype == np.uint8
    assert a.shape == (*shape2d, 3)
    assert a.flags.c_contiguous and a.flags.writeable


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims ``width x height`` (CRC fixed): a header-only bomb."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# ------------------------------------------------------------------------------------
# the real photo, through every kind of source
# ------------------------------------------------------------------------------------


def test_real_photo_from_str_and_path(photo_path: Path, photo: np.ndarray):
    for src in (photo_path, str(photo_path)):
        a = load_image(src)
        _assert_rgb(a, (768, 1024))
        assert np.array_equal(a, photo)
    assert image_size(photo_path) == (768, 1024)
    assert image_size(str(photo_path)) == (768, 1024)


def test_bytes_and_file_like_sources(photo_path: Path, photo: np.ndarray):
    data = photo_path.read_bytes()
    for src in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        a = load_image(src)
        _assert_rgb(a, (768, 1024))
        assert np.array_equal(a, photo)
    with open(photo_path, "rb") as f:
        assert np.array_equal(load_image(f), photo)
        assert not f.closed  # the caller's file is left open
    assert image_size(data) == (768, 1024)
    assert image_size(io.BytesIO(data)) == (768, 1024)


def test_file_like_read_from_current_position_and_non_seekable(photo_path: Path, photo: np.ndarray):
    data = photo_path.read_bytes()
    shifted = io.BytesIO(b"HEADER-OF-SOME-CONTAINER" + data)
    shifted.seek(len(b"HEADER-OF-SOME-CONTAINER"))
    assert np.array_equal(load_image(shifted), photo)

    class Pipe:  # read() only: no seek, no tell, no name
        def __init__(self, payload: bytes):
            self._buf = io.BytesIO(payload)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

    assert np.array_equal(load_image(Pipe(data)), photo)
    with pytest.raises(ImageLoadError) as ei:
        load_image(Pipe(b""))
    assert ei.value.source == "<Pipe object>" and "empty" in ei.value.reason


def test_pil_source(photo_pil: Image.Image, photo: np.ndarray, photo_path: Path):
    before = (photo_pil.mode, photo_pil.size)
    a = load_image(photo_pil)
    _assert_rgb(a, (768, 1024))
    assert np.array_equal(a, photo)
    assert (photo_pil.mode, photo_pil.size) == before
    a[:] = 0  # the result is ours to modify; the image is unaffected
    assert np.array_equal(np.asarray(photo_pil), photo)
    # a lazily opened image is decoded by load_image
    with Image.open(photo_path) as lazy:
        assert np.array_equal(load_image(lazy), photo)


# ------------------------------------------------------------------------------------
# every failure is an ImageLoadError naming the file
# ------------------------------------------------------------------------------------


@pytest.mark.offline
def test_error_type_and_message():
    e = ImageLoadError("some/file.jpg", "broken")
    assert isinstance(e, ValueError)
    assert (e.source, e.reason, str(e)) == ("some/file.jpg", "broken", "some/file.jpg: broken")
    import pickle

    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.source, e2.reason) == (ImageLoadError, e.source, e.reason)


@pytest.mark.offline
def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nope" / "IMG_404.jpg"
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(missing)
        assert ei.value.source == str(missing)
        assert "no such file" in ei.value.reason
        assert isinstance(ei.value.__cause__, FileNotFoundError)


@pytest.mark.offline
def test_directory(tmp_path: Path):
    d = tmp_path / "images.jpg"
    d.mkdir()
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(d)
        assert ei.value.source == str(d) and "directory" in ei.value.reason


@pytest.mark.offline
def test_zero_byte_file(tmp_path: Path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(p)
        assert ei.value.source == str(p) and "empty file" in ei.value.reason
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


@pytest.mark.offline
def test_text_file_named_jpg(tmp_path: Path):
    p = tmp_path / "IMG_1.jpg"
    p.write_text("this is not a JPEG, just some text\n" * 20)
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(p)
        assert ei.value.source == str(p)
        assert "not a recognised image format" in ei.value.reason
        assert ei.value.__cause__ is not None  # Pillow's UnidentifiedImageError, chained
    with open(p, "rb") as f, pytest.raises(ImageLoadError) as ei:
        load_image(f)
    assert ei.value.source == str(p)  # a file object is named by its .name


def test_truncated_jpeg(tmp_path: Path, photo_path: Path):
    data = photo_path.read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    # the header is intact, so the size can still be read ...
    assert image_size(p) == (768, 1024)
    # ... but the pixels cannot: an error, not a half-grey picture
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert ei.value.source == str(p)
    assert "truncated or corrupt image data" in ei.value.reason
    assert isinstance(ei.value.__cause__, OSError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_truncated_png(tmp_path: Path, photo_pil: Image.Image):
    data = _encode(photo_pil, "PNG")
    p = tmp_path / "truncated.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert ei.value.source == str(p)
    assert "truncated or corrupt image data" in ei.value.reason
    assert ei.value.__cause__ is not None


@pytest.mark.offline
def test_text_mode_file_and_unsupported_types(tmp_path: Path):
    p = tmp_path / "a.jpg"
    p.write_text("x")
    with open(p) as f, pytest.raises(ImageLoadError, match="binary mode"):
        load_image(f)
    for bad in (42, 3.5, None, [[0, 1], [2, 3]], {"a": 1}):
        with pytest.raises(ImageLoadError, match="unsupported source type"):
            load_image(bad)


def test_closed_pil_image(photo_path: Path):
    im = Image.open(photo_path)
    im.close()
    with pytest.raises(ImageLoadError) as ei:
        load_image(im)
    assert ei.value.__cause__ is not None


def test_invalid_max_pixels(photo_path: Path):
    with pytest.raises(ValueError):
        load_image(photo_path, max_pixels=0)
    with pytest.raises(TypeError):
        load_image(photo_path, max_pixels=1.5e9)
    with pytest.raises(TypeError):
        load_image(photo_path, max_pixels=True)


# ------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------


def test_one_by_one_image(tmp_path: Path, photo_pil: Image.Image):
    p = tmp_path / "dot.png"
    px = photo_pil.getpixel((500, 400))
    Image.new("RGB", (1, 1), px).save(p)
    a = load_image(p)
    _assert_rgb(a, (1, 1))
    assert tuple(a[0, 0]) == px
    assert image_size(p) == (1, 1)


def test_greyscale_jpeg(tmp_path: Path, photo_pil: Image.Image):
    p = tmp_path / "grey.jpg"
    photo_pil.convert("L").save(p, quality=90)
    with Image.open(p) as im:
        assert im.mode == "L"
        grey = np.asarray(im)
    a = load_image(p)
    _assert_rgb(a, (768, 1024))
    for c in range(3):
        assert np.array_equal(a[:, :, c], grey)


def test_rgba_png_keeps_rgb_channels(tmp_path: Path, photo: np.ndarray):
    rgba = np.empty((768, 1024, 4), np.uint8)
    rgba[..., :3] = photo
    rgba[..., 3] = np.linspace(0, 255, 1024, dtype=np.uint8)[None, :]  # includes alpha 0
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p)
    with Image.open(p) as im:
        assert im.mode == "RGBA"
    a = load_image(p)
    _assert_rgb(a, (768, 1024))
    # alpha dropped, colours as stored -- not composited (that would darken the left side)
    assert np.array_equal(a, photo)


def test_palette_png(tmp_path: Path, photo_pil: Image.Image):
    q = photo_pil.quantize(colors=64)
    p = tmp_path / "palette.png"
    q.save(p)
    with Image.open(p) as im:
        assert im.mode == "P"
        expected = np.asarray(im.convert("RGB"))
    a = load_image(p)
    _assert_rgb(a, (768, 1024))
    assert np.array_equal(a, expected)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) <= 64
    assert _mad(a, np.asarray(photo_pil)) < 12  # still the same picture


def test_palette_png_with_transparency(tmp_path: Path, photo_pil: Image.Image):
    q = photo_pil.quantize(colors=32)
    palette = np.array(q.getpalette()[: 32 * 3], np.uint8).reshape(32, 3)
    idx = np.asarray(q)
    p = tmp_path / "palette_trns.png"
    q.save(p, transparency=int(idx[0, 0]))
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" in im.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = load_image(p)
    # every pixel is its palette colour, the transparent index included (alpha dropped)
    assert np.array_equal(a, palette[idx])


def test_sixteen_bit_png_scaled_not_clipped(tmp_path: Path, photo_pil: Image.Image):
    grey = np.asarray(photo_pil.convert("L"))
    p = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(p)  # 8-bit v -> 16-bit v*257
    with Image.open(p) as im:
        assert im.mode == "I;16"
        naive = np.asarray(im.convert("L"))
    # what the loader must not do: Pillow's convert("L") clips and whitens the photo
    assert (naive == 255).mean() > 0.5
    a = load_image(p)
    _assert_rgb(a, (768, 1024))
    for c in range(3):
        assert np.array_equal(a[:, :, c], grey)  # (v*257) >> 8 == v exactly


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_pil_modes(mode: str, crop: Image.Image):
    grey = np.asarray(crop.convert("L"))
    g16 = grey.astype(np.uint16) * 257
    if mode == "I":
        im = Image.fromarray(g16.astype(np.int32))
    else:  # raw bytes: Pillow's convert() between 16-bit modes clips at 255 too
        order = ">" if mode == "I;16B" else "<"
        im = Image.frombytes(mode, (60, 40), g16.astype(order + "u2").tobytes())
    assert im.mode == mode
    a = load_image(im)
    assert np.array_equal(a, np.repeat(grey[:, :, None], 3, axis=2))


@pytest.mark.offline
def test_mode_i_out_of_range_is_clipped_to_16_bit():
    im = Image.fromarray(np.array([[-5, 0, 65535, 70000]], np.int32))
    assert im.mode == "I"
    assert load_image(im)[0, :, 0].tolist() == [0, 0, 255, 255]


def test_cmyk_jpeg(tmp_path: Path, photo: np.ndarray, photo_pil: Image.Image):
    p = tmp_path / "cmyk.jpg"
    photo_pil.convert("CMYK").save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    a = load_image(p)
    _assert_rgb(a, (768, 1024))
    mad = _mad(a, photo)
    assert mad < 1.5, mad  # measured ~0.3 (JPEG re-encoding)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "RGBX", "RGBa", "YCbCr", "CMYK", "P", "PA", "F"])
def test_pil_modes(mode: str, crop: Image.Image):
    ref = np.asarray(crop)
    if mode == "F":
        im = Image.fromarray(ref[:, :, 1].astype(np.float32) / 255.0)  # float in [0, 1]
    elif mode == "La":  # premultiplied; Pillow makes it only from LA / RGBA
        im = crop.convert("LA").convert("La")
    else:
        im = crop.convert(mode)
    assert im.mode == mode
    a = load_image(im)
    _assert_rgb(a, (40, 60))
    if mode in ("1", "L", "LA", "La", "F"):
        assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    if mode == "1":
        assert set(np.unique(a)) <= {0, 255}
    elif mode in ("L", "LA", "La"):
        assert np.array_equal(a[..., 0], np.asarray(crop.convert("L")))
    elif mode == "F":
        assert np.array_equal(a[..., 0], ref[:, :, 1])
        assert np.array_equal(a, load_image(np.asarray(im)))  # same rule as float arrays
    elif mode in ("RGBX", "RGBa"):
        assert np.array_equal(a, ref)
    elif mode in ("YCbCr", "CMYK"):
        assert _mad(a, ref) < 2
    else:  # palettes: the palette colours
        assert np.array_equal(a, np.asarray(im.convert("RGBA"))[..., :3])


@pytest.mark.parametrize(
    "fmt, kw",
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("PPM", {}), ("WEBP", {"lossless": True}), ("GIF", {})],
)
def test_lossless_formats(fmt: str, kw: dict, crop: Image.Image):
    src = crop.quantize(colors=200).convert("RGB") if fmt == "GIF" else crop
    data = _encode(src, fmt, **kw)
    a = load_image(data)
    _assert_rgb(a, (40, 60))
    assert np.array_equal(a, np.asarray(src))
    assert image_size(data) == (40, 60)


# ------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, stored_as",
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_rotated_jpeg(tmp_path: Path, photo_pil: Image.Image, photo: np.ndarray, orientation, stored_as):
    """The camera stored the pixels sideways and says so in the tag; we return it upright."""
    rotated = tmp_path / f"rotated{orientation}.jpg"
    photo_pil.transpose(stored_as).save(rotated, quality=95, exif=_exif(orientation))
    upright = tmp_path / "upright.jpg"
    photo_pil.save(upright, quality=95)
    with Image.open(rotated) as im:
        assert im.size == (768, 1024)  # stored sideways: 768 wide, 1024 high
        assert im.getexif()[0x0112] == orientation

    a = load_image(rotated)
    _assert_rgb(a, (768, 1024))
    ref = load_image(upright)
    assert _mad(a, ref) < 3.0
    assert _mad(a, photo) < 3.0
    assert _mad(a[::-1, ::-1], photo) > 20  # i.e. not the half-turned picture
    assert image_size(rotated) == (768, 1024)
    assert image_size(rotated) == a.shape[:2]
    # the same for the file as bytes and as an already-opened PIL image
    assert np.array_equal(load_image(rotated.read_bytes()), a)
    with Image.open(rotated) as im:
        assert np.array_equal(load_image(im), a)
        assert image_size(im) == (768, 1024)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations_match_pillow(orientation: int, crop: Image.Image):
    for fmt in ("PNG", "JPEG"):
        data = _encode(crop, fmt, exif=_exif(orientation), **({"quality": 95} if fmt == "JPEG" else {}))
        with Image.open(io.BytesIO(data)) as im:
            assert im.getexif().get(0x0112) == orientation
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        a = load_image(data)
        assert np.array_equal(a, expected), (fmt, orientation)
        h, w = (60, 40) if orientation >= 5 else (40, 60)
        assert a.shape == (h, w, 3)
        assert image_size(data) == (h, w)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_damaged_exif_is_ignored(crop: Image.Image):
    data = _encode(crop, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00garbage-garbage")
    assert load_image(data).shape == (40, 60, 3)
    assert image_size(data) == (40, 60)


# ------------------------------------------------------------------------------------
# decompression bombs
# ------------------------------------------------------------------------------------


@pytest.mark.offline
def test_default_limit_is_pillows_default():
    assert DEFAULT_MAX_PIXELS == 89_478_485
    assert DEFAULT_MAX_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


@pytest.mark.offline
def test_header_bomb_refused_before_decoding(tmp_path: Path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_with_claimed_size(20000, 20000))  # 400 Mpx claimed, 70 bytes on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Pillow's warning nor its error may fire
        with pytest.raises(ImageLoadError) as ei:
            load_image(p)
        assert ei.value.source == str(p)
        reason = ei.value.reason
        assert "400,000,000 pixels exceeds the limit of 89,478,485" in reason
        assert "decompression-bomb guard" in reason and "max_pixels=" in reason
        # the size itself can still be read from the header
        assert image_size(p) == (20000, 20000)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's default, untouched


@pytest.mark.offline
def test_our_limit_applies_even_when_pillows_is_off(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageLoadError, match="decompression-bomb guard"):
        load_image(_png_with_claimed_size(20000, 20000))
    assert Image.MAX_IMAGE_PIXELS is None


def test_small_image_over_small_limit(crop: Image.Image):
    data = _encode(crop, "PNG")  # 60 x 40 = 2400 pixels
    with pytest.raises(ImageLoadError) as ei:
        load_image(data, max_pixels=2399)
    assert "60x40 = 2,400 pixels exceeds the limit of 2,399" in ei.value.reason
    assert load_image(data, max_pixels=2400).shape == (40, 60, 3)
    assert load_image(data, max_pixels=None).shape == (40, 60, 3)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(crop, max_pixels=100)  # PIL images are checked too
    # arrays are already decoded: no limit
    assert load_image(np.asarray(crop), max_pixels=100).shape == (40, 60, 3)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF"])
@pytest.mark.parametrize("pillow_limit", [1000, 2000])  # 2400 px: > 2x limit (error) / > limit (warning)
def test_raised_limit_silences_pillows_own_guard(fmt: str, pillow_limit: int, crop: Image.Image, monkeypatch):
    data = _encode(crop, fmt)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    # Pillow alone would refuse or warn about this 2400-pixel image
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            Image.open(io.BytesIO(data)).load()
    # the caller's limit (default or None) wins, silently, and Pillow's value is restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for max_pixels in (DEFAULT_MAX_PIXELS, 2400, None):
            a = load_image(data, max_pixels=max_pixels)
            assert a.shape == (40, 60, 3)
            assert Image.MAX_IMAGE_PIXELS == pillow_limit
        with pytest.raises(ImageLoadError, match="exceeds the limit of 2,000"):
            load_image(data, max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_limit_restored_under_concurrent_loads(crop: Image.Image, monkeypatch):
    data = _encode(crop, "PNG")
    expected = np.asarray(crop)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    failures: list[BaseException] = []

    def worker():
        try:
            for _ in range(20):
                assert np.array_equal(load_image(data, max_pixels=None), expected)
                with pytest.raises(ImageLoadError):
                    load_image(data, max_pixels=10)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert Image.MAX_IMAGE_PIXELS == 1000


# ------------------------------------------------------------------------------------
# numpy arrays
# ------------------------------------------------------------------------------------


def test_numpy_uint8_shapes(photo: np.ndarray):
    grey = photo[..., 1].copy()
    triple = np.repeat(grey[:, :, None], 3, axis=2)
    assert np.array_equal(load_image(grey), triple)
    assert np.array_equal(load_image(grey[:, :, None]), triple)
    assert np.array_equal(load_image(photo), photo)
    rgba = np.concatenate([photo, np.full((768, 1024, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(load_image(rgba), photo)  # alpha dropped


def test_numpy_result_is_a_contiguous_copy(photo: np.ndarray):
    src = photo.copy()
    a = load_image(src)
    assert a is not src and not np.shares_memory(a, src)
    a[:] = 0
    assert np.array_equal(src, photo)
    view = photo[::2, ::-3]  # non-contiguous, negative strides
    b = load_image(view)
    _assert_rgb(b, view.shape[:2])
    assert np.array_equal(b, view)
    chw_like_fortran = np.asfortranarray(photo)
    assert load_image(chw_like_fortran).flags.c_contiguous


def test_numpy_uint16(photo: np.ndarray):
    x16 = photo.astype(np.uint16) * 256 + 200  # (v*256 + 200) >> 8 == v
    assert np.array_equal(load_image(x16), photo)
    assert np.array_equal(load_image(x16.astype(">u2")), photo)  # big-endian too
    assert load_image(np.array([[0, 255, 256, 65535]], np.uint16))[0, :, 0].tolist() == [0, 0, 1, 255]


@pytest.mark.offline
def test_numpy_bool():
    m = np.array([[True, False], [False, True]])
    a = load_image(m)
    _assert_rgb(a, (2, 2))
    assert a[..., 0].tolist() == [[255, 0], [0, 255]]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_float(dtype, photo: np.ndarray):
    x = np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 1.5, np.inf, -np.inf]], dtype)
    assert load_image(x)[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255, 0]
    if dtype is not np.float16:
        assert np.array_equal(load_image(photo.astype(dtype) / 255.0), photo)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty array"),
        (np.zeros((4, 0), np.uint8), "empty array"),
        (np.zeros((4, 5, 2), np.uint8), "shape"),
        (np.zeros((3, 4, 5), np.uint8), "shape"),
        (np.zeros((20,), np.uint8), "shape"),
        (np.zeros((1, 4, 5, 3), np.uint8), "shape"),
        (np.zeros((4, 5, 3), np.int64), "dtype"),
        (np.zeros((4, 5), np.int8), "dtype"),
        (np.zeros((4, 5), np.uint32), "dtype"),
        (np.zeros((4, 5), np.complex64), "dtype"),
        (np.zeros((4, 5), object), "dtype"),
        (np.full((4, 5), np.nan, np.float32), "NaN"),
    ],
)
@pytest.mark.offline
def test_numpy_rejects(bad: np.ndarray, words: str):
    with pytest.raises(ImageLoadError) as ei:
        load_image(bad)
    assert words in ei.value.reason
    assert "numpy.ndarray" in ei.value.source


@pytest.mark.offline
def test_numpy_image_size():
    assert image_size(np.zeros((7, 9, 3), np.uint8)) == (7, 9)
    with pytest.raises(ImageLoadError):
        image_size(np.zeros((7, 9, 2), np.uint8))


# ------------------------------------------------------------------------------------
# extensions
# ------------------------------------------------------------------------------------


@pytest.mark.offline
def test_image_extensions():
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} <= IMAGE_EXTENSIONS
    known = Image.registered_extensions()
    for ext in IMAGE_EXTENSIONS:
        assert ext.startswith(".") and ext == ext.lower(), ext
        assert ext in known, ext  # Pillow can open every extension we scan for
