"""Training data for the low-resolution stream: an ImageFolder named by CIFAR-10 class.

The folder is read by :func:`twostream.evaluation.datasets.image_folder` (``<root>/<class>/<image>``,
class folders named ``airplane ... truck``; any other name is an error). Training refuses an
``other`` folder: out-of-scope images have no CIFAR-10 label to learn. Every image is decoded by
the serving path's decoder and brought to the stream's input by the stream's own
:meth:`~twostream.core.models.Stream.resize` (antialiased, as when serving), then kept in memory
as 8-bit RGB (rounded; exact for images already at 32x32 such as the CIFAR-10 JPEGs). With a
``cache_dir``, the decoded array is written once as ``.npy`` files keyed by the folder's file list
and the stream's input geometry, and read back by later runs (decoding 50k JPEGs takes minutes).

Augmentation: :func:`augment` (translate and flip, airbench/ResNet style) and
:func:`serving_augment`, which imitates what the L-Net sees when serving (a photograph brought down
by the stream's antialiased resize): a random resized crop, an upscaled copy brought back down
by the stream's own :func:`~twostream.core.models.resize_image` (JPEG-encoded at the large size
when JPEG is drawn too), JPEG re-encoding at a random quality, colour jitter. Every draw comes
from the caller's generator.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from twostream import storage
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models import InputSpec, Stream, resize_image
from twostream.core.preprocess import ImageDecodeError, decode_image, to_tensor01
from twostream.evaluation.datasets import DatasetError, image_folder

log = logging.getLogger(__name__)

__all__ = ["LabelledImages", "augment", "holdout_split", "jpeg_roundtrip", "load_folder", "serving_augment"]


@dataclass
class LabelledImages:
    """Images at the stream's input size, ``x``: (N, 3, h, w) uint8; ``y``: (N,) int64 CIFAR-10 index."""

    root: str
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.y, minlength=len(CIFAR10_LABELS)).tolist()
        return {name: int(n) for name, n in zip(CIFAR10_LABELS, counts) if n}


def load_folder(root: str, stream: Stream, limit: int | None = None, seed: int = 0,
                cache_dir: str | None = None) -> LabelledImages:
    """Decode ``root`` (a seeded subset of ``limit`` images when given) at the stream's input size;
    with ``cache_dir``, read it from (or write it to) the cache there.

    Raises :class:`~twostream.evaluation.datasets.DatasetError` naming a bad folder or image."""
    dataset = image_folder(root).subset(limit, seed)
    if (dataset.labels < 0).any():
        raise DatasetError(f"{root}: folder 'other' holds out-of-scope images, which have no "
                           "CIFAR-10 label to train on; remove it or point --data elsewhere")
    labels = torch.from_numpy(dataset.labels.astype(np.int64))
    cached = _cache_paths(cache_dir, dataset.uris, stream.spec) if cache_dir else None
    if cached is not None and cached[0].is_file():
        x = torch.from_numpy(np.load(cached[0]))
        if tuple(x.shape) != (len(dataset), 3, *stream.spec.size) or x.dtype != torch.uint8:
            raise DatasetError(f"{cached[0]}: cached array of shape {tuple(x.shape)} {x.dtype} does not "
                               f"hold the {len(dataset)} images of {root}; delete it")
        log.info("%s: %d decoded images read from the cache %s", root, len(dataset), cached[0])
    else:
        x = _decode_all(dataset.uris, stream)
        if cached is not None:
            _write_atomic(cached[0], x.numpy())
            cached[1].write_text(json.dumps({"root": str(root), "images": len(dataset),
                                             "spec": repr(stream.spec)}) + "\n")
            log.info("%s: decoded images cached in %s", root, cached[0])
    data = LabelledImages(root, x, labels)
    log.info("%s: %d images %s", root, len(data), data.class_counts())
    return data


def _decode_all(uris: list[str], stream: Stream) -> Tensor:
    h, w = stream.spec.size
    x = torch.empty((len(uris), 3, h, w), dtype=torch.uint8)
    for k, uri in enumerate(tqdm(uris, desc="decode", unit="img", leave=False)):
        try:
            image = to_tensor01(decode_image(storage.read_bytes(uri)))
        except ImageDecodeError as exc:
            raise DatasetError(f"{uri}: {exc}") from None
        x[k] = stream.resize(image)[0].mul(255.0).round().clamp(0, 255).to(torch.uint8)
    return x


def _cache_paths(cache_dir: str, uris: list[str], spec: InputSpec) -> tuple[Path, Path]:
    """(array file, its description) in ``cache_dir`` for these files at this input geometry."""
    key = hashlib.sha256(json.dumps({"uris": list(uris), "size": list(spec.size), "squash": spec.squash,
                                     "crop_pct": spec.crop_pct, "interpolation": spec.interpolation})
                         .encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"images-{key}.npy", folder / f"images-{key}.json"


def _write_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train indices, held-out indices) of ``n`` items, ``round(fraction * n)`` held out.
    The held-out indices come in a seeded random order, so that any prefix of them (the quick
    per-epoch figures) is a random sample, not the first classes of a folder read in order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = round(fraction * n)
    return perm[n_out:].sort().values, perm[:n_out]


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation: random crop after zero-padding by ``pad``, random
    horizontal flip (per image, from ``generator``). ``x``: (B, 3, h, w) float."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (B, h)
    cols = dx[:, None] + torch.arange(w)[None]  # (B, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, h, w, 3)
    return out.permute(0, 3, 1, 2).contiguous()


def jpeg_roundtrip(x: Tensor, quality: int) -> Tensor:
    """One image (3, h, w) float in [0, 1], JPEG-encoded at ``quality`` (Pillow, 4:2:0) and decoded."""
    array = x.detach().mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(x.device, x.dtype).div_(255.0)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _random_crops(x: Tensor, min_scale: float, spec: InputSpec, generator: torch.Generator) -> Tensor:
    """Per image: a crop of area ``[min_scale, 1]`` of the image, aspect ratio in [3/4, 4/3],
    brought back to ``spec.size`` with the stream's resize."""
    b, _, h, w = x.shape
    area = _uniform(b, min_scale, 1.0, generator)
    ratio = torch.exp(_uniform(b, np.log(3 / 4), np.log(4 / 3), generator))
    fy, fx = torch.rand(b, generator=generator), torch.rand(b, generator=generator)
    out = torch.empty_like(x)
    for k in range(b):
        ch = int(min(h, max(2, round(h * float(torch.sqrt(area[k] / ratio[k]))))))
        cw = int(min(w, max(2, round(w * float(torch.sqrt(area[k] * ratio[k]))))))
        top, left = int(fy[k] * (h - ch)), int(fx[k] * (w - cw))
        out[k] = resize_image(x[k : k + 1, :, top : top + ch, left : left + cw], spec)[0]
    return out


def _colour_jitter(x: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation factors drawn per image from [1 - s, 1 + s]."""
    b = len(x)
    bright, contrast, sat = (_uniform(b, 1 - strength, 1 + strength, generator).view(b, 1, 1, 1).to(x)
                             for _ in range(3))
    x = x * bright
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return ((x - grey) * sat + grey).clamp(0.0, 1.0)


def serving_augment(x: Tensor, generator: torch.Generator, spec: InputSpec, *, crop_scale: float = 1.0,
                    rescale: float = 0.0, rescale_max: int = 8, jpeg: tuple[int, int] | None = None,
                    jpeg_p: float = 0.5, color_jitter: float = 0.0) -> Tensor:
    """Augment a batch ``x`` (B, 3, h, w) in [0, 1] at ``spec.size`` as the serving path changes a
    photograph, each part switchable: random resized crops (``crop_scale < 1``); with probability
    ``rescale`` the whole batch upscaled (bilinear) by a factor drawn from ``[2, rescale_max]`` and
    brought back down with the stream's antialiased resize; JPEG re-encoding of each image with
    probability ``jpeg_p`` at a quality drawn from ``jpeg`` (at the upscaled size when the batch
    was upscaled); colour jitter of strength ``color_jitter``. Returns a batch of the same shape."""
    if crop_scale < 1.0:
        x = _random_crops(x, crop_scale, spec, generator)
    upscaled = bool(torch.rand(1, generator=generator) < rescale) if rescale > 0 else False
    if upscaled:
        factor = int(torch.randint(2, rescale_max + 1, (1,), generator=generator))
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    if jpeg is not None and jpeg_p > 0:
        draw = torch.rand(len(x), generator=generator) < jpeg_p
        quality = torch.randint(jpeg[0], jpeg[1] + 1, (len(x),), generator=generator)
        if bool(draw.any()):
            x = torch.stack([jpeg_roundtrip(img, int(q)) if d else img for img, d, q in zip(x, draw, quality)])
    if upscaled:
        x = resize_image(x, spec)
    if color_jitter > 0:
        x = _colour_jitter(x, color_jitter, generator)
    return x
