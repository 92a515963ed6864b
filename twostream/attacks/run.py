"""Running an attack by name: its full parameters (:func:`attack_params`) and :func:`run_attack`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from twostream.attacks import ADAPTIVE, ATTACKS, TYPE1, TYPE2
from twostream.attacks.fig4 import fig4_attack
from twostream.attacks import standard
from twostream.attacks.standard import merge_params

# The adaptive attack's parameters (docs/evaluation.md): 20 steps of 2.5 * eps / steps (step_size None),
# one random start, towards the most likely wrong class; more via eval.params.adaptive-8.restarts=5 etc.
ADAPTIVE_DEFAULTS = {"norm": "inf", "steps": 20, "step_size": None, "kappa": 0.3, "random_start": True,
                     "restarts": 1, "targeted": True, "targets": 1}


def base_name(name: str) -> str:
    """``t1-ifgsm`` -> ``ifgsm`` (the key of :data:`standard.DEFAULTS`)."""
    return name.split("-", 1)[1]


def attack_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full parameter set an attack runs with (defaults of SPEC 4 plus overrides)."""
    if name == "clean":
        return {}
    if name in ADAPTIVE:
        params = dict(ADAPTIVE_DEFAULTS, eps=int(name.split("-")[1]) / 255.0)
        for key, value in (overrides or {}).items():
            if key not in params:
                raise KeyError(f"attack {name!r} has no parameter {key!r}")
            params[key] = value
        return params
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    params = merge_params(base_name(name), overrides)
    if name in TYPE2:
        params.setdefault("upsample", "bilinear")
    return params


@dataclass
class AttackResult:
    name: str
    kind: str  # clean | type1 | type2 | adaptive
    x_adv: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    params: dict[str, Any]
    seed: int
    wall_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {"attack": self.name, "kind": self.kind, "params": self.params, "seed": self.seed,
                "wall_s": self.wall_s, "n": int(len(self.x_adv))}


def run_attack(
    name: str,
    x: torch.Tensor,
    labels: np.ndarray,
    high: torch.nn.Module,
    low: torch.nn.Module,
    *,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    fit_x: torch.Tensor | None = None,
    mapping: np.ndarray | None = None,
    thresholds: tuple[float, float] = (0.10, 0.20),
    batch_size: int = 8,
) -> AttackResult:
    """Attack the (N, 3, H, W) [0, 1] batch ``x``. ``labels``: true CIFAR-10 indices (adaptive only).

    ``fit_x``: the images a universal perturbation is fitted on (default: ``x`` itself).
    """
    p = attack_params(name, params)
    if "batch_size" in p:
        batch_size = int(p.pop("batch_size"))
    started = time.perf_counter()
    info: dict[str, Any] = {}
    x = x.detach().float().cpu()
    if name == "clean":
        kind, adv = "clean", x.clone()
    elif name in ADAPTIVE:
        from twostream.attacks.adaptive import adaptive_attack
        from twostream.core.mapping import load_mapping

        kind = "adaptive"
        mapping = load_mapping().array if mapping is None else mapping
        adv, info = adaptive_attack(
            x, labels, high, low, mapping, eps=p["eps"], steps=p["steps"], step_size=p["step_size"],
            p1=thresholds[0], p2=thresholds[1], kappa=p["kappa"], random_start=p["random_start"],
            restarts=p["restarts"], targeted=p["targeted"], targets=p["targets"], seed=seed,
            batch_size=batch_size,
        )
        p["step_size"] = info["step_size"]
    elif name in TYPE1:
        kind = "type1"
        classifier = standard.art_classifier(high, tuple(x.shape[1:]), 1000, resize=True,
                                             batch_size=batch_size)
        if name == "t1-universal":
            fit = x if fit_x is None else fit_x.detach().float().cpu()
            fit = fit[: p["fit_images"]]
            noise = standard.fit_universal(classifier, fit, p, seed)
            adv = standard.apply_universal(x, noise)
            info["noise_linf"] = float(noise.abs().max())
            info["fit_n"] = int(len(fit))
        else:
            adv = standard.art_generate(base_name(name), classifier, x, p, seed)
    elif name in TYPE2:
        kind = "type2"
        h, w = tuple(low.spec.size) if hasattr(low, "spec") else (32, 32)
        classifier = standard.art_classifier(low, (3, int(h), int(w)), 10, resize=False,
                                             batch_size=max(batch_size, 64))

        def attack_small(small: torch.Tensor) -> torch.Tensor:
            return standard.art_generate(base_name(name), classifier, small, p, seed)

        adv, parts = fig4_attack(x, low, attack_small, mode=p["upsample"])
        info["diff_linf_small"] = float(parts["diff"].abs().max())
        info["diff_small"] = parts["diff"]
    else:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    wall = time.perf_counter() - started
    return AttackResult(name=name, kind=kind, x_adv=adv.detach().float().cpu(), params=p,
                        seed=seed, wall_s=wall, info=info)
