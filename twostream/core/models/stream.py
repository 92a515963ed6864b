"""A stream: the ``nn.Module`` that owns its network's input geometry and normalisation.

A :class:`Stream` wraps a network and its :class:`InputSpec`:

* ``stream.resize(x01)``: ``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, h, w)`` in [0, 1], made of
  differentiable torch ops (``F.interpolate(..., antialias=True)`` and slicing), so attacks and
  the serving path see the same pixels;
* ``stream.forward(x)``: ``x`` already at ``spec.size`` in [0, 1]; normalises with the spec's
  mean/std inside and returns logits; with ``tta="flip"`` the logits are the mean of the
  network's logits for the image and for its horizontal mirror (one batch of both, inside the
  differentiable graph: every caller and every attack sees the averaged output);
* ``stream.classify(x01) == stream.forward(stream.resize(x01))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SEPARABLE", "TTA", "InputSpec", "Stream", "resize_image", "resize_strips", "resized_size"]

TTA = ("none", "flip")  # test-time augmentation of a stream's forward


@dataclass(frozen=True)
class InputSpec:
    """What a stream's network takes.

    ``size`` is ``(h, w)``. High-resolution streams follow timm's eval transform: resize the
    shorter side to ``floor(size / crop_pct)`` and centre-crop ``size``. Low-resolution streams
    use ``squash=True``, ``crop_pct=1.0``: the whole image resized to ``size`` ignoring aspect.
    ``interpolation`` is ``bilinear`` / ``bicubic`` (antialiased) or ``nearest``.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    squash: bool = False


def _interpolate(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    raise ValueError(f"unsupported interpolation {mode!r}")


def resize_image(x01: Tensor, spec: InputSpec) -> Tensor:
    """Resize a ``(B, 3, H, W)`` batch in [0, 1] to ``spec.size`` (differentiable)."""
    if x01.dim() != 4 or x01.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x01.shape)}")
    if not x01.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got {x01.dtype}")
    new = resized_size(int(x01.shape[-2]), int(x01.shape[-1]), spec)
    return _crop(_interpolate(x01, new, spec.interpolation), spec)


SEPARABLE = ("bilinear", "bicubic")  # antialiased: a width pass, then a height pass


def resize_strips(strips: Iterable[Tensor], height: int, width: int, spec: InputSpec) -> Tensor:
    """:func:`resize_image` of the image whose rows come as ``strips`` (``(1, 3, r, width)`` in
    [0, 1], top to bottom, ``height`` rows in all), holding one strip at full width at a time.

    The antialiased resize is separable and torch makes its width pass first, so resizing each
    strip's width and then the whole height gives the same tensor bit for bit
    (``tests/core/test_models.py``); for ``spec.interpolation`` in :data:`SEPARABLE` only."""
    if spec.interpolation not in SEPARABLE:
        raise ValueError(f"strip-wise resizing needs a separable interpolation, not {spec.interpolation!r}")
    new = resized_size(height, width, spec)
    narrow = torch.cat([_interpolate(s, (int(s.shape[-2]), new[1]), spec.interpolation) for s in strips], dim=2)
    if narrow.shape[-2] != height:
        raise ValueError(f"the strips hold {narrow.shape[-2]} rows, not {height}")
    return _crop(_interpolate(narrow, new, spec.interpolation), spec)


def resized_size(H: int, W: int, spec: InputSpec) -> tuple[int, int]:
    """The size an ``H`` x ``W`` image is resized to before the centre crop."""
    h, w = spec.size
    sh, sw = math.floor(h / spec.crop_pct), math.floor(w / spec.crop_pct)
    if spec.squash:
        return (sh, sw)
    if sh == sw:
        # torchvision Resize(int): shorter side to sh, longer side truncated proportionally
        return (sh, int(sh * W / H)) if H <= W else (int(sh * H / W), sh)
    # timm ResizeKeepRatio: the shorter side (relative to the target) matches
    scale = max(sh / H, sw / W)
    return (round(H * scale), round(W * scale))


def _crop(y: Tensor, spec: InputSpec) -> Tensor:
    """The centre ``spec.size`` of a resized batch (zero-padded where smaller), clamped to [0, 1]."""
    h, w = spec.size
    Y, X = int(y.shape[-2]), int(y.shape[-1])
    if Y < h or X < w:  # torchvision CenterCrop pads with zeros when the image is smaller
        pad_h, pad_w = max(h - Y, 0), max(w - X, 0)
        y = F.pad(y, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        Y, X = int(y.shape[-2]), int(y.shape[-1])
    top, left = int(round((Y - h) / 2.0)), int(round((X - w) / 2.0))
    y = y[..., top : top + h, left : left + w]
    return y.clamp(0.0, 1.0)


class Stream(nn.Module):
    """One classifier stream: resize, normalise, network; on whatever device it is moved to."""

    def __init__(
        self,
        net: nn.Module,
        *,
        kind: str,
        name: str,
        num_classes: int,
        spec: InputSpec,
        weights: str = "",
        tta: str = "none",
    ) -> None:
        super().__init__()
        if tta not in TTA:
            raise ValueError(f"test-time augmentation {tta!r}: choose one of {', '.join(TTA)}")
        self.tta = tta
        self.net = net
        self.kind = kind
        self.name = name
        self.num_classes = num_classes
        self.spec = spec
        self.weights = weights
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def resize(self, x01: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, h, w)`` in [0, 1] at ``spec.size``."""
        return resize_image(x01, self.spec)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for ``x`` already at ``spec.size``, in [0, 1]; with ``tta="flip"``, the mean of
        the logits of ``x`` and of its horizontal mirror (airbench's definition)."""
        z = (x - self.mean) / self.std
        if self.tta == "flip":
            both = self.net(torch.cat([z, z.flip(-1)]))
            return 0.5 * (both[: len(z)] + both[len(z) :])
        return self.net(z)

    def classify(self, x01: Tensor) -> Tensor:
        """Logits for images of any size in [0, 1]: ``forward(resize(x01))``."""
        return self.forward(self.resize(x01))

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, name={self.name!r}, weights={self.weights!r}, tta={self.tta!r}, "
                f"spec={self.spec}")
