"""Training data for the low-resolution stream: an ImageFolder named by CIFAR-10 class.

The folder is read by :func:`twostream.evaluation.datasets.image_folder` (``<root>/<class>/<image>``,
class folders named ``airplane ... truck``; any other name is an error). Training refuses an
``other`` folder: out-of-scope images have no CIFAR-10 label to learn. Every image is decoded by
the serving path's decoder and brought to the stream's input by the stream's own
:meth:`~twostream.core.models.Stream.resize` (antialiased, as when serving), then kept in memory
as 8-bit RGB (rounded; exact for images already at 32x32 such as the CIFAR-10 JPEGs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from twostream import storage
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models import Stream
from twostream.core.preprocess import ImageDecodeError, decode_image, to_tensor01
from twostream.evaluation.datasets import DatasetError, image_folder

log = logging.getLogger(__name__)

__all__ = ["LabelledImages", "augment", "holdout_split", "load_folder"]


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


def load_folder(root: str, stream: Stream, limit: int | None = None, seed: int = 0) -> LabelledImages:
    """Decode ``root`` (a seeded subset of ``limit`` images when given) at the stream's input size.

    Raises :class:`~twostream.evaluation.datasets.DatasetError` naming a bad folder or image."""
    dataset = image_folder(root).subset(limit, seed)
    if (dataset.labels < 0).any():
        raise DatasetError(f"{root}: folder 'other' holds out-of-scope images, which have no "
                           "CIFAR-10 label to train on; remove it or point --data elsewhere")
    h, w = stream.spec.size
    x = torch.empty((len(dataset), 3, h, w), dtype=torch.uint8)
    for k, uri in enumerate(tqdm(dataset.uris, desc="decode", unit="img", leave=False)):
        try:
            image = to_tensor01(decode_image(storage.read_bytes(uri)))
        except ImageDecodeError as exc:
            raise DatasetError(f"{uri}: {exc}") from None
        x[k] = stream.resize(image)[0].mul(255.0).round().clamp(0, 255).to(torch.uint8)
    data = LabelledImages(root, x, torch.from_numpy(dataset.labels.astype(np.int64)))
    log.info("%s: %d images %s", root, len(data), data.class_counts())
    return data


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
