"""The model registry: builds a :class:`~twostream.core.models.stream.Stream` by name.

:func:`build_stream` turns a :class:`~twostream.core.config.StreamConfig` into a stream with its
weights loaded (sources: :mod:`twostream.core.models.weights`).

``kind="high"``: any timm architecture by name (``timm.create_model(name, pretrained=False,
num_classes=1000)``); its :class:`InputSpec` comes from timm's pretrained config
(``timm.data.resolve_data_config({}, model=net)``: input size, ``crop_pct``, interpolation,
mean/std). Default ``tf_efficientnet_lite0``.

``kind="low"``: the models registered here by their families with :func:`register_model` (as
timm's ``register_model``): a builder named like the model returns the network and its
:class:`ModelCfg` (input geometry, class count, release URL for ``weights: pretrained``).
Default ``cifar_resnet32`` (:mod:`twostream.core.models.cifar_resnet`); also ``airbench94``
(:mod:`twostream.core.models.airbench`; trained weights shipped as ``bundled:airbench94_std``). ``low.tta: flip`` makes the stream average its logits
over the image and its mirror (:class:`~twostream.core.models.stream.Stream`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from twostream.core.models import efficientnet_lite
from twostream.core.models.stream import InputSpec, Stream
from twostream.core.models.weights import (
    WeightsError,
    check_metadata,
    load_into,
    load_weights_file,
    resolve_weights_file,
)

if TYPE_CHECKING:
    from twostream.core.config import StreamConfig

log = logging.getLogger(__name__)

__all__ = [
    "ModelCfg",
    "UnknownModelError",
    "available_models",
    "build_stream",
    "register_model",
]


@dataclass(frozen=True)
class ModelCfg:
    """What a model needs besides its network: input geometry, class count, and the file that
    ``weights: pretrained`` loads (None where timm fetches its own)."""

    spec: InputSpec
    num_classes: int
    url: str | None = None


Builder = Callable[[], tuple[nn.Module, ModelCfg]]
_model_entrypoints: dict[str, Builder] = {}


def register_model(fn: Builder) -> Builder:
    """Decorator: register ``fn`` as the low-resolution model named ``fn.__name__``."""
    _model_entrypoints[fn.__name__] = fn
    return fn


class UnknownModelError(ValueError):
    """The model name is not in the registry; the message lists what is available."""



def available_models(kind: Literal["high", "low"]) -> list[str]:
    """Model names accepted by :func:`build_stream` for this kind."""
    if kind == "low":
        return list(_model_entrypoints)
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


def _build_high(name: str, weights: str) -> tuple[nn.Module, ModelCfg]:
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
    return net, ModelCfg(_high_spec(net), num_classes=1000)


def _build_low(name: str) -> tuple[nn.Module, ModelCfg]:
    builder = _model_entrypoints.get(name)
    if builder is None:
        raise _unknown(name, "low")
    return builder()


def _adapt_state_dict(state: dict[str, Tensor], net: nn.Module, name: str) -> dict[str, Tensor]:
    """Convert known foreign layouts into the layout of ``net``."""
    state = efficientnet_lite.adapt_state_dict(state, net, name)
    if any(k.startswith("AuxLogits.") for k in state) and not any(
        k.startswith("AuxLogits.") for k in net.state_dict()
    ):
        # torchvision's inception_v3 checkpoints carry the training-only auxiliary classifier
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    return state


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
        net, model_cfg = _build_high(name, weights)
    else:
        net, model_cfg = _build_low(name)
    if weights not in ("random",) and not (kind == "high" and weights == "pretrained"):
        if weights == "pretrained" and model_cfg.url is None:
            raise WeightsError(f"low model {name!r} has no published release for weights 'pretrained'; "
                               "train it with twostream train-low and point weights at the file")
        source = model_cfg.url if weights == "pretrained" else weights  # low: the model's release
        path = resolve_weights_file(source)
        state, meta = load_weights_file(path)
        if meta is not None:
            spec = model_cfg.spec
            check_metadata(meta, model=name, mean=spec.mean, std=spec.std, size=spec.size,
                           origin=f"weights file {path}")
        load_into(net, _adapt_state_dict(state, net, name), f"weights file {path}")
    stream = Stream(
        net, kind=kind, name=name, num_classes=model_cfg.num_classes, spec=model_cfg.spec,
        weights=weights, tta=getattr(cfg, "tta", "none"),
    )
    return stream.to("cpu", memory_format=torch.channels_last).eval()
