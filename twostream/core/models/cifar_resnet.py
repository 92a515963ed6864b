"""The CIFAR-10 ResNets of He et al. (2016), option A: the low-resolution (L-Net) family.

3 stages of ``n`` basic blocks at 16/32/64 channels, parameter-free shortcuts that subsample by
2 and zero-pad the new channels: ``cifar_resnet20/32/44/56/110/1202``, with the parameter names
of akamaster's ``pytorch_resnet_cifar10/resnet.py`` (``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
``linear``). Input: the whole image squashed to 32x32 (bilinear, antialiased), ImageNet
mean/std. ``weights: pretrained`` loads akamaster's GitHub release (BSD-2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from twostream.core.models.registry import ModelCfg, register_model
from twostream.core.models.stream import InputSpec

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "BasicBlock", "CifarResNet"]

# The bundled ResNet-32 was trained on inputs normalised with ImageNet statistics.
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)

_SPEC = InputSpec(size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0,
                  interpolation="bilinear", squash=True)
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2, zero-pad the new channels on both sides."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of ``n`` basic blocks at 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = out.mean(dim=(2, 3))  # = avg_pool2d over the whole 8x8 map
        return self.linear(out)


def _cifar_resnet(depth: int, release: str) -> tuple[nn.Module, ModelCfg]:
    cfg = ModelCfg(_SPEC, num_classes=10, url=_AKAMASTER + release)
    return CifarResNet(depth, num_classes=cfg.num_classes), cfg


@register_model
def cifar_resnet20() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(20, "resnet20-12fca82f.th")


@register_model
def cifar_resnet32() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(32, "resnet32-d509ac18.th")


@register_model
def cifar_resnet44() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(44, "resnet44-014dd654.th")


@register_model
def cifar_resnet56() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(56, "resnet56-4bfd9763.th")


@register_model
def cifar_resnet110() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(110, "resnet110-1d1ed7c2.th")


@register_model
def cifar_resnet1202() -> tuple[nn.Module, ModelCfg]:
    return _cifar_resnet(1202, "resnet1202-f3b1deed.th")
