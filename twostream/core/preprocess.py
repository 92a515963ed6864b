"""Safe decoding of uploaded image bytes to RGB pixels.

Accepts JPEG, PNG, WebP, GIF (first frame), BMP and TIFF. Grayscale, palette, CMYK, alpha
(composited on white) and 16-bit images become 8-bit RGB; EXIF orientation is applied. The
file size and pixel count are checked before any pixel is decoded, so a decompression bomb is
refused cheaply. ``limits.max_pixels`` is the one pixel limit: Pillow's own
``Image.MAX_IMAGE_PIXELS`` (a warning above 89M pixels, an error above twice that) is switched off
when this module is imported, so Pillow neither warns nor refuses an image our limit accepts.
Every failure is an :class:`ImageDecodeError` whose message says why.

Uploads are bytes: nothing here decompresses them. Data whose magic bytes say it is compressed
(gzip, bzip2, zstd, xz, lz4, zip) is refused by that name (``gzip-compressed data, not an
image``), whatever its file name says; brotli has no magic bytes and is ``not a recognised image
format``. Multi-frame images are scored by their frame 0: a GIF's, WebP's or MPO's first frame,
a TIFF's first page, an APNG's default image (its ``IDAT`` image, which Pillow 13 makes frame 0
even when the animation does not show it). A PNG whose text chunks (``tEXt``/``zTXt``/``iTXt``)
exceed Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` or ``MAX_TEXT_MEMORY`` is scored on its pixels,
decoded again with its text chunks left out: metadata is not pixels, and the limits stay in
force, so a text bomb costs no memory either.

**Reduced-size decoding.** Given the input geometry of the streams the pixels are for (their
:class:`~twostream.core.models.InputSpec`), a JPEG is decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling, Pillow's ``draft``) as far as every stream's resize still shrinks each
side of the decoded image by at least ``limits.reduced_decode`` (:func:`jpeg_scale`); the
streams' antialiased resize then does the rest. With the default 2, a 4000x3000 photograph
feeding a 224x224 crop of its 256-px shorter side is decoded at 1000x750; a 768x512 one is not
reduced. The header checks (size, format, pixel count) are made on the full size first, and EXIF
orientation is applied to the reduced image. Without streams, or with ``reduced_decode`` 0,
every image is decoded at full size, bit for bit as before.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from twostream.core.config import LimitsConfig
from twostream.core.models.stream import InputSpec, resized_size
from twostream.storage import compressed_kind

# limits.max_pixels, checked in _open_checked before any pixel is decoded, replaces Pillow's limit.
Image.MAX_IMAGE_PIXELS = None

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
JPEG_SCALES = (8, 4, 2)  # libjpeg's DCT scaling: 1/8, 1/4, 1/2 of each side, tried largest first
EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap the axes (transpose, rotations by 90)
_HIGH_BIT_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message is the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _HIGH_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        full_scale = _HIGH_BIT_MODES.get(mode) or max(float(values.max()), 1.0)
        if mode == "F" and values.max() <= 1.0:
            full_scale = 1.0
        gray = np.clip(np.rint(values / full_scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # uint8 (H, W): mode L
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


STRIP_ROWS = 256  # rows of a large image handled at a time: copied out of Pillow here, made float in prepare


def pixel_rows(image: Image.Image, top: int, stop: int) -> np.ndarray:
    """Rows ``[top, stop)`` of an RGB Pillow image as an (rows, W, 3) uint8 array. Copying a large
    image's pixels out a strip at a time keeps its peak low: ``np.asarray`` of a whole image goes
    through ``tobytes``, which holds two more copies at once (a 6000x6000 upload: 216 MB on top
    of Pillow's 144 MB)."""
    return np.asarray(image if (top, stop) == (0, image.height) else image.crop((0, top, image.width, stop)))


def _pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels, (H, W, 3) uint8, copied out :data:`STRIP_ROWS` rows at a time."""
    width, height = image.size
    if height <= STRIP_ROWS:
        return pixel_rows(image, 0, height)
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, STRIP_ROWS):
        pixels[top : top + STRIP_ROWS] = pixel_rows(image, top, min(height, top + STRIP_ROWS))
    return pixels


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _over_text_limit(exc: BaseException) -> bool:
    """Whether Pillow refused a PNG for its text chunks (``MAX_TEXT_CHUNK``/``MAX_TEXT_MEMORY``)."""
    return isinstance(exc, ValueError) and "MAX_TEXT_" in str(exc)


def without_png_text(data: bytes) -> bytes:
    """A PNG's bytes with its text chunks (``tEXt``, ``zTXt``, ``iTXt``) left out, every other
    chunk as it was (each chunk carries its own CRC; APNG sequence numbers are in ``fcTL`` and
    ``fdAT`` only). Bytes that are not a well-formed chunk sequence are kept as they are from
    there on, for Pillow to judge."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    out, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        if data[pos + 4 : pos + 8] not in _PNG_TEXT_CHUNKS:
            out.append(data[pos:end])
        pos = end
    out.append(data[pos:])
    return b"".join(out)


def _open_checked(data: bytes, limits: LimitsConfig) -> Image.Image:
    """Open lazily and check size, format and pixel count; no pixel is decoded yet."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"file too large: {len(data)} bytes > limit {limits.max_bytes}")
    kind = compressed_kind(data)
    if kind is not None:
        raise ImageDecodeError(f"{kind}-compressed data, not an image (uploads are read as stored, never "
                               "decompressed)")
    image = Image.open(io.BytesIO(data))
    if image.format not in ALLOWED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"too many pixels: {width}x{height} = {width * height} > limit "
            f"{limits.max_pixels} (decompression bomb?)"
        )
    return image


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Every failure while opening or decoding becomes an :class:`ImageDecodeError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"too many pixels (decompression bomb refused): {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def jpeg_scale(height: int, width: int, streams: Sequence[InputSpec], margin: float) -> int:
    """The DCT scaling ``s`` (1, 2, 4 or 8) at which a ``height`` x ``width`` JPEG (as displayed,
    EXIF orientation applied) is decoded: the largest for which the decoded size
    ``ceil(height / s)`` x ``ceil(width / s)`` is still at least ``margin`` times the size each
    of ``streams`` resizes the full image to (:func:`~twostream.core.models.stream.resized_size`,
    before any crop), side by side. 1 (full size) for no streams or ``margin`` 0."""
    if not streams or margin <= 0:
        return 1
    targets = [resized_size(height, width, spec) for spec in streams]
    need_h, need_w = margin * max(h for h, _ in targets), margin * max(w for _, w in targets)
    for s in JPEG_SCALES:
        if -(-height // s) >= need_h and -(-width // s) >= need_w:
            return s
    return 1


def _reduce(image: Image.Image, streams: Sequence[InputSpec], margin: float) -> None:
    """Set a JPEG, opened and not yet decoded, to be decoded at :func:`jpeg_scale`'s size."""
    if image.format not in ("JPEG", "MPO") or not streams or margin <= 0:
        return
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION, 1) in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    s = jpeg_scale(height, width, streams, margin)
    if s > 1:  # Pillow picks the largest of 8, 4, 2 that keeps at least the size asked: s here
        image.draft(None, (image.width // s, image.height // s))


def _decode_checked(data: bytes, limits: LimitsConfig, streams: Sequence[InputSpec] = ()) -> Image.Image:
    image = _open_checked(data, limits)
    image.seek(0)
    _reduce(image, streams, limits.reduced_decode)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a large image
    return _to_rgb(image)


def _text_tolerant(step, data: bytes, limits: LimitsConfig) -> Image.Image:
    """``step(data, limits)``; a PNG that Pillow refuses for its text chunks is tried again
    without them (:func:`without_png_text`)."""
    try:
        return step(data, limits)
    except ValueError as exc:
        if not _over_text_limit(exc):
            raise
    return step(without_png_text(data), limits)


def decode_rgb(data: bytes, limits: LimitsConfig | None = None, streams: Sequence[InputSpec] = ()) -> Image.Image:
    """Decode image bytes to an RGB Pillow image (checked, oriented, converted), or raise
    :class:`ImageDecodeError`. Its pixels: :func:`pixel_rows`; as one array: :func:`decode_image`.
    Frame 0 of a multi-frame image (see the module docstring). ``streams``: the input geometry of
    the streams the pixels are for (``scoring.stream_specs``); a large JPEG is then decoded
    reduced as ``limits.reduced_decode`` allows (module docstring); none: full size."""
    with _decode_errors():
        return _text_tolerant(lambda d, lim: _decode_checked(d, lim, streams), data, limits or LimitsConfig())


def decode_image(data: bytes, limits: LimitsConfig | None = None, streams: Sequence[InputSpec] = ()) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array (:func:`decode_rgb`), or raise
    :class:`ImageDecodeError`."""
    image = decode_rgb(data, limits, streams)
    with _decode_errors():
        return _pixels(image)


def check_image_header(data: bytes, limits: LimitsConfig | None = None) -> Image.Image:
    """The checks :func:`decode_image` makes before decoding any pixel (size, format, pixel
    count), cheaply; raises :class:`ImageDecodeError`, else returns the image opened lazily (its
    header read, no pixel decoded). A file that passes can still turn out truncated or corrupt
    when decoded."""
    with _decode_errors():
        return _text_tolerant(_open_checked, data, limits or LimitsConfig())


def check_min_side(height: int, width: int, limits: LimitsConfig) -> None:
    """Raise :class:`ImageDecodeError` for a decoded image narrower or lower than
    ``limits.min_side`` (nothing to classify)."""
    if min(height, width) < limits.min_side:
        raise ImageDecodeError(f"image too small: {width}x{height} px (limits.min_side = {limits.min_side})")


def to_tensor01(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 RGB array, or (3, H, W) uint8 tensor on any device -> (1, 3, H, W)
    float32 tensor in [0, 1] (on the tensor's device)."""
    if isinstance(image, torch.Tensor):
        return image[None].float().div_(255.0)
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # torch wants writable memory; float() copies anyway
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)


def from_tensor01(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> (H, W, 3) uint8 RGB (rounded)."""
    x = x.detach()
    if x.dim() == 4:
        x = x[0]
    return x.clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
