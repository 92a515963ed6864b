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

The attacker who knows the stateful query detector (:mod:`twostream.core.query_detector`)
re-randomises every query on its own (:func:`adaptive_perturbation`, ``ADAPTIVE_MODES``), shaping
the difference between two queries so that the detector's rules do not call them a match: noise,
or offsets per block that look like JPEG requantization (Feng et al., 2023, adaptive rejection
sampling, evade stateful detectors the same way: by knowing their rules).
"""

from __future__ import annotations

import io
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


ADAPTIVE_MODES: dict[str, str] = {
    "noise": "fresh uniform noise in [-A, A] on every value",
    "jpeg": "a fresh offset in [-A, A] per 8x8 block, the same on R, G and B (JPEG-like: moves the channels "
            "together, steps at the block grid)",
    "grid16": "the same on a 16x16 grid",
    "blockrgb": "a fresh offset in [-A, A] per 8x8 block and channel",
    "blockac": "jpeg:A plus fresh +-1 per pixel, the same on R, G and B (varies inside the blocks, as a "
               "re-encode's AC error does)",
    "texture": "jpeg:A with each block's offset scaled by its texture (0 on flat blocks, A on the most textured "
               "tenth: follows the texture, as requantization error does)",
    "realjpeg": "the query re-encoded as a real JPEG at a fresh quality in [A, 95], 4:2:0 or 4:4:4 (A is a "
                "quality here, and takes nothing from the L-inf budget: the projection keeps the upload inside)",
}


def adaptive_perturbation(mode: str, rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """The detector-aware attacker's per-query re-randomisation ``KIND:A`` (``ADAPTIVE_MODES``; A
    in 0..255 units) as ``(apply, margin)``: ``apply`` maps a uint8 (H, W, 3) upload to the
    re-randomised one, ``margin`` is the L-inf it takes from the attack's budget (the score-based
    attacks spend ``eps - margin`` on their own steps). A bad mode is a ValueError naming it."""
    kind, _, amount = mode.partition(":")
    try:
        a = int(amount)
    except ValueError:
        a = -1
    if kind not in ADAPTIVE_MODES or a < 0 or (kind == "realjpeg" and not 1 <= a <= 95):
        raise ValueError(f"adaptive mode {mode!r}: expected KIND:A with KIND one of {', '.join(ADAPTIVE_MODES)} "
                         "and A >= 0 (a quality 1..95 for realjpeg)")

    def blocks(h: int, w: int, side: int, channels: int) -> np.ndarray:
        offsets = rng.integers(-a, a + 1, (-(-h // side), -(-w // side), channels))
        return np.repeat(np.repeat(offsets, side, 0), side, 1)[:h, :w]

    def apply(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if kind == "realjpeg":
            from PIL import Image

            buf = io.BytesIO()
            quality, subsampling = int(rng.integers(a, 96)), int(rng.choice([0, 2]))
            Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=subsampling)
            with Image.open(io.BytesIO(buf.getvalue())) as im:
                return np.asarray(im.convert("RGB"))
        if kind == "noise":
            delta = rng.integers(-a, a + 1, image.shape)
        elif kind == "blockrgb":
            delta = blocks(h, w, 8, 3)
        else:
            delta = blocks(h, w, 16 if kind == "grid16" else 8, 1)
            if kind == "blockac":
                delta = delta + rng.integers(-1, 2, (h, w, 1))
            elif kind == "texture":
                delta = np.round(delta * _block_texture(image)).astype(np.int16)
        return np.clip(image.astype(np.int16) + delta, 0, 255).astype(np.uint8)

    return apply, 0 if kind == "realjpeg" else a + (kind == "blockac")


def _block_texture(image: np.ndarray) -> np.ndarray:
    """Each 8x8 block's mean horizontal luma step, scaled to [0, 1] by the 90th percentile, as an
    (H, W, 1) map."""
    h, w = image.shape[:2]
    luma = image.astype(np.float32).mean(axis=2)
    step = np.zeros((-(-h // 8) * 8, -(-w // 8) * 8), np.float32)
    step[:h, : w - 1] = np.abs(np.diff(luma, axis=1))
    per_block = step.reshape(step.shape[0] // 8, 8, step.shape[1] // 8, 8).mean(axis=(1, 3))
    per_block = np.clip(per_block / max(float(np.percentile(per_block, 90)), 1e-6), 0, 1)
    return np.repeat(np.repeat(per_block, 8, 0), 8, 1)[:h, :w, None]
