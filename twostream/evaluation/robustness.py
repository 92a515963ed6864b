"""The L-Net's own robustness: clean, PGD and AutoAttack accuracy at its 32x32 input.

An L-inf perturbation of the full-size image reaches the L-Net as one of at most the same size
after the antialiased resize, so the defence can be no more robust than its L-Net is here.
Images are a labelled ImageFolder (the CIFAR-10 test JPEGs), decoded by the serving path's
decoder and brought to the stream's input by its own resize
(:func:`twostream.training.data.load_folder`); the attacks run on [0, 1] pixels and the stream
normalises inside.

* **clean**: top-1 accuracy on every loaded image;
* **PGD**: :func:`twostream.training.adversarial.pgd` (signed steps of ``2.5 * eps / steps``
  from a uniform random start), ``restarts`` times; each restart attacks only the images no
  earlier restart has fooled, so an image counts as robust when the clean prediction is right and
  no restart fools it;
* **AutoAttack**: ART's :class:`~art.attacks.evasion.AutoAttack` on the true labels with an
  explicit attack list (APGD-CE, APGD-DLR and Square, their budgets recorded), on a seeded subset
  nested in the PGD subset.

Subsets are nested and seeded: one permutation of the loaded images; PGD takes its first
``pgd_n``, AutoAttack its first ``aa_n``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from tqdm import tqdm

log = logging.getLogger(__name__)

ROBUSTNESS_SCHEMA = pa.schema([
    ("weights", pa.string()),
    ("model", pa.string()),
    ("attack", pa.string()),  # clean | pgd | autoattack
    ("eps", pa.float64()),  # L-inf, [0, 1] pixel units (0 for clean)
    ("eps_255", pa.string()),  # e.g. "8/255"
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("accuracy", pa.float64()),
    ("wall_s", pa.float64()),
    ("params", pa.string()),  # JSON: steps, restarts, budgets, seed
])


@dataclass(frozen=True)
class RobustnessSettings:
    """What to measure: PGD-``pgd_steps`` x ``pgd_restarts`` on ``pgd_n`` images and AutoAttack
    (APGD-CE and APGD-DLR with ``aa_iters`` iterations x ``aa_restarts`` starts, then Square
    with ``aa_square_queries`` queries; 0 leaves Square out) on ``aa_n`` images, per epsilon."""

    eps: tuple[float, ...] = (4 / 255, 8 / 255)
    pgd_n: int | None = 1000
    pgd_steps: int = 20
    pgd_restarts: int = 5
    aa_n: int | None = 500
    aa_iters: int = 100
    aa_restarts: int = 1
    aa_square_queries: int = 1000
    seed: int = 0
    batch_size: int = 256


def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Top-1 class of each image of ``x`` ((N, 3, h, w) uint8 or [0, 1] float)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            out.append(model(xb.float() / 255.0 if xb.dtype == torch.uint8 else xb).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def pgd_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int,
               seed: int = 0, batch_size: int = 256, progress: bool = False) -> Tensor:
    """(N,) bool: right on the clean image and not fooled by any of ``restarts`` PGD runs."""
    from twostream.training.adversarial import pgd

    gen = torch.Generator().manual_seed(seed)
    alive = predict(model, x, batch_size) == y
    for restart in range(restarts):
        idx = torch.nonzero(alive).squeeze(1)
        for start in tqdm(range(0, len(idx), batch_size), desc=f"PGD-{steps} {eps * 255:g}/255 "
                          f"restart {restart + 1}/{restarts}", unit="batch", leave=False, disable=not progress):
            part = idx[start:start + batch_size]
            xb = x[part].float() / 255.0 if x.dtype == torch.uint8 else x[part]
            adv = pgd(model, xb, y[part], eps, steps, gen, restarts=1)
            alive[part] = predict(model, adv, batch_size) == y[part]
    return alive


def autoattack_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, iters: int = 100,
                      restarts: int = 1, square_queries: int = 1000, seed: int = 0,
                      batch_size: int = 256) -> Tensor:
    """(N,) bool: right on the clean image and on ART AutoAttack's output (untargeted, L-inf ``eps``)."""
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    from twostream.attacks.standard import art_classifier, seed_everything

    seed_everything(seed)
    h, w = x.shape[-2:]
    classifier = art_classifier(model, (3, int(h), int(w)), 10, resize=False, batch_size=batch_size)
    attacks = [AutoProjectedGradientDescent(estimator=classifier, norm=np.inf, eps=eps, eps_step=2 * eps,
                                            max_iter=iters, targeted=False, nb_random_init=restarts,
                                            batch_size=batch_size, loss_type=loss, verbose=False)
               for loss in ("cross_entropy", "difference_logits_ratio")]
    if square_queries:
        attacks.append(SquareAttack(estimator=classifier, norm=np.inf, eps=eps, max_iter=square_queries,
                                    p_init=0.8, nb_restarts=1, batch_size=batch_size, verbose=False))
    attack = AutoAttack(estimator=classifier, norm=np.inf, eps=eps, eps_step=2 * eps, attacks=attacks,
                        batch_size=batch_size)
    x01 = (x.float() / 255.0 if x.dtype == torch.uint8 else x).numpy().astype(np.float32)
    adv = attack.generate(x01, y=y.numpy())
    linf = float(np.abs(adv - x01).max()) if len(adv) else 0.0
    if linf > eps + 1e-6:
        raise RuntimeError(f"AutoAttack left the eps ball: L-inf {linf:.6f} > {eps:.6f}")
    right = predict(model, x, batch_size) == y
    return right & (predict(model, torch.from_numpy(adv), batch_size) == y)


def _eps_text(eps: float) -> str:
    scaled = eps * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{eps:g}"


def measure(model: nn.Module, x: Tensor, y: Tensor, settings: RobustnessSettings, *, weights: str,
            model_name: str, progress: bool = False) -> pa.Table:
    """Rows of :data:`ROBUSTNESS_SCHEMA` for one model on ``x`` (N, 3, h, w) uint8, ``y`` (N,)."""
    s = settings
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seed))
    rows: list[dict[str, Any]] = []

    def row(attack: str, eps: float, robust: Tensor, started: float, params: dict[str, Any]) -> None:
        n, correct = int(robust.numel()), int(robust.sum())
        rows.append({"weights": weights, "model": model_name, "attack": attack, "eps": eps,
                     "eps_255": _eps_text(eps) if eps else "0", "n": n, "correct": correct,
                     "accuracy": correct / n if n else float("nan"),
                     "wall_s": round(time.perf_counter() - started, 1),
                     "params": json.dumps({**params, "seed": s.seed}, sort_keys=True)})
        log.info("%s %s %s: %d/%d = %.1f%%", weights, attack, _eps_text(eps), correct, n,
                 100 * correct / max(n, 1))

    started = time.perf_counter()
    row("clean", 0.0, predict(model, x, s.batch_size) == y, started, {})
    pgd_idx = order[: s.pgd_n]
    aa_idx = order[: s.aa_n]
    for eps in s.eps:
        if s.pgd_n != 0:
            started = time.perf_counter()
            robust = pgd_robust(model, x[pgd_idx], y[pgd_idx], eps, s.pgd_steps, s.pgd_restarts, s.seed,
                                s.batch_size, progress)
            row("pgd", eps, robust, started, {"steps": s.pgd_steps, "restarts": s.pgd_restarts,
                                              "step_size": 2.5 * eps / s.pgd_steps})
        if s.aa_n != 0:
            started = time.perf_counter()
            robust = autoattack_robust(model, x[aa_idx], y[aa_idx], eps, iters=s.aa_iters,
                                       restarts=s.aa_restarts, square_queries=s.aa_square_queries,
                                       seed=s.seed, batch_size=s.batch_size)
            attacks = ["APGD-CE", "APGD-DLR"] + (["Square"] if s.aa_square_queries else [])
            row("autoattack", eps, robust, started,
                {"library": "ART AutoAttack", "attacks": attacks, "apgd_iters": s.aa_iters,
                 "apgd_restarts": s.aa_restarts, "square_queries": s.aa_square_queries})
    return pa.Table.from_pylist(rows, schema=ROBUSTNESS_SCHEMA)


def markdown(table: pa.Table, meta: dict[str, str] | None = None) -> str:
    """One line per weight file: clean accuracy, then each (attack, eps) accuracy with its n."""
    data = table.to_pylist()
    columns = list(dict.fromkeys((r["attack"], r["eps_255"]) for r in data))
    names = {"clean": "clean", "pgd": "PGD", "autoattack": "AutoAttack"}
    head = [f"{names.get(a, a)}" + ("" if a == "clean" else f" {e}") for a, e in columns]
    lines = ["| weights | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for weights in dict.fromkeys(r["weights"] for r in data):
        cells = {(r["attack"], r["eps_255"]): r for r in data if r["weights"] == weights}
        values = [f"{100 * cells[c]['accuracy']:.1f}% (n={cells[c]['n']:,})" if c in cells else "—" for c in columns]
        lines.append(f"| {weights} | " + " | ".join(values) + " |")
    lines += [""] + [f"- {k}: {v}" for k, v in (meta or {}).items()]
    return "\n".join(lines) + "\n"
