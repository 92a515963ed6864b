"""The stream models: the H-Net (any timm ImageNet model) and the L-Net (CIFAR ResNets).

:func:`build_stream` turns a :class:`~twostream.core.config.StreamConfig` into a :class:`Stream`,
an ``nn.Module`` that owns its input geometry (:class:`InputSpec`) and normalisation (and, for
the low stream, the optional flip test-time augmentation), with its weights loaded, in eval mode,
on CPU. The package, in the manner of timm:

* :mod:`.stream`: :class:`Stream`, :class:`InputSpec`, :func:`resize_image`, :func:`resize_strips`;
* :mod:`.registry`: :func:`build_stream`, :func:`available_models`, ``register_model``;
* :mod:`.cifar_resnet`: the CIFAR-10 ResNets (low stream), one registered builder per depth;
* :mod:`.airbench`: ``airbench94``, the whitening-initialised 3-group network (low stream);
* :mod:`.efficientnet_lite`: efficientnet-lite-pytorch weights mapped onto timm's
  ``tf_efficientnet_lite*``;
* :mod:`.weights`: weight sources (``pretrained``, ``random``, ``package:``, ``bundled:``,
  paths, ``s3://``, ``https://``), hash checks, weight-file metadata and strict loading.
"""

from __future__ import annotations

# Importing a model family registers its builders with the registry.
from twostream.core.models.airbench import AirbenchNet
from twostream.core.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, CifarResNet
from twostream.core.models.efficientnet_lite import efficientnet_lite_key_map
from twostream.core.models.registry import UnknownModelError, available_models, build_stream
from twostream.core.models.stream import SEPARABLE, TTA, InputSpec, Stream, resize_image, resize_strips
from twostream.core.models.weights import (
    WEIGHTS_DIR,
    WeightsError,
    check_metadata,
    load_state_dict_file,
    load_weights_file,
    resolve_weights_file,
    verify_hash_prefix,
)

__all__ = [
    "AirbenchNet",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "WEIGHTS_DIR",
    "CifarResNet",
    "InputSpec",
    "Stream",
    "UnknownModelError",
    "WeightsError",
    "available_models",
    "build_stream",
    "check_metadata",
    "efficientnet_lite_key_map",
    "load_state_dict_file",
    "load_weights_file",
    "resize_image",
    "resize_strips",
    "SEPARABLE",
    "TTA",
    "resolve_weights_file",
    "verify_hash_prefix",
]
