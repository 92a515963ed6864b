"""Reduced-size JPEG decoding (``limits.reduced_decode``, ``preprocess.jpeg_scale``): which scale a
JPEG is decoded at, from the streams' geometry; how close its pixels are to a full decode brought
down by a box filter; bit-identical decoding where no reduction applies; orientation, CMYK,
grayscale and progressive JPEGs; the pixel limit on the full size.

The streams here are written out by hand (the default models' geometry: a 224x224 centre crop of
the image resized to a 256-px shorter side, bicubic; the whole image squashed to 32x32), so the
expected scales are worked out independently of the models' code."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import demo_photo
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from twostream.core.config import LimitsConfig, TwoStreamConfig
from twostream.core.models import InputSpec
from twostream.core.preprocess import ImageDecodeError, check_image_header, decode_image, jpeg_scale
from twostream.core.scoring import decode_many, prepare

MEAN = (0.5, 0.5, 0.5)
HIGH = InputSpec((224, 224), MEAN, MEAN, crop_pct=0.875, interpolation="bicubic")  # shorter side to 256
LOW = InputSpec((32, 32), MEAN, MEAN, squash=True)
STREAMS = (HIGH, LOW)
LIMITS = LimitsConfig()  # reduced_decode 2: every stream still shrinks each side at least 2x
OFF = LimitsConfig(reduced_decode=0)


def jpeg(pixels: np.ndarray, mode: str = "RGB", orientation: int | None = None, **options) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def photo(width: int, height: int, noise: int = 24, seed: int = 0) -> np.ndarray:
    """A shipped photograph brought to ``width`` x ``height`` with uniform noise of +-``noise``
    levels (fine detail a camera's 12 megapixels carry and an upscaled photo lacks)."""
    pixels = demo_photo(0, (width, height)).astype(np.int16)
    pixels += np.random.default_rng(seed).integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width, margin, scale", [
    (3000, 4000, 2, 4),  # 750x1000 keeps 2x the 256-px shorter side; 375 would not
    (3000, 4000, 1, 8),  # 375 >= 256
    (3000, 4000, 4, 2),  # 1500 >= 4 * 256; 750 is not
    (512, 768, 2, 1),    # a Kodak photograph: 256 < 2 * 256 at 1/2
    (375, 500, 2, 1),    # the ImageNet sample's usual size
    (1023, 1364, 2, 2),  # ceil(1023 / 2) = 512 = 2 * 256: the smallest shorter side reduced
    (1022, 1363, 2, 1),  # 511 < 512
    (2000, 1000, 2, 1),  # portrait: the shorter side (1000) sets it, 500 < 512
    (40_000, 300, 2, 1),  # thin: never below the shorter side's need
    (3000, 4000, 0, 1),  # off
])
def test_scale_is_the_largest_that_keeps_the_margin(height, width, margin, scale):
    assert jpeg_scale(height, width, STREAMS, margin) == scale


def test_the_default_models_reduce_a_12_megapixel_photo_and_not_a_kodak_one():
    """The geometry of the default streams (EfficientNet-Lite0 at 224, ResNet-32 at 32) gives the
    hand-built one's scales."""
    from twostream.core.scoring import stream_specs

    specs = stream_specs(TwoStreamConfig())
    assert [jpeg_scale(h, w, specs, 2) for h, w in ((3000, 4000), (512, 768), (1023, 1364))] == [4, 1, 2]


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 20_000), st.integers(8, 20_000), st.sampled_from([0, 1, 1.5, 2, 3, 4, 8]),
       st.sampled_from([(HIGH,), (LOW,), STREAMS, (InputSpec((64, 256), MEAN, MEAN, squash=True), HIGH)]))
def test_scale_keeps_every_stream_above_the_margin(height, width, margin, streams):
    """The decoded size ceil(side / s) is at least margin x each stream's resize of the full image
    (shorter side to floor(224 / 0.875) = 256, the other in proportion, truncated; or squashed),
    and the next scale up would break that (or there is none)."""
    def target(spec: InputSpec) -> tuple[int, int]:
        if spec.squash:
            return spec.size
        short = math.floor(spec.size[0] / spec.crop_pct)
        return (short, int(short * width / height)) if height <= width else (int(short * height / width), short)

    def keeps(s: int) -> bool:
        return all(math.ceil(height / s) >= margin * target(spec)[0]
                   and math.ceil(width / s) >= margin * target(spec)[1] for spec in streams)

    s = jpeg_scale(height, width, streams, margin)
    assert s in (1, 2, 4, 8)
    if margin == 0:
        assert s == 1
        return
    assert s == 1 or keeps(s)
    assert s == 8 or not any(keeps(t) for t in (2, 4, 8) if t > s)


JPEG_KINDS = {
    "4:2:0": dict(subsampling=2),
    "4:4:4": dict(subsampling=0),
    "progressive": dict(progressive=True),
    "gray": dict(mode="L"),
    "cmyk": dict(mode="CMYK"),
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_a_large_jpeg_decodes_reduced_close_to_a_full_decode_brought_down(kind):
    """2048x1536 -> 1024x768 (1/2: 768 >= 2 x 256, 384 is not). libjpeg's scaled IDCT makes each
    output pixel from the 8x8 block's lowest 4x4 frequencies, with chroma upsampled at the reduced
    size: the mean of each 2x2 box up to the block's discarded fine detail, so single pixels of a
    noisy photo differ from a box-filtered full decode by up to about 20 levels (22 measured) while
    on average by under 2 (1.7). The streams' own antialiased resize then averages at least 2x2 of
    the reduced pixels per input pixel: what they see moves by at most 6 levels (3.8 measured,
    4:4:4), 1 on average (0.54)."""
    options = dict(JPEG_KINDS[kind])
    mode = options.pop("mode", "RGB")
    data = jpeg(photo(2048, 1536), mode, **options)
    full = decode_image(data, LIMITS)  # no streams: full size
    reduced = decode_image(data, LIMITS, STREAMS)
    assert full.shape == (1536, 2048, 3) and reduced.shape == (768, 1024, 3)
    box = np.asarray(Image.fromarray(full).reduce(2)).astype(np.int16)
    diff = np.abs(reduced.astype(np.int16) - box)
    assert diff.mean() <= 2.0 and np.percentile(diff, 99.9) <= 16 and diff.max() <= 32, (diff.mean(), diff.max())
    for spec in STREAMS:
        seen = (prepare(spec, [reduced]) - prepare(spec, [full])).abs() * 255
        assert seen.max() <= 6.0 and seen.mean() <= 1.0, (spec.size, float(seen.max()), float(seen.mean()))


@pytest.mark.parametrize("size", [(1363, 1022), (768, 512), (512, 768), (4000, 300)])
def test_a_jpeg_at_or_below_the_threshold_decodes_bit_identically(size):
    """No reduction applies (1022 rows: 511 < 512 at 1/2): the same array as a decode without
    streams and with reduced decoding off, bit for bit."""
    data = jpeg(photo(*size, noise=8))
    want = decode_image(data, OFF)
    assert want.shape == (size[1], size[0], 3)
    assert np.array_equal(decode_image(data, LIMITS, STREAMS), want)
    assert np.array_equal(decode_image(data, LIMITS), want)


def test_reduced_decoding_off_decodes_a_large_jpeg_at_full_size():
    data = jpeg(photo(2048, 1536, noise=0))
    assert np.array_equal(decode_image(data, OFF, STREAMS), decode_image(data, LIMITS))
    images, errors = decode_many([data], OFF, STREAMS)
    assert errors == [None] and images[0].shape == (1536, 2048, 3)


# Pillow's exif_transpose on an (H, W, 3) array: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
# 6 rotate clockwise 90, 7 transverse, 8 rotate anticlockwise 90.
ORIENTED = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_to_the_reduced_image(orientation):
    """The same stored pixels with each EXIF orientation: the reduced decode is the stored image's
    reduced decode, oriented (bit for bit; these streams' needs do not depend on the axes)."""
    pixels = photo(1600, 1200, noise=8)
    stored = decode_image(jpeg(pixels), LIMITS, STREAMS)
    assert stored.shape == (600, 800, 3)
    got = decode_image(jpeg(pixels, orientation=orientation), LIMITS, STREAMS)
    assert np.array_equal(got, ORIENTED[orientation](stored))


def test_the_scale_is_chosen_on_the_displayed_axes():
    """A stream that needs a wide image (squashed to 64x256, so 128x512 at margin 2): stored
    600x2200 (tall), displayed 2200x600 (wide) after orientation 6; 1/4 keeps 150x550. Read on
    the stored axes it could not be reduced at all (600 / 2 < 512)."""
    wide = (InputSpec((64, 256), MEAN, MEAN, squash=True),)
    data = jpeg(photo(600, 2200, noise=8), orientation=6)
    got = decode_image(data, LIMITS, wide)
    assert got.shape == (150, 550, 3)
    full = decode_image(data, LIMITS)
    assert full.shape == (600, 2200, 3)
    box = np.asarray(Image.fromarray(full).reduce(4)).astype(np.int16)
    assert np.abs(got.astype(np.int16) - box).mean() <= 2.0


def test_the_pixel_limit_is_checked_on_the_full_size():
    """A 2048x1536 JPEG that would decode to 1024x768 is still refused by a limit between the two,
    before any pixel is decoded, naming its full size."""
    data = jpeg(photo(2048, 1536, noise=0))
    limits = LimitsConfig(max_pixels=2048 * 1536 - 1)
    for decode in (lambda: decode_image(data, limits, STREAMS), lambda: check_image_header(data, limits)):
        with pytest.raises(ImageDecodeError, match=r"too many pixels: 2048x1536 = 3145728 > limit 3145727"):
            decode()
    assert decode_image(data, LimitsConfig(max_pixels=2048 * 1536), STREAMS).shape == (768, 1024, 3)


def test_a_margin_below_one_is_refused():
    with pytest.raises(ValueError, match="reduced_decode must be 0 \\(off\\) or at least 1"):
        LimitsConfig(reduced_decode=0.5)


def test_an_mpo_is_scored_by_its_frame_0_reduced_as_that_jpeg_alone():
    first, second = photo(2048, 1536, noise=8), photo(2048, 1536, noise=8, seed=1)[::-1].copy()
    mpo, alone = io.BytesIO(), io.BytesIO()
    Image.fromarray(first).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(second)], quality=90)
    Image.fromarray(first).save(alone, "JPEG", quality=90)
    got = decode_image(mpo.getvalue(), LIMITS, STREAMS)
    assert got.shape == (768, 1024, 3)
    assert np.array_equal(got, decode_image(alone.getvalue(), LIMITS, STREAMS))
