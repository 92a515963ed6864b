"""The paper's Fig. 4: carry an attack on the 32x32 L-Net input to the full-resolution image.

1. ``small = low.resize(x)`` - the low stream's own resize (the pixels the serving path feeds it);
2. ``adv_small = attack(small)`` - any attack on L-Net at 32x32;
3. ``diff = adv_small - small``;
4. ``x_adv = clip(x + upsample(diff, size of x), 0, 1)``.

The full-resolution perturbation before clipping is exactly the upsampled 32x32 difference
(``upsample`` = ``torch.nn.functional.interpolate`` with ``mode`` bilinear, align_corners False,
no antialias; ``nearest`` gives the blocky "zoom in" of the figure).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def upsample_difference(diff: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Upsample an (N, 3, h, w) difference map to ``size`` (H, W)."""
    if mode == "nearest":
        return F.interpolate(diff, size=size, mode="nearest")
    return F.interpolate(diff, size=size, mode=mode, align_corners=False)


def fig4_attack(
    x: torch.Tensor,
    low: torch.nn.Module,
    attack_small: Callable[[torch.Tensor], torch.Tensor],
    *,
    mode: str = "bilinear",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``attack_small`` on ``low.resize(x)`` and carry its difference to ``x``'s resolution.

    Returns ``(x_adv, parts)`` with ``parts`` = ``small``, ``adv_small``, ``diff`` (32x32) and
    ``delta_full`` (the upsampled difference, before clipping).
    """
    with torch.no_grad():
        small = low.resize(x).clamp(0.0, 1.0)
    adv_small = attack_small(small).to(small)
    diff = adv_small - small
    delta_full = upsample_difference(diff, tuple(x.shape[-2:]), mode)
    x_adv = (x + delta_full).clamp(0.0, 1.0)
    return x_adv, {"small": small, "adv_small": adv_small, "diff": diff, "delta_full": delta_full}
