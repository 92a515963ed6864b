"""Black-box query attacks (issue 30), declared ART-style: a name, its paper, what the attacker
must see of each answer, its defaults; :func:`run_blackbox` runs one through ART against any
``predict`` function (the harness, :mod:`twostream.evaluation.blackbox`, supplies the oracle).

| name | paper | kind | sees | implementation |
| --- | --- | --- | --- | --- |
| ``hsj`` | Chen, Jordan & Wainwright, *HopSkipJumpAttack* (IEEE S&P 2020) | decision | label or verdict | ART ``HopSkipJump`` (L-inf) |
| ``boundary`` | Brendel, Rauber & Bethge, *Decision-Based Adversarial Attacks* (ICLR 2018) | decision | label or verdict | ART ``BoundaryAttack`` (L2 walk) |
| ``square`` | Andriushchenko et al., *Square Attack* (ECCV 2020) | score | full | ART ``SquareAttack`` (L-inf) |
| ``simba`` | Guo et al., *Simple Black-box Adversarial Attacks* (ICML 2019) | score | full | ART ``SimBA`` (DCT basis) |

SimBA's step is 2.0 on an orthonormal DCT coefficient of the whole 256x256 image (about 4/255 per
pixel): ART's 0.2 changes pixels by well under one 8-bit level, so every upload rounds back to the
same image (200 queries, 1 distinct upload; 2.0: 200 distinct).

Decision-based attacks start from an image already answered with another label (another
photograph, ``x_init``) and walk towards the original; score-based ones start at the original and
keep every query inside the L-inf ball (``project``: the attacker projects before it sends).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BlackBoxAttack:
    """One attack's declaration."""

    name: str
    paper: str
    kind: str  # "decision" (needs a label per query) or "score" (needs scores per class)
    views: tuple[str, ...]  # the answer details it can work from
    project: bool  # every query is projected onto the L-inf ball of the original before it is sent
    defaults: dict[str, Any] = field(default_factory=dict)


BLACKBOX_ATTACKS: dict[str, BlackBoxAttack] = {
    "hsj": BlackBoxAttack(
        "hsj", "Chen, Jordan & Wainwright, HopSkipJumpAttack, IEEE S&P 2020", "decision",
        ("label", "verdict"), False,
        {"norm": "inf", "max_iter": 10_000, "max_eval": 1_000, "init_eval": 100, "batch_size": 64}),
    "boundary": BlackBoxAttack(
        "boundary", "Brendel, Rauber & Bethge, Decision-Based Adversarial Attacks, ICLR 2018", "decision",
        ("label", "verdict"), False,
        {"max_iter": 10_000, "delta": 0.01, "epsilon": 0.01, "num_trial": 25, "sample_size": 20,
         "batch_size": 64}),
    "square": BlackBoxAttack(
        "square", "Andriushchenko, Croce, Flammarion & Hein, Square Attack, ECCV 2020", "score",
        ("full",), True, {"max_iter": 10_000, "p_init": 0.05, "nb_restarts": 1}),
    "simba": BlackBoxAttack(
        "simba", "Guo, Gardner, You, Wilson & Weinberger, Simple Black-box Adversarial Attacks, ICML 2019",
        "score", ("full",), True, {"attack": "dct", "max_iter": 10_000, "epsilon": 2.0, "freq_dim": 32,
                                   "order": "random"}),
}
BLACKBOX = tuple(BLACKBOX_ATTACKS)


def attack_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of ``name`` with ``overrides``; an unknown attack or parameter is an error."""
    if name not in BLACKBOX_ATTACKS:
        raise KeyError(f"unknown black-box attack {name!r}; known: {', '.join(BLACKBOX)}")
    params = dict(BLACKBOX_ATTACKS[name].defaults)
    for key, value in (overrides or {}).items():
        if key not in params:
            raise KeyError(f"black-box attack {name!r} has no parameter {key!r} (has {', '.join(params)})")
        params[key] = value
    return params


def run_blackbox(
    name: str,
    x: np.ndarray,
    label: int,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    eps: float,
    nb_classes: int = 10,
    params: dict[str, Any] | None = None,
    x_init: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Run attack ``name`` on one (H, W, 3) float image in [0, 1] with true class ``label``.

    ``predict``: (N, H, W, 3) float -> (N, nb_classes) scores, the attacker's view of the oracle
    (it may raise to end the run: a spent budget, a success). ``eps``: the L-inf budget of the
    score-based attacks. ``x_init``: the starting image of the decision-based ones. Returns the
    attack's final image (the harness judges success from the answers, not from this).
    """
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    p = attack_params(name, params)
    np.random.seed(seed)  # ART draws from NumPy's global generator

    def predict_first(z: np.ndarray) -> np.ndarray:  # ART works channels first (SimBA's DCT needs it)
        return predict(np.ascontiguousarray(z.transpose(0, 2, 3, 1)))

    classifier = BlackBoxClassifierNeuralNetwork(predict_first, (x.shape[2], *x.shape[:2]), nb_classes,
                                                 channels_first=True, clip_values=(0.0, 1.0))
    batch = x.transpose(2, 0, 1)[None].astype(np.float32)
    y = np.eye(nb_classes, dtype=np.float32)[[label]]
    init = None if x_init is None else x_init.transpose(2, 0, 1)[None].astype(np.float32)
    return _generate(name, p, classifier, batch, y, init, eps)[0].transpose(1, 2, 0)


def _generate(name: str, p: dict[str, Any], classifier: Any, batch: np.ndarray, y: np.ndarray,
              init: np.ndarray | None, eps: float) -> np.ndarray:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SimBA, SquareAttack

    if name == "hsj":
        attack = HopSkipJump(classifier, batch_size=p["batch_size"], norm=np.inf if p["norm"] == "inf" else 2,
                             max_iter=p["max_iter"], max_eval=p["max_eval"], init_eval=p["init_eval"],
                             verbose=False)
        return attack.generate(batch, y, x_adv_init=init)
    if name == "boundary":
        attack = BoundaryAttack(classifier, batch_size=p["batch_size"], targeted=False, delta=p["delta"],
                                epsilon=p["epsilon"], max_iter=p["max_iter"], num_trial=p["num_trial"],
                                sample_size=p["sample_size"], verbose=False)
        return attack.generate(batch, y, x_adv_init=init)
    if name == "square":
        attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=p["max_iter"], p_init=p["p_init"],
                              nb_restarts=p["nb_restarts"], batch_size=1, verbose=False)
        return attack.generate(batch, y)
    attack = SimBA(classifier, attack=p["attack"], max_iter=p["max_iter"], epsilon=p["epsilon"],
                   freq_dim=p["freq_dim"], order=p["order"], verbose=False)
    return attack.generate(batch, y)
