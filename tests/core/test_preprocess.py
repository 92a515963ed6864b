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


# --- frames, text metadata and compressed data (issue 29) ---------------------------------------
def test_multi_frame_images_are_scored_by_frame_0():
    """A GIF's and an animated WebP's first frame, and an APNG's
    default image: Pillow 13 makes an APNG's IDAT image frame 0 also when the animation does not
    show it (``default_image``), so that image, not the animation, is the one scored."""
    red, blue, green = (Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    hidden = encode(red, "PNG", save_all=True, append_images=[blue, green], default_image=True)
    shown = encode(blue, "PNG", save_all=True, append_images=[green])
    opened = Image.open(io.BytesIO(hidden))
    assert (opened.n_frames, opened.default_image) == (3, True)  # the default image counts as a frame
    assert tuple(decode_image(hidden)[0, 0]) == (255, 0, 0)  # the hidden default image, not the animation
    assert tuple(decode_image(shown)[0, 0]) == (0, 0, 255)  # the animation's first frame is its IDAT
    for fmt, kw in (("GIF", {}), ("WEBP", {"lossless": True})):
        data = encode(blue, fmt, save_all=True, append_images=[green, red], **kw)
        assert Image.open(io.BytesIO(data)).n_frames == 3, fmt
        assert tuple(decode_image(data)[0, 0]) == (0, 0, 255), fmt


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_text(png: bytes, chunks: list[bytes]) -> bytes:
    """``png`` with ``chunks`` placed after IHDR (before the pixels) and before IEND."""
    ihdr_end = 8 + 25
    half = len(chunks) // 2
    return png[:ihdr_end] + b"".join(chunks[:half]) + png[ihdr_end:-12] + b"".join(chunks[half:]) + png[-12:]


@pytest.mark.parametrize("case", ["one zTXt over MAX_TEXT_CHUNK", "zTXt over MAX_TEXT_MEMORY", "iTXt over MAX_TEXT_CHUNK"])
def test_png_with_much_text_metadata_is_scored_on_its_pixels(case):
    """Text chunks over Pillow's limits: Pillow refuses the file (ValueError), we decode the
    same pixels as the file without its text; the endpoint's header check agrees."""
    from PIL import PngImagePlugin

    plain = encode(Image.fromarray(PIXELS), "PNG")
    mib = PngImagePlugin.MAX_TEXT_CHUNK
    if case == "one zTXt over MAX_TEXT_CHUNK":
        chunks = [_png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"x" * (2 * mib), 9))]
    elif case == "zTXt over MAX_TEXT_MEMORY":  # 70 chunks just under the per-chunk limit: 70 MiB of text
        body = zlib.compress(b"y" * (mib - 10), 9)
        chunks = [_png_chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + body) for i in range(70)]
    else:
        chunks = [_png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(b"<x/>" * mib, 9))]
    data = _with_text(plain, chunks)
    assert len(data) < 200_000  # a small file
    with pytest.raises(ValueError, match="MAX_TEXT_"):
        Image.open(io.BytesIO(data)).load()
    assert np.array_equal(decode_image(data), PIXELS)
    assert check_image_header(data).size == (17, 12)


@pytest.mark.parametrize(("make", "kind"), [
    (lambda d: __import__("gzip").compress(d), "gzip"), (lambda d: __import__("bz2").compress(d), "bzip2"),
    (lambda d: __import__("lzma").compress(d), "xz"), (lambda d: b"\x28\xb5\x2f\xfd" + d, "zstd"),
    (lambda d: b"\x04\x22\x4d\x18" + d, "lz4"), (lambda d: b"PK\x03\x04" + d, "zip"),
])
def test_compressed_data_is_named_not_decompressed(make, kind):
    png = encode(Image.fromarray(PIXELS), "PNG")
    for check in (decode_image, check_image_header):
        with pytest.raises(ImageDecodeError, match=f"^{kind}-compressed data, not an image \\(uploads are read as "
                                                   "stored, never decompressed\\)$"):
            check(make(png))
