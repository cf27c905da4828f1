"""Image decoding and validation: EXIF orientation, colour modes, bit depths, size limits; errors as data."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Status kinds. They are plain strings so they can go straight into a Parquet column. Only read_error is transient
# (the next extraction run redoes it); every other failure stays until the image's fingerprint changes.
OK = "ok"
EMPTY = "empty"  # zero bytes
TRUNCATED = "truncated"  # the file ends before the pixel data does
# no allowed image format recognises the bytes; also set by callers for a path that is not a regular file (a FIFO,
# a device, a folder named by a manifest): like unrecognised bytes, that stays so until the input changes
NOT_IMAGE = "not_image"
# more than max_pixels pixels (decompression-bomb guard), seen in the header; also set by callers for a file of more
# than the extraction's max_image_bytes, refused unread
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"  # short side below min_side
READ_ERROR = "read_error"  # the bytes could not be fetched; set by callers, never by decode_image
DECODE_ERROR = "decode_error"  # anything else; the message is kept
BAD_RECORD = "bad_record"  # the listing's record names nothing to read (a manifest row without a uri); set by callers
STATUSES: tuple[str, ...] = (OK, EMPTY, TRUNCATED, NOT_IMAGE, TOO_LARGE, TOO_SMALL, READ_ERROR, DECODE_ERROR,
                             BAD_RECORD)

# Same value as PIL's own default Image.MAX_IMAGE_PIXELS (about a 0.25 GiB RGB buffer).
DEFAULT_MAX_PIXELS = 89_478_485

# Formats we let PIL try. A whitelist instead of "everything PIL knows" because some plugins are
# unsafe or surprising on untrusted bytes (EPS shells out to Ghostscript; weak-signature formats
# such as TGA can "recognise" arbitrary bytes as garbage pixels). Filtered against what this PIL
# build registers, because Image.open raises KeyError for an unknown format name.
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "JPEG2000", "PPM", "ICO", "QOI")
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

# EXIF Orientation -> transposition, the same table as PIL.ImageOps.exif_transpose. We apply it
# ourselves so it can run on the small resized image instead of the full-size one, and so the
# orientation read from the original file survives convert()/resize(), which drop TIFF tags.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one image; failures are values, not exceptions.

    Attributes:
        array: HxWx3 uint8 RGB pixels, already resized so the longer side is max_side; None unless ok.
        width: original width after EXIF transposition (0 when unknown).
        height: original height after EXIF transposition (0 when unknown).
        status: one of STATUSES.
        error: human-readable reason, "" when ok.
    """

    array: np.ndarray | None
    width: int
    height: int
    status: str
    error: str

    @property
    def ok(self) -> bool:
        """Whether decoding succeeded.

        Returns:
            True when status is "ok".
        """
        return self.status == OK


def failed(status: str, error: str, width: int = 0, height: int = 0) -> Decoded:
    """Build a failed Decoded, e.g. ``failed(READ_ERROR, str(exc))`` when fetching bytes failed.

    Args:
        status: one of STATUSES other than "ok".
        error: human-readable reason.
        width: original width if known, else 0.
        height: original height if known, else 0.

    Returns:
        A Decoded with no array.

    Raises:
        ValueError: for an unknown status or "ok" (a programming error, not bad input).
    """
    if status not in STATUSES or status == OK:
        raise ValueError(f"not a failure status: {status!r}")
    return Decoded(None, int(width), int(height), status, error)


def resize_max_side(w: int, h: int, max_side: int) -> tuple[int, int]:
    """Target size that makes the longer side exactly max_side, keeping the aspect ratio.

    Both down- and up-scales. The shorter side is rounded half up and kept at least 1 px. The model
    uses this to map boxes between resized and original pixels, so it must stay deterministic.

    Args:
        w: source width in pixels (> 0).
        h: source height in pixels (> 0).
        max_side: wanted length of the longer side (> 0).

    Returns:
        (width, height) of the resized image.

    Raises:
        ValueError: if any argument is not positive.
    """
    if w <= 0 or h <= 0 or max_side <= 0:
        raise ValueError(f"sizes must be positive, got w={w}, h={h}, max_side={max_side}")
    if w >= h:
        return max_side, max(1, math.floor(h * max_side / w + 0.5))
    return max(1, math.floor(w * max_side / h + 0.5)), max_side


def decode_image(
    data: bytes,
    max_side: int = 512,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode image bytes to RGB uint8 with the longer side resized to max_side; never raises for bad input.

    Handles EXIF orientation, CMYK, 16-bit and 32-bit integer and float grayscale (stretched over the
    image's actual value range), palette and alpha images (composited on white), 1-bit and grayscale,
    multi-frame files (first frame), truncated files, and non-image bytes. Size limits are checked
    from the header before any pixel is decoded. PIL's own decompression-bomb check (governed by the
    process-wide ``Image.MAX_IMAGE_PIXELS``, which this function leaves alone) also maps to
    "too_large", so the effective limit is ``min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)`` (or
    ``Image.MAX_IMAGE_PIXELS`` itself when warnings are escalated to errors).

    Args:
        data: the encoded file's bytes (bytes, bytearray or memoryview).
        max_side: length in pixels of the longer side of the returned array.
        min_side: images whose shorter side (in original pixels) is below this are "too_small".
        max_pixels: images with more pixels than this are "too_large".

    Returns:
        A Decoded; ``array`` is set only when ``status == "ok"``.

    Raises:
        ValueError: if max_side, min_side or max_pixels is not positive (a caller bug, not bad data).
    """
    if max_side < 1 or min_side < 1 or max_pixels < 1:
        raise ValueError(f"max_side, min_side, max_pixels must be >= 1, got {max_side}, {min_side}, {max_pixels}")
    if not data:
        return failed(EMPTY, "zero bytes")
    data = bytes(data)

    # 1. Header only: Image.open parses the header and does not decode pixels.
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL raises the Error above 2 * MAX_IMAGE_PIXELS; the Warning only arrives here as an
        # exception when warnings are escalated to errors (python -W error, pytest -W error).
        return failed(TOO_LARGE, f"decompression-bomb guard: {exc}")
    except Exception as exc:  # noqa: BLE001 - plugins raise many types on garbage headers
        return _classify_open_failure(data, exc)

    try:
        return _decode_opened(im, data, max_side, min_side, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return failed(TOO_LARGE, f"decompression-bomb guard: {exc}")
    except Exception as exc:  # noqa: BLE001 - errors are data here; the caller records them
        return failed(DECODE_ERROR, f"{type(exc).__name__}: {exc}")
    finally:
        im.close()


def _decode_opened(im: Image.Image, data: bytes, max_side: int, min_side: int, max_pixels: int) -> Decoded:
    """Validate sizes, decode pixels, convert, resize and orient an opened image.

    Args:
        im: image returned by Image.open (header parsed, pixels not loaded).
        data: the same bytes, used to tell truncation from other decoder errors.
        max_side: see decode_image.
        min_side: see decode_image.
        max_pixels: see decode_image.

    Returns:
        The Decoded result.
    """
    w0, h0 = im.size
    if w0 <= 0 or h0 <= 0:
        return failed(DECODE_ERROR, f"header declares an empty image {w0}x{h0}")

    # 2. Size checks from the header, before any pixel is allocated. Pixel count and short side do
    # not depend on rotation; the reported size does, so read the orientation without loading.
    if w0 * h0 > max_pixels or min(w0, h0) < min_side:
        ow, oh = _oriented_size(w0, h0, _orientation(im, allow_load=False))
        if w0 * h0 > max_pixels:
            return failed(TOO_LARGE, f"{w0}x{h0} = {w0 * h0} pixels exceeds max_pixels={max_pixels}", ow, oh)
        return failed(TOO_SMALL, f"short side {min(w0, h0)} px is below min_side={min_side}", ow, oh)

    # 3. Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller: several
    # times faster and smaller for camera photos. draft() never goes below the requested size, and
    # the box it returns keeps the geometry exact in the resize below (as Image.thumbnail does).
    target = resize_max_side(w0, h0, max_side)
    box = None
    if im.format in ("JPEG", "MPO") and (target[0] * 2 <= w0 and target[1] * 2 <= h0):
        drafted = im.draft(None, target)
        if drafted is not None:
            box = drafted[1]

    # 4. Decode pixels (first frame of multi-frame files: Image.open is positioned on frame 0).
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001
        if _is_truncation(exc, data):
            ow, oh = _oriented_size(w0, h0, _orientation(im, allow_load=False))
            return failed(TRUNCATED, f"file is truncated: {exc}", ow, oh)
        raise
    orientation = _orientation(im, allow_load=True)
    ow, oh = _oriented_size(w0, h0, orientation)

    # 5. Colour conversion at (drafted) full size, before resizing, so alpha is composited and
    # high bit depths are scaled on true pixel values rather than on interpolated ones.
    rgb = _to_rgb(im)

    # 6. Resize in the stored orientation (resize_max_side is symmetric in w/h), then transpose the
    # small image, which is cheaper than transposing the full-size one.
    if box is not None or rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR, box=box)
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        rgb = rgb.transpose(method)

    array = np.array(rgb, dtype=np.uint8)  # a fresh, writable, C-contiguous copy
    if array.ndim != 3 or array.shape[2] != 3:
        return failed(DECODE_ERROR, f"unexpected decoded shape {array.shape}", ow, oh)
    return Decoded(array, ow, oh, OK, "")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to 8-bit RGB.

    Args:
        im: a loaded image.

    Returns:
        An RGB image of the same size.
    """
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        return _stretch_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # Retrieval models never saw alpha; flatten like a browser on a white page so transparent
        # regions become uniform background instead of whatever colour the hidden pixels hold.
        # convert("RGBA") also applies palette/colour-key transparency (info["transparency"]).
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    # "1", "L", "P", "CMYK", "YCbCr", "RGBX", "LAB", "HSV", ...: PIL's own conversions.
    return im.convert("RGB")


def _stretch_to_l(im: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float grayscale image to 8-bit by its actual value range.

    PIL's convert("L") clips these modes at 255, which turns most 16-bit images white; stretching
    min..max to 0..255 keeps the visible structure. A constant image becomes black.

    Args:
        im: a loaded image in mode I, I;16* or F.

    Returns:
        An L image.
    """
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return Image.fromarray(np.zeros(a.shape, dtype=np.uint8))
    lo = float(a[finite].min())
    hi = float(a[finite].max())
    a = np.where(finite, a, lo)  # NaN/inf in float images become the darkest value
    if hi > lo:
        a = np.floor((a - lo) * (255.0 / (hi - lo)) + 0.5)
    else:
        a = np.zeros_like(a)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _orientation(im: Image.Image, *, allow_load: bool) -> int:
    """EXIF orientation (1..8) of an opened image; 1 when absent or unreadable.

    Args:
        im: an opened image.
        allow_load: whether reading may decode pixels. PNG keeps EXIF after the pixel data, so its
            getexif() loads the image; before the size checks we use the base implementation, which
            only looks at what the header parse already found.

    Returns:
        The orientation value.
    """
    try:
        exif = im.getexif() if allow_load else Image.Image.getexif(im)
        value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not reject good pixels
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented_size(w: int, h: int, orientation: int) -> tuple[int, int]:
    """Size after applying an EXIF orientation.

    Args:
        w: stored width.
        h: stored height.
        orientation: EXIF orientation 1..8.

    Returns:
        (width, height) as displayed.
    """
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


# File signatures of formats whose end we can recognise, to tell "cut short" from "corrupt".
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
}


def _sniff(data: bytes) -> str | None:
    """Name of the format announced by the first bytes, for the formats in _SIGNATURES and WebP.

    Args:
        data: file bytes.

    Returns:
        "JPEG", "PNG", "GIF", "WEBP" or None.
    """
    for sig, name in _SIGNATURES.items():
        if data.startswith(sig):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _lacks_end(data: bytes) -> bool:
    """Whether a file of a recognised format is missing its end (marker or declared length).

    Args:
        data: file bytes.

    Returns:
        True when the format is recognised and its end is missing.
    """
    kind = _sniff(data)
    tail = data.rstrip(b"\x00\r\n ")  # some writers pad after the end marker
    if kind == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if kind == "PNG":
        return b"IEND" not in data[-32:]
    if kind == "GIF":
        return not tail.endswith(b";")
    if kind == "WEBP":
        return len(data) < 8 or len(data) < int.from_bytes(data[4:8], "little") + 8
    return False


def _is_truncation(exc: BaseException, data: bytes) -> bool:
    """Whether a pixel-decoding error means the file was cut short.

    We never set ImageFile.LOAD_TRUNCATED_IMAGES (a process-wide switch that would silently pad
    broken files with grey); PIL then reports truncation in the messages matched below. Decoders
    that give vaguer errors (WebP's "could not create decoder object") are judged by the file end.

    Args:
        exc: the exception from Image.load.
        data: file bytes.

    Returns:
        True for truncation.
    """
    if isinstance(exc, EOFError):
        return True
    if "truncated" in str(exc).lower():
        return True
    return _lacks_end(data)


def _classify_open_failure(data: bytes, exc: BaseException) -> Decoded:
    """Turn an Image.open failure into not_image, truncated or decode_error.

    Args:
        data: file bytes.
        exc: what Image.open raised.

    Returns:
        The failed Decoded.
    """
    kind = _sniff(data)
    if kind is None:
        # No allowed format recognised the bytes (or a weak-signature parser choked on text).
        reason = "cannot identify image file" if isinstance(exc, Image.UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        return failed(NOT_IMAGE, f"not a recognised image ({reason})")
    if _lacks_end(data) or "truncated" in str(exc).lower():
        return failed(TRUNCATED, f"{kind} file is truncated inside its header ({len(data)} bytes)")
    return failed(DECODE_ERROR, f"{kind} header could not be parsed: {type(exc).__name__}: {exc}")
