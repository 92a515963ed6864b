"""Adaptive white-box attack on the whole defence (SPEC 4; not in the paper).

One L-inf perturbation of the full-resolution image is optimised against both streams at once,
each stream's resize inside the graph (``stream.classify``), with Algorithm 1's thresholds as
hinge terms. The aim is an image the comparator *accepts with a wrong label*:

* pick a target CIFAR-10 class ``t != y`` per image (default: the wrong class with the largest
  clean ``max_{i: M(i)=t} P_high[i] * P_low[t]``);
* H-Net: ``max_{i: M(i)=t} log P_high[i] >= log p1 + kappa`` (some ImageNet class of ``t`` passes p1);
* L-Net: ``log P_low[t] >= log p2 + kappa`` (t is an L-Net candidate) and
  ``log P_low[y] <= log p2 - kappa`` (the true class can no longer form a candidate pair);

loss = sum of the three hinges, minimised by signed-gradient PGD (random start, projection to
the eps ball and [0, 1]). Each step's forward pass runs on the 8-bit quantised image (straight-
through), so "accepted with a wrong label" is checked on exactly the pixels an upload would have;
an image is frozen at its first success.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from twostream.core.comparator import compare


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Straight-through 8-bit rounding: forward sees round(x*255)/255, gradient is identity."""
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def _class_max(logp: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """max over ImageNet classes in ``member`` (N, 1000) bool of ``logp`` (N, 1000)."""
    return logp.masked_fill(~member, -math.inf).max(dim=1).values


def choose_targets(p_high: torch.Tensor, p_low: torch.Tensor, labels: torch.Tensor,
                   mapping: torch.Tensor) -> torch.Tensor:
    """Per image the wrong CIFAR-10 class with the largest clean max_i P_high[i] * P_low[t]."""
    n, classes = p_low.shape
    per_class = torch.zeros(n, classes, dtype=p_high.dtype, device=p_high.device)
    for c in range(classes):
        member = (mapping == c)
        if member.any():
            per_class[:, c] = p_high[:, member].max(dim=1).values
    score = torch.log(per_class + 1e-12) + torch.log(p_low + 1e-12)
    score[torch.arange(n), labels.clamp(min=0)] = -math.inf
    return score.argmax(dim=1)


def adaptive_attack(
    x: torch.Tensor,
    labels: np.ndarray,
    high: torch.nn.Module,
    low: torch.nn.Module,
    mapping: np.ndarray,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    p1: float = 0.10,
    p2: float = 0.20,
    kappa: float = 0.3,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Attack each image of ``x`` (N, 3, H, W) in [0, 1] whose true CIFAR-10 class is ``labels``.

    Returns the adversarial batch (8-bit values, float tensor) and info: ``success`` (accepted
    with a wrong label on the quantised image, per the comparator), ``target``, ``steps_used``.
    """
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    gen = torch.Generator().manual_seed(seed)
    device = next(high.parameters()).device
    mapping_np = np.array(mapping)  # a writable copy for torch
    mapping_t = torch.as_tensor(mapping_np, dtype=torch.long, device=device)
    out = torch.empty_like(x)
    success = np.zeros(len(x), bool)
    targets = np.zeros(len(x), np.int64)
    steps_used = np.zeros(len(x), np.int64)
    log_p1, log_p2 = math.log(max(p1, 1e-12)), math.log(max(p2, 1e-12))

    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
        n = len(xb)
        with torch.no_grad():
            ph = F.softmax(high.classify(xb), 1)
            pl = F.softmax(low.classify(xb), 1)
            t = choose_targets(ph, pl, yb, mapping_t)
        member = mapping_t[None, :] == t[:, None]
        if random_start:
            delta = (torch.rand(xb.shape, generator=gen) * 2 - 1).to(device) * eps
        else:
            delta = torch.zeros_like(xb)
        delta = ((xb + delta).clamp(0, 1) - xb).requires_grad_(True)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        best = xb.clone()
        used = torch.zeros(n, dtype=torch.long)
        for step in range(steps + 1):
            xa = _quantise((xb + delta).clamp(0, 1))
            logits_h = high.classify(xa)
            logits_l = low.classify(xa)
            lph, lpl = F.log_softmax(logits_h, 1), F.log_softmax(logits_l, 1)
            with torch.no_grad():
                top_h = lph.exp().topk(5, dim=1)
                top_l = lpl.exp().topk(2, dim=1)
                cmp = compare(top_h.indices.cpu().numpy(), top_h.values.cpu().numpy(),
                              top_l.indices.cpu().numpy(), top_l.values.cpu().numpy(),
                              mapping_np, p1, p2)
                ok = torch.as_tensor(cmp.accepted & (cmp.label != yb.cpu().numpy()), device=device)
                newly = ok & ~done
                best[newly] = xa.detach()[newly]
                used[newly.cpu()] = step
                done |= ok
            if bool(done.all()) or step == steps:
                break
            loss = (
                F.relu(log_p1 + kappa - _class_max(lph, member))
                + F.relu(log_p2 + kappa - lpl.gather(1, t[:, None]).squeeze(1))
                + F.relu(lpl.gather(1, yb[:, None]).squeeze(1) - (log_p2 - kappa))
            )
            grad, = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                keep = (~done).float().view(-1, 1, 1, 1)
                delta -= keep * alpha * grad.sign()
                delta.clamp_(-eps, eps)
                delta.copy_((xb + delta).clamp(0, 1) - xb)
        with torch.no_grad():
            final = torch.round((xb + delta).clamp(0, 1) * 255.0) / 255.0
            best[~done] = final[~done]
            used[(~done).cpu()] = steps
        out[start:start + n] = best.detach().cpu()
        success[start:start + n] = done.cpu().numpy()
        targets[start:start + n] = t.cpu().numpy()
        steps_used[start:start + n] = used.numpy()
    return out, {"success": success, "target": targets, "steps_used": steps_used,
                 "eps": eps, "steps": steps, "step_size": alpha, "kappa": kappa}
