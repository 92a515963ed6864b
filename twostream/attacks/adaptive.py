"""Adaptive white-box attack on the whole defence (SPEC 4; not in the paper).

One L-inf perturbation of the full-resolution image is optimised against both streams at once,
each stream's resize inside the graph (``stream.classify``), with Algorithm 1's thresholds as
hinge terms. The aim is an image the comparator *accepts with a wrong label*. For a CIFAR-10
class ``t != y``:

* H-Net: ``max_{i: M(i)=t} log P_high[i] >= log p1 + kappa`` (some ImageNet class of ``t`` passes p1);
* L-Net: ``log P_low[t] >= log p2 + kappa`` (t is an L-Net candidate) and
  ``log P_low[y] <= log p2 - kappa`` (the true class can no longer form a candidate pair);

loss = sum of the three hinges, minimised by signed-gradient PGD (random start, projection to
the eps ball and [0, 1]). Each step's forward pass runs on the 8-bit quantised image (straight-
through), so "accepted with a wrong label" is checked by the real comparator on exactly the
pixels an upload would have; an image is frozen at its first success.

Variants and budget:

* **targeted** (default): ``t`` is fixed per run. Wrong classes that map to some ImageNet class
  are ranked by their clean ``max_{i: M(i)=t} P_high[i] * P_low[t]``; ``targets`` = how many of
  them are tried in turn (1: the most likely wrong class, the original attack; 8: every one);
* **untargeted**: ``t`` is re-chosen at every step as the wrong class with the largest current
  ``max_i log P_high[i] + log P_low[t]`` (the one closest to being accepted);
* ``restarts`` random starts per target. Runs go in the order (target rank, restart); a run
  attacks only the images no earlier run has won, and the first run draws the same random start
  as a single-run attack, so more restarts or targets never lose a success. Per image the result
  is the first successful run's image, else the run with the lowest final loss;
* **convergence**: ``success_step`` records the step of each image's success within its run;
  :func:`success_at` turns it into success against steps (20 / 50 / 100 / 200). With one run
  (one target, one restart) that is exactly the success of a shorter attack of the same step size
  (``step_size`` fixed; the default ``2.5 * eps / steps`` changes with ``steps``); with several
  runs it is a lower bound (a shorter run would hand unsolved images to the next run sooner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from twostream.core.comparator import compare
from twostream.core.labels import CIFAR10_LABELS

CHECKPOINTS = (20, 50, 100, 200)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Straight-through 8-bit rounding: forward sees round(x*255)/255, gradient is identity."""
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def _class_scores(logp_high: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(N, C): per CIFAR-10 class the max of ``logp_high`` (N, 1000) over its ImageNet classes
    (``members``: (C, 1000) bool; -inf for a class without any)."""
    return torch.stack([logp_high.masked_fill(~m, -math.inf).max(dim=1).values for m in members], dim=1)


def rank_targets(p_high: torch.Tensor, p_low: torch.Tensor, labels: torch.Tensor,
                 members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrong classes per image by clean ``max_{i: M(i)=t} P_high[i] * P_low[t]``, best first.

    Returns ``(order (N, C), valid (N,))``: ``order[:, k]`` is the k-th target; only the first
    ``valid`` of a row are targets (classes that map to no ImageNet class, and the true one, are not).
    """
    score = _class_scores(torch.log(p_high + 1e-12), members) + torch.log(p_low + 1e-12)
    score[torch.arange(len(score)), labels.clamp(min=0)] = -math.inf
    return score.argsort(dim=1, descending=True), torch.isfinite(score).sum(dim=1)


@dataclass
class _Thresholds:
    log_p1: float
    log_p2: float
    p1: float
    p2: float
    kappa: float


def _hinge(lph: torch.Tensor, lpl: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
           members: torch.Tensor, th: _Thresholds) -> torch.Tensor:
    """Per image the sum of the three hinges for target ``t`` (0 when all hold with margin kappa)."""
    high_t = _class_scores(lph, members).gather(1, t[:, None]).squeeze(1)
    return (F.relu(th.log_p1 + th.kappa - high_t)
            + F.relu(th.log_p2 + th.kappa - lpl.gather(1, t[:, None]).squeeze(1))
            + F.relu(lpl.gather(1, y[:, None]).squeeze(1) - (th.log_p2 - th.kappa)))


def _pgd_run(high: torch.nn.Module, low: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             target: torch.Tensor | None, delta: torch.Tensor, members: torch.Tensor,
             mapping: np.ndarray, th: _Thresholds, eps: float, steps: int, alpha: float,
             ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """One PGD run from ``delta``; ``target`` None: untargeted (re-chosen each step).

    Returns (8-bit image per input: at its success, else after the last step; success; step of
    success (-1 if none); final loss (0 on success)). Only unsolved images are computed."""
    n = len(x)
    delta = delta.clone().requires_grad_(True)
    out = torch.empty_like(x)
    success = np.zeros(n, bool)
    step_of = np.full(n, -1, np.int64)
    final_loss = np.zeros(n, np.float64)
    active = torch.arange(n, device=x.device)
    for step in range(steps + 1):
        xa = _quantise((x[active] + delta[active]).clamp(0, 1))
        lph = F.log_softmax(high.classify(xa), 1)
        lpl = F.log_softmax(low.classify(xa), 1)
        ya = y[active]
        with torch.no_grad():
            if target is None:
                score = _class_scores(lph, members) + lpl
                score[torch.arange(len(ya)), ya] = -math.inf
                t = score.argmax(dim=1)
            else:
                t = target[active]
            top_h = lph.exp().topk(5, dim=1)
            top_l = lpl.exp().topk(2, dim=1)
            cmp = compare(top_h.indices.cpu().numpy(), top_h.values.cpu().numpy(),
                          top_l.indices.cpu().numpy(), top_l.values.cpu().numpy(), mapping, th.p1, th.p2)
            ok = cmp.accepted & (cmp.label != ya.cpu().numpy())
        loss = _hinge(lph, lpl, ya, t, members, th)
        idx = active.cpu().numpy()
        last = step == steps
        settle = ok | last
        out[active[torch.as_tensor(settle, device=x.device)]] = xa.detach()[torch.as_tensor(settle, device=x.device)]
        success[idx[ok]] = True
        step_of[idx[ok]] = step
        final_loss[idx[~ok]] = loss.detach().cpu().numpy()[~ok]
        if last or ok.all():
            break
        keep = torch.as_tensor(~ok, device=x.device)
        grad, = torch.autograd.grad(loss[keep].sum(), delta)
        with torch.no_grad():
            delta -= alpha * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
        active = active[keep]
    return out, success, step_of, final_loss


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
    restarts: int = 1,
    targeted: bool = True,
    targets: int = 1,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Attack each image of ``x`` (N, 3, H, W) in [0, 1] whose true CIFAR-10 class is ``labels``.

    Returns the adversarial batch (8-bit values, float tensor) and info: ``success`` (accepted
    with a wrong label on the quantised image, per the comparator), ``target`` (of the winning run,
    else of the first; -1 untargeted), ``success_step`` (-1: none), ``success_run`` (0-based run in
    the order (target rank, restart); -1: none), ``steps_used`` (steps spent, summed over runs).
    """
    if steps < 0 or restarts < 1 or targets < 1:
        raise ValueError(f"adaptive attack needs steps >= 0, restarts >= 1, targets >= 1; "
                         f"got {steps}, {restarts}, {targets}")
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    gen = torch.Generator().manual_seed(seed)
    device = next(high.parameters()).device
    mapping_np = np.array(mapping)  # a writable copy for torch
    mapping_t = torch.as_tensor(mapping_np, dtype=torch.long, device=device)
    members = torch.stack([mapping_t == c for c in range(len(CIFAR10_LABELS))])
    th = _Thresholds(math.log(max(p1, 1e-12)), math.log(max(p2, 1e-12)), p1, p2, kappa)
    runs = [(k, r) for k in range(targets if targeted else 1) for r in range(restarts)]

    out = torch.empty_like(x)
    success = np.zeros(len(x), bool)
    target_out = np.full(len(x), -1, np.int64)
    success_step = np.full(len(x), -1, np.int64)
    success_run = np.full(len(x), -1, np.int64)
    steps_used = np.zeros(len(x), np.int64)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
        n = len(xb)
        with torch.no_grad():
            order, valid = rank_targets(F.softmax(high.classify(xb), 1), F.softmax(low.classify(xb), 1),
                                        yb, members)
        best = torch.round(xb * 255.0) / 255.0
        best_loss = np.full(n, np.inf)
        done = np.zeros(n, bool)
        if targeted:
            target_out[start:start + n] = order[:, 0].cpu().numpy()
        for run, (rank, _) in enumerate(runs):
            todo = ~done & (valid.cpu().numpy() > rank if targeted else True)
            if not todo.any():
                continue
            sel = torch.as_tensor(np.flatnonzero(todo), device=device)
            xs = xb[sel]
            if random_start:
                delta = (torch.rand(xs.shape, generator=gen) * 2 - 1).to(device) * eps
            else:
                delta = torch.zeros_like(xs)
            delta = (xs + delta).clamp(0, 1) - xs
            t = order[sel, rank] if targeted else None
            adv, ok, step_of, loss = _pgd_run(high, low, xs, yb[sel], t, delta, members, mapping_np,
                                              th, eps, steps, alpha)
            idx = sel.cpu().numpy()
            steps_used[start + idx] += np.where(ok, step_of, steps)
            better = ok | (loss < best_loss[idx])
            best[sel[torch.as_tensor(better, device=device)]] = adv[torch.as_tensor(better, device=device)]
            best_loss[idx[better]] = np.where(ok, 0.0, loss)[better]
            won = idx[ok]
            done[won] = True
            success_step[start + won] = step_of[ok]
            success_run[start + won] = run
            if targeted:
                target_out[start + won] = t[torch.as_tensor(ok, device=device)].cpu().numpy()
        out[start:start + n] = best.detach().cpu()
        success[start:start + n] = done
    return out, {"success": success, "target": target_out, "success_step": success_step,
                 "success_run": success_run, "steps_used": steps_used, "eps": eps, "steps": steps,
                 "step_size": alpha, "kappa": kappa, "restarts": restarts, "targeted": targeted,
                 "targets": targets, "runs": len(runs), **success_at(success_step, steps)}


def success_at(success_step: np.ndarray, steps: int, checkpoints: tuple[int, ...] = CHECKPOINTS) -> dict[str, float]:
    """``{"success_at_<k>": share of images won within k steps}`` for each checkpoint up to
    ``steps``, and at ``steps`` itself (the convergence check)."""
    ks = sorted({k for k in checkpoints if k <= steps} | {steps})
    won = np.asarray(success_step)
    return {f"success_at_{k}": float(((won >= 0) & (won <= k)).mean()) if len(won) else 0.0 for k in ks}
