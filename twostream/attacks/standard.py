"""The paper's standard attacks through IBM's Adversarial Robustness Toolbox (ART).

Type I attacks run against H-Net on the full-resolution image with the stream's own
differentiable resize inside the model ART differentiates (``stream.classify``). Type II attacks
run against L-Net on its 32x32 input (``stream.forward`` on ``stream.resize(x)``) and are carried
to full resolution by :func:`twostream.attacks.fig4.fig4_attack`.

Labels: untargeted attacks use the attacked stream's own clean prediction as the label to move
away from (ART's default when ``y`` is None; avoids label leaking and needs no ImageNet label).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

EPS8 = 8.0 / 255.0

# Defaults of SPEC 4 (CPU-friendly iteration limits where SPEC sets none; each is recorded).
DEFAULTS: dict[str, dict[str, Any]] = {
    "fgsm": {"norm": "inf", "eps": EPS8},
    "ifgsm": {"norm": "inf", "eps": EPS8, "eps_step": EPS8 / 10, "max_iter": 10},
    "mifgsm": {"norm": "inf", "eps": EPS8, "eps_step": EPS8 / 10, "max_iter": 10, "decay": 1.0},
    "deepfool": {"norm": "2", "overshoot": 0.02, "max_iter": 50, "nb_grads": 10},
    "universal": {
        "norm": "inf", "eps": 10.0 / 255.0, "attacker": "deepfool", "delta": 0.2, "max_iter": 2,
        "attacker_params": {"epsilon": 0.02, "max_iter": 20, "nb_grads": 10}, "fit_images": 32,
    },
    "pixel1": {"norm": "0", "pixels": 1, "es": "differential_evolution", "max_iter": 10},
    "pixel3": {"norm": "0", "pixels": 3, "es": "differential_evolution", "max_iter": 10},
    "cw": {"norm": "2", "confidence": 0.0, "learning_rate": 0.01, "binary_search_steps": 10,
           "max_iter": 10, "initial_const": 0.01},
}


def seed_everything(seed: int) -> None:
    """Seed every RNG an ART attack may use (numpy's global state included: the pixel attack's
    differential evolution draws from it)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _StreamModel(nn.Module):
    """The function ART differentiates: ``stream.classify`` (resize in the graph) or ``forward``."""

    def __init__(self, stream: nn.Module, resize: bool) -> None:
        super().__init__()
        self.stream = stream
        self.with_resize = resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream.classify(x) if self.with_resize else self.stream(x)


def art_classifier(stream: nn.Module, input_shape: tuple[int, int, int], nb_classes: int,
                   *, resize: bool, batch_size: int = 16):
    """An ART ``PyTorchClassifier`` over a stream, on [0, 1] images (clip_values (0, 1))."""
    from art.estimators.classification import PyTorchClassifier

    device = next(stream.parameters()).device
    classifier = PyTorchClassifier(
        model=_StreamModel(stream, resize).eval(),
        loss=nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
    classifier.batch_size = batch_size  # our own attribute, read by the wrappers below
    return classifier


def _art_attack(name: str, classifier, params: dict[str, Any], batch_size: int):
    from art.attacks.evasion import (
        BasicIterativeMethod,
        CarliniL2Method,
        DeepFool,
        FastGradientMethod,
        MomentumIterativeMethod,
        PixelAttack,
    )

    p = params
    if name == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=p["eps"], batch_size=batch_size)
    if name == "ifgsm":
        return BasicIterativeMethod(classifier, eps=p["eps"], eps_step=p["eps_step"],
                                    max_iter=p["max_iter"], batch_size=batch_size, verbose=False)
    if name == "mifgsm":
        return MomentumIterativeMethod(classifier, norm=np.inf, eps=p["eps"], eps_step=p["eps_step"],
                                       decay=p["decay"], max_iter=p["max_iter"],
                                       batch_size=batch_size, verbose=False)
    if name == "deepfool":
        return DeepFool(classifier, max_iter=p["max_iter"], epsilon=p["overshoot"],
                        nb_grads=p["nb_grads"], batch_size=batch_size, verbose=False)
    if name in ("pixel1", "pixel3"):
        es = 1 if p["es"] == "differential_evolution" else 0
        return PixelAttack(classifier, th=p["pixels"], es=es, max_iter=p["max_iter"], verbose=False)
    if name == "cw":
        return CarliniL2Method(classifier, confidence=p["confidence"], learning_rate=p["learning_rate"],
                               binary_search_steps=p["binary_search_steps"], max_iter=p["max_iter"],
                               initial_const=p["initial_const"], batch_size=batch_size, verbose=False)
    raise KeyError(name)


def art_generate(name: str, classifier, x: torch.Tensor, params: dict[str, Any], seed: int) -> torch.Tensor:
    """Run one ART attack on ``x`` (N, 3, H, W) in [0, 1]; returns the adversarial batch."""
    seed_everything(seed)
    attack = _art_attack(name, classifier, params, getattr(classifier, "batch_size", 16))
    x_np = x.detach().cpu().numpy().astype(np.float32)
    if name == "deepfool":
        # ART's DeepFool differentiates every class in the union of all inputs' top-nb_grads
        # at each step; one image at a time keeps that at nb_grads gradients.
        adv = np.concatenate([attack.generate(x_np[k:k + 1]) for k in range(len(x_np))])
    else:
        adv = attack.generate(x_np)
    return torch.from_numpy(np.asarray(adv, dtype=np.float32)).clamp_(0.0, 1.0)


def fit_universal(classifier, fit_x: torch.Tensor, params: dict[str, Any], seed: int) -> torch.Tensor:
    """Fit a universal perturbation (ART ``UniversalPerturbation``) on ``fit_x``; returns it (3, H, W)."""
    from art.attacks.evasion import UniversalPerturbation

    seed_everything(seed)
    attack = UniversalPerturbation(
        classifier, attacker=params["attacker"], attacker_params=dict(params["attacker_params"]),
        delta=params["delta"], max_iter=params["max_iter"], eps=params["eps"], norm=np.inf,
        batch_size=getattr(classifier, "batch_size", 16), verbose=False,
    )
    attack.generate(fit_x.detach().cpu().numpy().astype(np.float32))
    noise = np.asarray(attack.noise, dtype=np.float32).reshape(fit_x.shape[1:])
    return torch.from_numpy(noise)


def apply_universal(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (x + noise.to(x)[None]).clamp(0.0, 1.0)


def merge_params(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS[name].items()}
    for key, value in (overrides or {}).items():
        if key not in params and key not in ("batch_size",):
            raise KeyError(f"attack {name!r} has no parameter {key!r} (known: {sorted(params)})")
        if isinstance(params.get(key), dict) and isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    return params


ArtFn = Callable[[torch.Tensor], torch.Tensor]
