"""The device decoder (twostream.core.device_decode) against the CPU decoder (Pillow), the
reference: on the CPU device both decode with libjpeg-turbo, so the pixels are equal bit for bit;
on CUDA (nvJPEG, the tests marked ``cuda``) they agree to a level or two."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from twostream.core.config import LimitsConfig
from twostream.core.device_decode import JpegHeader, _batches, decode_on_device, jpeg_header
from twostream.core.models import InputSpec
from twostream.core.scoring import STRIP_ROWS, decode_many, prepare

LIMITS = LimitsConfig()
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.sh runs these)")


def picture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with no symmetry (so every orientation differs)."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(tile).resize((width, height), Image.BILINEAR)).copy()
    image[:4, :6] = 255  # a marked corner
    return image


def encode(image: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", orientation: int | None = None, **options) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image).convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    pil.save(buf, fmt, **options)
    return buf.getvalue()


def as_array(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def decode_both(items: list[bytes], limits: LimitsConfig = LIMITS, device: str = "cpu", **kwargs):
    """(device decoder's arrays, errors), (CPU decoder's arrays, errors)."""
    images, errors = decode_on_device(items, limits, device, **kwargs)
    return ([None if i is None else as_array(i) for i in images], errors), decode_many(items, limits)


JPEG_KINDS = {
    "4:4:4": dict(quality=90, subsampling=0),
    "4:2:0": dict(quality=75, subsampling=2),
    "progressive": dict(quality=85, progressive=True),
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_jpegs_decode_as_pillow_does(kind: str) -> None:
    items = [encode(picture(seed=s), **JPEG_KINDS[kind]) for s in range(3)]
    (images, errors), (expected, expected_errors) = decode_both(items)
    assert errors == expected_errors == [None] * 3
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want)


def test_grayscale_jpeg_becomes_rgb_as_pillow_makes_it() -> None:
    (images, _), (expected, _) = decode_both([encode(picture(), mode="L")])
    assert images[0].shape == (48, 64, 3)
    np.testing.assert_array_equal(images[0], expected[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_applies_it(orientation: int) -> None:
    data = encode(picture(), orientation=orientation, quality=95)
    header = jpeg_header(data, LIMITS)
    assert header == JpegHeader(64, 48, orientation) if orientation >= 5 else JpegHeader(48, 64, orientation)
    (images, _), (expected, _) = decode_both([data])
    np.testing.assert_array_equal(images[0], expected[0])


def test_other_formats_and_cmyk_go_to_the_cpu_decoder() -> None:
    items = [encode(picture(), "PNG"), encode(picture(), mode="CMYK"), encode(picture(), "WEBP", quality=90)]
    assert [jpeg_header(d, LIMITS) for d in items] == [None, None, None]
    (images, errors), (expected, expected_errors) = decode_both(items)
    assert errors == expected_errors == [None] * 3
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_jpeg_fails_alone_with_the_cpu_decoders_reason() -> None:
    good = [encode(picture(seed=s)) for s in range(3)]
    damaged = good[0][: len(good[0]) // 2]  # truncated in its scan
    garbage = b"\xff\xd8\xff\xe0" + bytes(200)  # a JPEG start, then nothing decodable
    items = [good[0], damaged, good[1], garbage, good[2]]
    (images, errors), (expected, expected_errors) = decode_both(items)
    assert errors == expected_errors
    assert errors[0] is errors[2] is errors[4] is None
    assert errors[1] and errors[3]
    for k in (0, 2, 4):
        np.testing.assert_array_equal(images[k], expected[k])
    assert images[1] is None and images[3] is None


def test_header_refusals_and_small_images_give_the_cpu_decoders_reasons() -> None:
    limits = LimitsConfig(max_pixels=100 * 100, min_side=16)
    items = [b"", encode(picture(120, 120)), b"GIF89a" + bytes(20), encode(picture(8, 64)), b"not an image",
             encode(picture(32, 32))]
    (images, errors), (_, expected_errors) = decode_both(items, limits)
    assert errors == expected_errors
    assert "0 bytes" in errors[0] and "too many pixels" in errors[1] and "too small: 64x8" in errors[3]
    assert [e is None for e in errors] == [False] * 5 + [True]
    assert images[5].shape == (32, 32, 3)


def test_device_calls_are_bounded_by_decoded_bytes() -> None:
    headers = {0: JpegHeader(10, 10, 1), 2: JpegHeader(10, 20, 1), 3: JpegHeader(20, 20, 1), 5: JpegHeader(5, 5, 1)}
    # bytes 300, 600, 1200, 75 with a bound of 1000: [0, 2] (900), [3] alone (over the bound), [5]
    assert _batches(headers, 1000) == [[0, 2], [3], [5]]
    assert _batches(headers, 10**6) == [[0, 2, 3, 5]]
    items = [encode(picture(seed=s)) for s in range(4)]
    (one_by_one, _), (expected, _) = decode_both(items, batch_bytes=1)
    for got, want in zip(one_by_one, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("height", [40, STRIP_ROWS * 2 + 7])
def test_prepare_takes_device_images_as_it_takes_arrays(height: int) -> None:
    """The same prepared input from a (3, H, W) tensor as from the (H, W, 3) array (tall images
    go through the strip path)."""
    image = picture(height, 50)
    high = InputSpec(size=(24, 24), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, interpolation="bicubic")
    low = InputSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, squash=True)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    for spec in (high, low):
        torch.testing.assert_close(prepare(spec, [tensor, tensor]), prepare(spec, [image, image]), rtol=0, atol=0)


@CUDA
@pytest.mark.cuda
def test_cuda_decode_agrees_with_pillow() -> None:
    items = [encode(picture(96, 128, seed=s), **JPEG_KINDS[k]) for s, k in enumerate(JPEG_KINDS)]
    items += [encode(picture(), orientation=o) for o in (3, 6, 8)] + [encode(picture(), "PNG"), b"junk"]
    images, errors = decode_on_device(items, LIMITS, "cuda")
    expected, expected_errors = decode_many(items, LIMITS)
    assert errors == expected_errors
    for got, want in zip(images, expected):
        if want is None:
            assert got is None
            continue
        assert got.device.type == "cuda"
        diff = np.abs(as_array(got).astype(int) - want.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())  # nvJPEG's IDCT and upsampling


@CUDA
@pytest.mark.cuda
def test_cuda_prepare_agrees_with_cpu() -> None:
    image = picture(STRIP_ROWS * 2 + 7, 300)
    spec = InputSpec(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, interpolation="bicubic")
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(prepare(spec, [tensor.cuda()]).cpu(), prepare(spec, [image]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("orientation", [0, 9, 300])
def test_an_exif_orientation_out_of_range_is_ignored_as_pillow_ignores_it(orientation: int) -> None:
    data = encode(picture(), orientation=orientation, quality=95)
    assert jpeg_header(data, LIMITS) == JpegHeader(48, 64, 1)
    (images, errors), (expected, expected_errors) = decode_both([data])
    assert errors == expected_errors == [None]
    np.testing.assert_array_equal(images[0], expected[0])


def test_the_device_decodes_large_jpegs_at_full_size_and_its_fallback_reduces_as_the_cpu() -> None:
    """The documented difference (module docstring): the device has no DCT scaling, so a JPEG that
    the CPU decoder reduces (2048x1536 -> 1024x768 for these streams) comes off the device at full
    size, equal to the CPU decoder's with reduced decoding off; a CMYK one, which goes to the CPU
    decoder, is reduced exactly as ``decode_many`` reduces it."""
    streams = (InputSpec((224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=0.875, interpolation="bicubic"),
               InputSpec((32, 32), (0.5,) * 3, (0.5,) * 3, squash=True))
    large = picture(1536, 2048)
    items = [encode(large), encode(large, mode="CMYK")]
    images, errors = decode_on_device(items, LIMITS, "cpu", streams=streams)
    assert errors == [None, None]
    full, _ = decode_many(items[:1], LimitsConfig(reduced_decode=0), streams)
    reduced, _ = decode_many(items, LIMITS, streams)
    assert as_array(images[0]).shape == (1536, 2048, 3) and reduced[0].shape == (768, 1024, 3)
    np.testing.assert_array_equal(as_array(images[0]), full[0])
    np.testing.assert_array_equal(as_array(images[1]), reduced[1])
