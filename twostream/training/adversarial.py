"""L-inf perturbations for adversarial training and robust evaluation of a stream.

All in [0, 1] pixel space at the stream's input size; the stream normalises inside its
``forward``. An L-inf perturbation of a full-size image survives the antialiased resize as one of
at most the same size at 32x32, so this is the threat the defence's low stream faces.

* :func:`fgsm_rs`: FGSM with a uniform random start in [-eps, eps] and step ``1.25 * eps``,
  projected to the eps-ball and to [0, 1] (Wong, Rice & Kolter 2020, "Fast is better than free");
* :func:`pgd`: PGD-k with a random start, signed-gradient steps and restarts (Madry et al. 2018).

Random starts come from an explicit ``torch.Generator`` (CPU) so that runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostream.training.options import ATTACKS

__all__ = ["ATTACKS", "fgsm_rs", "make_attack", "parse_eps", "pgd"]


def parse_eps(text: str | float) -> float:
    """``8/255``, ``0.03`` or a float -> epsilon in [0, 1] pixel units."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"epsilon {text!r} is not a number or a fraction such as 8/255") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"epsilon {text!r} = {value:g} is outside [0, 1] (pixel units; 8/255 = 0.031)")
    return value


def _uniform(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    return ((2 * noise - 1) * eps + x).clamp(0, 1) - x


def _input_grad(model: nn.Module, x: Tensor, delta: Tensor, y: Tensor) -> Tensor:
    delta = delta.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


def _step(x: Tensor, delta: Tensor, grad: Tensor, alpha: float, eps: float) -> Tensor:
    """One signed-gradient step, projected onto the eps-ball and onto [0, 1]."""
    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator,
            alpha: float | None = None) -> Tensor:
    """The FGSM-RS adversarial example of ``x`` (step ``alpha``, default ``1.25 * eps``)."""
    delta = _uniform(x, eps, generator)
    grad = _input_grad(model, x, delta, y)
    return (x + _step(x, delta, grad, 1.25 * eps if alpha is None else alpha, eps)).detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, generator: torch.Generator,
        alpha: float | None = None, restarts: int = 1) -> Tensor:
    """The PGD-``steps`` adversarial example of ``x`` (step ``alpha``, default ``2.5 * eps / steps``).

    With several restarts, each image keeps the first restart that fools the model (else the last)."""
    if steps < 1 or restarts < 1:
        raise ValueError(f"PGD needs steps >= 1 and restarts >= 1, got {steps} and {restarts}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = _uniform(x, eps, generator)
        for _ in range(steps):
            delta = _step(x, delta, _input_grad(model, x, delta, y), alpha, eps)
        adv = (x + delta).detach()
        with torch.no_grad():
            wrong = model(adv).argmax(1) != y
        take = ~fooled
        best[take] = adv[take]
        fooled |= wrong
    return best


def make_attack(kind: str, eps: float, pgd_steps: int) -> Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]:
    """The training perturbation named ``kind`` (one of :data:`ATTACKS`) as ``f(model, x, y, gen)``."""
    if kind == "none" or eps == 0.0:
        return lambda model, x, y, gen: x
    if kind == "fgsm-rs":
        return lambda model, x, y, gen: fgsm_rs(model, x, y, eps, gen)
    if kind == "pgd":
        return lambda model, x, y, gen: pgd(model, x, y, eps, pgd_steps, gen)
    raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
