"""Tests for pipeline.io.images: one test per status kind and per colour mode, all inputs built in the test."""

from __future__ import annotations

import io
import resource
import struct
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.io import images
from pipeline.io.images import (
    DECODE_ERROR,
    EMPTY,
    NOT_IMAGE,
    OK,
    READ_ERROR,
    STATUSES,
    TOO_LARGE,
    TOO_SMALL,
    TRUNCATED,
    Decoded,
    decode_image,
    failed,
    resize_max_side,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """Encode a PIL image to bytes."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noisy_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random RGB image: incompressible, so a JPEG cut in half really misses pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_1bit_zeros(w: int, h: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, written chunk by chunk.

    PIL would need a w*h byte buffer to encode it (900 MB for 30000x30000); the zlib stream of
    all-zero rows is built incrementally instead, so the file stays small (~0.5 MB at zlib level 1,
    chosen over level 9's ~0.1 MB because it builds 2-3x faster) and costs no memory.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + b"\x00" * ((w + 7) // 8)  # filter byte 0, then packed bits
    comp = zlib.compressobj(1)
    parts = []
    rows_per_block = 1000
    block = row * rows_per_block
    for y in range(0, h, rows_per_block):
        n = min(rows_per_block, h - y)
        parts.append(comp.compress(block if n == rows_per_block else row * n))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, colour type 0 (grayscale)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def assert_failed(d: Decoded, status: str) -> None:
    """A failure result carries no array and a message."""
    assert d.status == status, (d.status, d.error)
    assert d.array is None
    assert not d.ok
    assert d.error


def assert_ok(d: Decoded, shape: tuple[int, int]) -> np.ndarray:
    """An ok result is an (h, w, 3) uint8 array; returns it."""
    assert d.status == OK, d.error
    assert d.ok and d.error == ""
    assert d.array is not None
    assert d.array.dtype == np.uint8
    assert d.array.shape == (*shape, 3)
    assert d.array.flags.c_contiguous and d.array.flags.writeable
    return d.array


# ---------------------------------------------------------------- status constants and helpers


def test_statuses_are_the_documented_kinds():
    assert STATUSES == ("ok", "empty", "truncated", "not_image", "too_large", "too_small", "read_error", "decode_error",
                        "bad_record")
    assert len(set(STATUSES)) == len(STATUSES)


def test_read_error_is_built_by_callers_with_failed():
    d = failed(READ_ERROR, "s3: access denied")
    assert_failed(d, READ_ERROR)
    assert (d.width, d.height) == (0, 0)
    with pytest.raises(ValueError):
        failed(OK, "not a failure")
    with pytest.raises(ValueError):
        failed("bogus", "unknown kind")


def test_bad_parameters_raise():
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    for kw in ({"max_side": 0}, {"min_side": 0}, {"max_pixels": 0}):
        with pytest.raises(ValueError):
            decode_image(data, **kw)


# ---------------------------------------------------------------- resize_max_side


@pytest.mark.parametrize(
    ("w", "h", "side", "expected"),
    [
        (300, 200, 128, (128, 85)),  # 200 * 128 / 300 = 85.33
        (200, 300, 128, (85, 128)),
        (50, 100, 128, (64, 128)),  # upscaling
        (1, 1, 512, (512, 512)),
        (10000, 1, 512, (512, 1)),  # shorter side kept >= 1 px
        (1, 10000, 512, (1, 512)),
        (640, 480, 512, (512, 384)),
        (3, 2, 3, (3, 2)),  # identity
        (5, 2, 4, (4, 2)),  # 1.6 rounds half up to 2
    ],
)
def test_resize_max_side(w, h, side, expected):
    assert resize_max_side(w, h, side) == expected


def test_resize_max_side_is_symmetric_and_validates():
    rng = np.random.default_rng(1)
    for w, h, s in rng.integers(1, 3000, (200, 3)):
        tw, th = resize_max_side(int(w), int(h), int(s))
        assert max(tw, th) == s and min(tw, th) >= 1
        assert resize_max_side(int(h), int(w), int(s)) == (th, tw)
    with pytest.raises(ValueError):
        resize_max_side(0, 10, 10)
    with pytest.raises(ValueError):
        resize_max_side(10, 10, 0)


# ---------------------------------------------------------------- one test per failure kind


def test_empty():
    assert_failed(decode_image(b""), EMPTY)
    assert_failed(decode_image(bytearray()), EMPTY)


def test_truncated_jpeg_cut_in_half():
    data = encode(noisy_rgb(96, 64), "JPEG", quality=90)
    d = decode_image(data[: len(data) // 2])
    assert_failed(d, TRUNCATED)
    assert "truncated" in d.error
    assert (d.width, d.height) == (96, 64)  # the header survived, so the size is known


def test_truncated_inside_header():
    data = encode(noisy_rgb(96, 64), "JPEG")
    d = decode_image(data[:20])
    assert_failed(d, TRUNCATED)
    assert "truncated" in d.error


def test_truncated_png():
    data = encode(noisy_rgb(96, 64), "PNG")
    assert_failed(decode_image(data[: len(data) // 2]), TRUNCATED)


def test_not_image_text_bytes():
    d = decode_image(b"this is a plain text file, not an image\n" * 20)
    assert_failed(d, NOT_IMAGE)
    assert (d.width, d.height) == (0, 0)


def test_decode_error_on_corrupt_pixel_data():
    # Complete file (IEND present) whose compressed pixel stream is garbage: corrupt, not truncated.
    data = bytearray(encode(noisy_rgb(64, 64), "PNG"))
    i = data.index(b"IDAT") + 4
    data[i + 50 : i + 80] = b"\xff" * 30
    d = decode_image(bytes(data))
    assert_failed(d, DECODE_ERROR)


def test_too_small_reports_size():
    d = decode_image(encode(Image.new("RGB", (10, 3)), "PNG"), min_side=5)
    assert_failed(d, TOO_SMALL)
    assert (d.width, d.height) == (10, 3)


def test_too_small_reports_size_after_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode_image(encode(Image.new("RGB", (10, 3)), "JPEG", exif=exif.tobytes()), min_side=5)
    assert_failed(d, TOO_SMALL)
    assert (d.width, d.height) == (3, 10)


def test_too_large_by_max_pixels_from_header():
    d = decode_image(encode(Image.new("RGB", (100, 80)), "PNG"), max_pixels=5000)
    assert_failed(d, TOO_LARGE)
    assert (d.width, d.height) == (100, 80)


@pytest.fixture(scope="module")
def bomb_30k() -> bytes:
    return png_1bit_zeros(30000, 30000)


def test_bomb_png_is_a_real_png(bomb_30k, monkeypatch):
    assert len(bomb_30k) < 1_000_000  # 900 megapixels in well under 1 MB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let PIL read the header
    with Image.open(io.BytesIO(bomb_30k)) as im:  # header only, no pixels
        assert (im.format, im.mode, im.size) == ("PNG", "1", (30000, 30000))


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def test_decompression_bomb_is_too_large_fast_and_small(bomb_30k):
    rss_before = _max_rss_bytes()
    t0 = time.perf_counter()
    d = decode_image(bomb_30k)
    elapsed = time.perf_counter() - t0
    assert_failed(d, TOO_LARGE)
    assert elapsed < 2.0
    assert _max_rss_bytes() - rss_before < 200 * 2**20  # peak RSS did not grow by a pixel buffer


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_in_pil_warning_zone_is_too_large():
    # 1e8 pixels: above PIL's MAX_IMAGE_PIXELS (warning) but below 2x (error).
    data = png_1bit_zeros(10000, 10000)
    d = decode_image(data)
    assert_failed(d, TOO_LARGE)
    assert (d.width, d.height) == (10000, 10000)
    # With warnings escalated to errors PIL raises the warning itself; still a status, not a crash.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_failed(decode_image(data), TOO_LARGE)


def test_truncation_is_not_enabled_globally():
    from PIL import ImageFile

    decode_image(encode(noisy_rgb(32, 32), "JPEG")[:300])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_never_raises_on_mutated_files():
    rng = np.random.default_rng(7)
    sources = [
        encode(noisy_rgb(40, 30), "JPEG"),
        encode(noisy_rgb(40, 30), "PNG"),
        encode(noisy_rgb(40, 30).convert("P"), "GIF"),
    ]
    for _ in range(60):
        data = bytearray(sources[rng.integers(len(sources))])
        for _ in range(rng.integers(1, 6)):
            pos = int(rng.integers(len(data)))
            data[pos] = int(rng.integers(256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        d = decode_image(bytes(data), max_side=32)
        assert d.status in STATUSES
        assert (d.array is not None) == (d.status == OK)


# ---------------------------------------------------------------- colour modes and bit depths


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    im.paste((255, 255, 0, 0), (16, 0, 32, 16))  # blue on the right half
    a = assert_ok(decode_image(encode(im, "JPEG", quality=95), max_side=32), (16, 32))
    np.testing.assert_allclose(a[8, 4], RED, atol=10)
    np.testing.assert_allclose(a[8, 28], BLUE, atol=10)


def test_16bit_png_gradient_is_stretched_not_clipped():
    values = np.linspace(1000, 3000, 64).round().astype(np.uint16)
    arr16 = np.tile(values, (16, 1))
    im = Image.fromarray(arr16)
    assert im.mode == "I;16"
    a = assert_ok(decode_image(encode(im, "PNG"), max_side=64), (16, 64))
    g = a[..., 0]
    assert (a[..., 1] == g).all() and (a[..., 2] == g).all()  # gray
    assert g.min() == 0 and g.max() == 255  # full 8-bit range used
    assert (np.diff(g[0].astype(int)) >= 0).all()  # monotonic, structure kept
    assert len(np.unique(g)) > 50  # not clipped to a couple of values
    expected = np.floor((values - 1000) * (255 / 2000) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(g[0], expected)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [(np.int32, -70000, 70000), (np.float32, -1.5, 2.5)],
    ids=["mode-I", "mode-F"],
)
def test_32bit_int_and_float_tiff_stretched(dtype, lo, hi):
    arr = np.tile(np.linspace(lo, hi, 40).astype(dtype), (8, 1))
    im = Image.fromarray(arr)
    assert im.mode in ("I", "F")
    a = assert_ok(decode_image(encode(im, "TIFF"), max_side=40), (8, 40))
    assert a[..., 0].min() == 0 and a[..., 0].max() == 255
    assert (np.diff(a[0, :, 0].astype(int)) >= 0).all()


def test_constant_16bit_image_does_not_divide_by_zero():
    im = Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16))
    a = assert_ok(decode_image(encode(im, "PNG"), max_side=8), (8, 8))
    assert (a == 0).all()


def test_palette_png_with_transparency_composited_on_white():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0 = red, 1 = blue
    im.paste(1, (4, 0, 8, 8))
    data = encode(im, "PNG", transparency=1)  # blue is the transparent index
    assert Image.open(io.BytesIO(data)).mode == "P"
    a = assert_ok(decode_image(data, max_side=8), (8, 8))
    assert (a[:, :4] == RED).all()
    assert (a[:, 4:] == WHITE).all()


def test_rgba_png_transparent_pixel_becomes_white():
    im = Image.new("RGBA", (4, 2), (0, 255, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    a = assert_ok(decode_image(encode(im, "PNG"), max_side=4), (2, 4))
    assert tuple(a[0, 0]) == WHITE
    assert tuple(a[0, 2]) == GREEN
    np.testing.assert_allclose(a[0, 1], (255, 127, 127), atol=1)


def test_la_png_alpha_composited():
    im = Image.new("LA", (4, 4), (10, 255))
    im.putpixel((0, 0), (10, 0))
    a = assert_ok(decode_image(encode(im, "PNG"), max_side=4), (4, 4))
    assert tuple(a[0, 0]) == WHITE
    assert tuple(a[1, 1]) == (10, 10, 10)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel_become_rgb(mode):
    im = Image.new("L", (6, 4), 200)
    im.paste(0, (0, 0, 3, 4))
    im = im.convert(mode, dither=Image.Dither.NONE)  # no dithering: a clean 0|255 split
    a = assert_ok(decode_image(encode(im, "PNG"), max_side=6), (4, 6))
    assert (a[:, :3] == 0).all()
    expected = 255 if mode == "1" else 200
    assert (a[:, 3:] == expected).all()


def test_multiframe_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    a = assert_ok(decode_image(data, max_side=8), (8, 8))
    np.testing.assert_allclose(a.reshape(-1, 3).mean(0), RED, atol=2)


# ---------------------------------------------------------------- geometry: EXIF, tiny, resizing


def _exif_jpeg(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_rotates_and_reports_rotated_size():
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 8, 8))  # red top-left corner as stored
    d = decode_image(_exif_jpeg(im, 6), max_side=40)
    a = assert_ok(d, (40, 20))
    assert (d.width, d.height) == (20, 40)
    # Orientation 6: stored row 0 is shown on the right, so the top-left corner ends up top-right.
    np.testing.assert_allclose(a[1:6, 15:19].reshape(-1, 3).mean(0), RED, atol=12)
    np.testing.assert_allclose(a[1:6, 1:5].reshape(-1, 3).mean(0), BLUE, atol=12)
    np.testing.assert_allclose(a[35:39, 15:19].reshape(-1, 3).mean(0), BLUE, atol=12)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_imageops_exif_transpose(orientation):
    im = noisy_rgb(24, 16, seed=orientation)
    data = _exif_jpeg(im, orientation)
    with Image.open(io.BytesIO(data)) as ref_im:
        ref = np.asarray(ImageOps.exif_transpose(ref_im).convert("RGB"))
    d = decode_image(data, max_side=24)
    a = assert_ok(d, ref.shape[:2])
    np.testing.assert_array_equal(a, ref)
    assert (d.width, d.height) == (ref.shape[1], ref.shape[0])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_does_not_reject_the_image():
    im = Image.new("RGB", (8, 6), GREEN)
    data = encode(im, "JPEG", exif=b"Exif\x00\x00MM\x00*garbage-garbage")
    d = decode_image(data, max_side=8)
    assert_ok(d, (6, 8))


def test_one_by_one_png_is_valid_and_upscaled():
    d = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    a = assert_ok(d, (512, 512))
    assert (d.width, d.height) == (1, 1)
    assert (a == (10, 20, 30)).all()


def test_normal_image_longer_side_resized_to_max_side():
    im = Image.new("RGB", (300, 200), RED)
    im.paste(GREEN, (150, 0, 300, 200))
    d = decode_image(encode(im, "PNG"), max_side=128)
    a = assert_ok(d, (85, 128))
    assert (d.width, d.height) == (300, 200)  # original size, not the resized one
    assert (a[:, :60] == RED).all()
    assert (a[:, 68:] == GREEN).all()


def test_small_image_upscaled_to_max_side():
    d = decode_image(encode(Image.new("RGB", (50, 100), BLUE), "PNG"), max_side=128)
    a = assert_ok(d, (128, 64))
    assert (a == BLUE).all()


def test_large_jpeg_reduced_decode_matches_full_decode():
    # decode_image lets libjpeg decode at reduced scale (draft); the result must match a full-size
    # decode followed by the same resize, up to JPEG scaling noise.
    yy, xx = np.mgrid[0:1600, 0:2000]
    arr = np.stack([xx * 255 // 1999, yy * 255 // 1599, (xx + yy) * 255 // 3598], -1).astype(np.uint8)
    data = encode(Image.fromarray(arr), "JPEG", quality=95)
    d = decode_image(data, max_side=256)
    a = assert_ok(d, (205, 256))
    assert (d.width, d.height) == (2000, 1600)
    with Image.open(io.BytesIO(data)) as full:
        ref = np.asarray(full.convert("RGB").resize((256, 205), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(a.astype(int) - ref).mean() < 2.0


def test_allowed_formats_exclude_ghostscript_eps():
    assert "EPS" not in images.ALLOWED_FORMATS
    assert {"JPEG", "PNG"} <= set(images.ALLOWED_FORMATS)
