"""A modern CIFAR-10 network after Keller Jordan's airbench94 (2024): the second L-Net family.

Written here from the recipe's published description, not from its code:

* ``whiten``: a 2x2 convolution (no padding, 3 -> 24 channels) whose weights are set once from the
  training images (:meth:`AirbenchNet.whiten_init`): the 12 eigenvectors of the covariance of
  2x2x3 patches, each scaled by ``1 / sqrt(eigenvalue + eps)``, and their negatives; its bias
  centres the patches. The weights are then frozen (``requires_grad=False``) and saved in the weight
  file like any other tensor; the bias trains. GELU follows.
* three conv groups, widths 64 / 256 / 256: ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 ->
  BN -> GELU`` (32 -> 31 -> 15 -> 7 -> 3 pixels);
* a final max-pool over the 3x3 map and a bias-free linear head whose output is scaled by 1/9.

~1.97M parameters and ~0.24 GFLOP (2 x 0.118 G multiply-adds) per 32x32 image
(``python benchmarks/lnet_cost.py``). Input: the whole image squashed to 32x32 (bilinear,
antialiased), normalised inside the stream with the CIFAR-10 training-set mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostream.core.models.registry import ModelCfg, register_model
from twostream.core.models.stream import InputSpec

__all__ = ["AIRBENCH_MEAN", "AIRBENCH_STD", "AirbenchNet", "patches_2x2"]

# CIFAR-10 training-set channel statistics (the usual published figures).
AIRBENCH_MEAN = (0.4914, 0.4822, 0.4465)
AIRBENCH_STD = (0.2470, 0.2435, 0.2616)

_SPEC = InputSpec(size=(32, 32), mean=AIRBENCH_MEAN, std=AIRBENCH_STD, crop_pct=1.0,
                  interpolation="bilinear", squash=True)
HEAD_SCALE = 1.0 / 9.0
WHITEN_EPS = 5e-4


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


def patches_2x2(x: Tensor) -> Tensor:
    """Every 2x2 patch (stride 1) of ``x`` (B, 3, H, W) as rows of 12: (B * (H-1) * (W-1), 12),
    in the order of a 2x2 conv weight's flattening (channel, row, column)."""
    b, c, h, w = x.shape
    p = x.unfold(2, 2, 1).unfold(3, 2, 1)  # (B, C, H-1, W-1, 2, 2)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)


class AirbenchNet(nn.Module):
    """The airbench94-style network for 32x32 inputs (already normalised)."""

    def __init__(self, widths: tuple[int, int, int] = (64, 256, 256), num_classes: int = 10) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.layer1 = ConvGroup(24, widths[0])
        self.layer2 = ConvGroup(widths[0], widths[1])
        self.layer3 = ConvGroup(widths[1], widths[2])
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @torch.no_grad()
    def whiten_init(self, x: Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the first layer from normalised training images ``x`` (B, 3, H, W): its first 12
        filters map a 2x2 patch onto the covariance's eigenvectors scaled by ``1/sqrt(lambda + eps)``
        (decorrelated, unit variance where ``lambda >> eps``), the last 12 are their negatives; the
        bias removes the patches' mean. Computed in float64."""
        rows = patches_2x2(x.detach().to("cpu", torch.float64))
        mean = rows.mean(0)
        cov = torch.cov(rows.T, correction=0)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # columns are eigenvectors
        filters = eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]  # (12, 12)
        weight = torch.cat([filters, -filters]).reshape(24, 3, 2, 2)
        bias = -(torch.cat([filters, -filters]) @ mean)
        self.whiten.weight.copy_(weight.to(self.whiten.weight))
        self.whiten.bias.copy_(bias.to(self.whiten.bias))

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.whiten(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.amax(x, dim=(2, 3))  # the final max-pool over the 3x3 map
        return self.head(x) * HEAD_SCALE


@register_model
def airbench94() -> tuple[nn.Module, ModelCfg]:
    """airbench94's widths (64, 256, 256): ~1.97M parameters, ~0.24 GFLOP per image."""
    return AirbenchNet((64, 256, 256)), ModelCfg(_SPEC, num_classes=10)
