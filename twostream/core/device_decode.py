"""JPEG decode on a stream's device: torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA).

Every upload first gets the checks :func:`~twostream.core.preprocess.decode_image` makes before
any pixel is decoded (size, format, pixel count, from the header). nvJPEG does not apply the
EXIF orientation, so it is applied here, as Pillow's ``exif_transpose`` does; an image under
``limits.min_side`` is a failure, as in :func:`~twostream.core.scoring.decode_many`.

What the device decoder does not take goes to the CPU decoder (``decode_image``): formats other
than JPEG, MPO, CMYK and YCCK JPEGs, and any JPEG the device refuses. A batch the device refuses
is decoded again one image at a time, so one damaged upload fails alone, with the CPU decoder's
reason, and its neighbours stay on the device. Images come back as (3, H, W) uint8 tensors on
the device, which :func:`~twostream.core.scoring.prepare` takes as it takes (H, W, 3) arrays.

The device decodes every JPEG it takes at full size: torchvision's ``decode_jpeg`` has no DCT
scaling, so the CPU decoder's reduced-size decoding (``limits.reduced_decode``) is not made
here, and a JPEG large enough to be reduced on the CPU is prepared from its full-size pixels (on
top of nvJPEG's own difference of a level or two). What goes to the CPU decoder is decoded as
the CPU path decodes it, reduced alike (``streams``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from twostream.core.config import LimitsConfig
from twostream.core.models import InputSpec
from twostream.core.preprocess import (
    EXIF_ORIENTATION,
    ImageDecodeError,
    check_image_header,
    check_min_side,
    decode_image,
)

DEVICE_MODES = frozenset({"RGB", "L"})  # JPEG colour modes the device decodes as Pillow does
BATCH_BYTES = 1 << 30  # decoded RGB bytes of one batched device call (one image may exceed it alone)


@dataclass(frozen=True)
class JpegHeader:
    """What the header of a JPEG the device takes says: its size once oriented, and the EXIF
    orientation (1 to 8, 1 = as stored)."""

    height: int
    width: int
    orientation: int


def jpeg_header(data: bytes, limits: LimitsConfig) -> JpegHeader | None:
    """The header of an upload the device decoder takes, or None for one the CPU decoder takes.

    Raises :class:`ImageDecodeError` for an upload the CPU decoder would refuse before decoding
    (empty, too large, unsupported format, too many pixels), with the same reason."""
    image = check_image_header(data, limits)
    try:
        if image.format != "JPEG" or image.mode not in DEVICE_MODES:
            return None
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, EOFError, TypeError):
        return None  # a header Pillow cannot read further: the CPU decoder gives the reason
    if orientation not in range(1, 9):
        orientation = 1  # Pillow's exif_transpose ignores values outside 1-8 too
    width, height = image.size
    if orientation >= 5:  # the four orientations that swap the axes
        width, height = height, width
    return JpegHeader(height, width, orientation)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored -> as displayed, for EXIF orientation 1-8 (Pillow's
    ``exif_transpose``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270 (clockwise 90),
    7 transverse, 8 rotate 90)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def _device_decode(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's (docs/batch.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _cpu_decode(data: bytes, limits: LimitsConfig, streams: Sequence[InputSpec], device: torch.device) -> torch.Tensor:
    pixels = np.require(decode_image(data, limits, streams), requirements="W")  # Pillow's are read-only
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def _batches(headers: dict[int, JpegHeader], batch_bytes: int) -> list[list[int]]:
    """The device's uploads in calls of at most ``batch_bytes`` decoded bytes each."""
    batches: list[list[int]] = []
    held = batch_bytes
    for k, header in headers.items():
        size = header.height * header.width * 3
        if held + size > batch_bytes:
            batches.append([])
            held = 0
        batches[-1].append(k)
        held += size
    return batches


def _decode_batch(items: Sequence[bytes], batch: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """One batched device call; when the device refuses it, each upload alone (those it refuses
    again are left out, for the CPU decoder to give the reason)."""
    try:
        return dict(zip(batch, _device_decode([bytes(items[k]) for k in batch], device)))
    except RuntimeError:
        decoded = {}
        for k in batch:
            try:
                decoded[k] = _device_decode([bytes(items[k])], device)[0]
            except RuntimeError:
                pass
        return decoded


def decode_on_device(
    items: Sequence[bytes],
    limits: LimitsConfig,
    device: torch.device | str,
    batch_bytes: int = BATCH_BYTES,
    streams: Sequence[InputSpec] = (),
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode uploads to (3, H, W) uint8 RGB tensors on ``device``: JPEGs by the device's decoder
    in batched calls of at most ``batch_bytes`` decoded bytes (full size), the rest by the CPU
    decoder, for ``streams`` as :func:`~twostream.core.scoring.decode_many` (module docstring).
    A failure becomes ``None`` with its reason, as in :func:`~twostream.core.scoring.decode_many`."""
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(items)
    errors: list[str | None] = [None] * len(items)
    headers: dict[int, JpegHeader] = {}
    for k, data in enumerate(items):
        try:
            header = jpeg_header(bytes(data), limits)
        except ImageDecodeError as exc:
            errors[k] = str(exc)
            continue
        if header is not None:
            headers[k] = header
    decoded = {k: image for batch in _batches(headers, batch_bytes) for k, image in _decode_batch(items, batch, device).items()}
    for k, data in enumerate(items):
        if errors[k] is not None:
            continue
        try:
            image = (orient(decoded[k], headers[k].orientation) if k in decoded
                     else _cpu_decode(bytes(data), limits, streams, device))
            check_min_side(*image.shape[-2:], limits)
            images[k] = image
        except ImageDecodeError as exc:
            errors[k] = str(exc)
    return images, errors

