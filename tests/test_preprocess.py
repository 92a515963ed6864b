"""Safe decoding: formats, modes, EXIF orientation, limits and corrupt input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from twostream.core.config import LimitsConfig
from twostream.core.preprocess import (
    STRIP_ROWS,
    ImageDecodeError,
    check_image_header,
    decode_image,
    from_tensor01,
    to_tensor01,
)

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_round_trip_exactly(fmt, kw):
    assert np.array_equal(decode_image(encode(Image.fromarray(PIXELS), fmt, **kw)), PIXELS)


def test_tall_images_copied_out_in_strips_keep_every_row():
    """Over STRIP_ROWS rows the pixels leave Pillow a strip at a time: every row, in order,
    including a last partial strip; grayscale converted strip by strip too."""
    rows = 2 * STRIP_ROWS + 37
    pixels = RNG.integers(0, 256, size=(rows, 9, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(Image.fromarray(pixels), "PNG")), pixels)
    gray = RNG.integers(0, 256, size=(rows, 5), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_jpeg_is_close_and_gif_takes_the_first_frame():
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (32, 1, 3))
    decoded = decode_image(encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert decoded.shape == smooth.shape and np.abs(decoded.astype(int) - smooth).max() < 12
    frames = [Image.new("P", (4, 4), color) for color in (1, 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue())[0, 0].tolist() == [255, 0, 0]


def test_grayscale_palette_and_cmyk_become_rgb():
    gray = RNG.integers(0, 256, size=(5, 6), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert decode_image(encode(pal, "PNG"))[1, 1].tolist() == [10, 20, 30]
    # CMYK (0, 0, 0, 0) is white and (0, 255, 255, 0) is red in PIL's naive conversion.
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert decode_image(encode(cmyk, "JPEG", quality=100))[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]
    assert out[1, 0].tolist() == pytest.approx([127, 127, 127], abs=1)


def test_16_bit_grayscale_is_scaled_to_8_bit():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128.5 * 257
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    # 12 rows x 17 columns: a dark left part and a bright right part, smooth enough for JPEG.
    pixels = np.zeros((12, 17, 3), dtype=np.uint8)
    pixels[:, 9:] = 240
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=100))
    assert out.shape == (17, 12, 3)
    expected = np.rot90(pixels, k=-1)  # clockwise: the bright part ends at the bottom
    assert np.abs(out.astype(int) - expected).mean() < 10


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (its data is one empty row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, limits, reason",
    [
        (b"", None, "empty"),
        (b"hello, not an image", None, "not a recognised image"),
        (forged_png(100_000, 100_000), None, "too many pixels"),  # refused by PIL's own guard
        (forged_png(7_000, 7_000), None, "too many pixels"),  # 49M > our 40M default
        (encode(Image.fromarray(PIXELS), "PNG"), LimitsConfig(max_pixels=100), "too many pixels"),
        (encode(Image.fromarray(PIXELS), "PNG"), LimitsConfig(max_bytes=10), "too large"),
        (encode(Image.fromarray(PIXELS), "PNG")[:60], None, "corrupt or truncated"),
        (encode(Image.fromarray(PIXELS), "JPEG")[:300], None, "corrupt or truncated"),
        (encode(Image.fromarray(PIXELS), "PPM"), None, "unsupported image format PPM"),
    ],
)
def test_bad_input_is_a_clear_error(data, limits, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, limits)
    if reason == "corrupt or truncated":  # found by the header check if the cut is in the header
        try:
            check_image_header(data, limits)
        except ImageDecodeError as exc:
            assert reason in str(exc)
    else:  # refused before any pixel is decoded, with the same reason
        with pytest.raises(ImageDecodeError, match=reason):
            check_image_header(data, limits)


def test_header_check_accepts_what_decodes():
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        data = encode(Image.fromarray(PIXELS), fmt)
        check_image_header(data)
        assert decode_image(data).shape == PIXELS.shape


def test_tensor_conversion_round_trips():
    x = to_tensor01(PIXELS)
    assert x.shape == (1, 3, 12, 17) and float(x.max()) <= 1.0
    assert np.array_equal(from_tensor01(x), PIXELS)
