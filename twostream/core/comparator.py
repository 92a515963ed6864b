"""Algorithm 1 (SPEC 2): the comparator that is both detector and classifier.

Candidates are pairs ``(i, j)`` of an H-Net top-5 entry and an L-Net top-2 entry whose
mapped CIFAR-10 labels agree (never ``other``) with ``P_high[i] >= p1`` and
``P_low[j] >= p2``. No candidate: rejected. Otherwise the candidate with the largest
``P_high[i] * P_low[j]`` wins, ties going to the smallest ``i`` and then the smallest ``j``.

:func:`compare` is the vectorised hot path; :func:`compare_one` is the plain per-image
reference it must agree with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OTHER = -1  # mapping value of ImageNet classes outside the ten CIFAR-10 categories


@dataclass(frozen=True)
class Comparison:
    """Comparator output for a batch of N images (arrays of length N)."""

    accepted: np.ndarray  # bool
    label: np.ndarray  # int8 CIFAR-10 index, -1 when rejected
    high_rank: np.ndarray  # int8 winning H-Net top-5 position i, -1 when rejected
    low_rank: np.ndarray  # int8 winning L-Net top-2 position j, -1 when rejected
    imagenet_index: np.ndarray  # int32 ImageNet class of the winner, -1 when rejected
    score: np.ndarray  # float32 P_high[i] * P_low[j] of the winner, 0 when rejected


def compare(
    high_idx: np.ndarray,
    high_prob: np.ndarray,
    low_idx: np.ndarray,
    low_prob: np.ndarray,
    mapping: np.ndarray,
    p1: float = 0.10,
    p2: float = 0.20,
) -> Comparison:
    """Apply Algorithm 1 to a batch.

    ``high_idx``/``high_prob``: (N, 5) ImageNet indices and probabilities, rank order.
    ``low_idx``/``low_prob``: (N, 2) CIFAR-10 indices and probabilities, rank order.
    ``mapping``: (1000,) CIFAR-10 index per ImageNet class, ``OTHER`` (-1) outside the ten.
    """
    high_idx = np.asarray(high_idx)
    low_idx = np.asarray(low_idx)
    # float64 throughout, like the reference: thresholds and products compare exactly.
    high_prob = np.asarray(high_prob, dtype=np.float64)
    low_prob = np.asarray(low_prob, dtype=np.float64)
    n, k_high = high_idx.shape
    k_low = low_idx.shape[1]

    mapping = np.asarray(mapping)
    mapped = mapping[high_idx]  # (N, 5) CIFAR-10 index of each H-Net class
    high_ok = (mapped != OTHER) & (high_prob >= np.float64(p1))
    # Non-candidates score -1, below every product of probabilities; argmax returns the first
    # maximum in row-major (i, j) order: smallest i, then smallest j.
    scores = np.empty((n, k_high, k_low))
    for j in range(k_low):
        low_label = low_idx[:, j : j + 1].astype(mapped.dtype)
        candidate = high_ok & (mapped == low_label) & (low_prob[:, j : j + 1] >= np.float64(p2))
        scores[:, :, j] = np.where(candidate, high_prob * low_prob[:, j : j + 1], -1.0)
    flat = scores.reshape(n, k_high * k_low)
    best = flat.argmax(axis=1)
    rows = np.arange(n)
    best_score = flat[rows, best]
    accepted = best_score >= 0.0

    i = (best // k_low).astype(np.int8)
    j = (best % k_low).astype(np.int8)
    return Comparison(
        accepted=accepted,
        label=np.where(accepted, mapped[rows, i], -1).astype(np.int8),
        high_rank=np.where(accepted, i, -1).astype(np.int8),
        low_rank=np.where(accepted, j, -1).astype(np.int8),
        imagenet_index=np.where(accepted, high_idx[rows, i], -1).astype(np.int32),
        score=np.where(accepted, best_score, 0.0).astype(np.float32),
    )


def compare_one(
    high: list[tuple[int, float]],
    low: list[tuple[int, float]],
    mapping: dict[int, int] | np.ndarray,
    p1: float = 0.10,
    p2: float = 0.20,
) -> tuple[int, int, int, float] | None:
    """Reference Algorithm 1 for one image, written as plainly as possible.

    ``high``: top-5 ``(imagenet_index, prob)``; ``low``: top-2 ``(cifar_index, prob)``.
    Returns ``(i, j, cifar_label, score)`` of the winning candidate, or ``None`` (rejected).
    """
    best: tuple[int, int, int, float] | None = None
    for i, (y_high, p_high) in enumerate(high):
        label = int(mapping[y_high])
        if label == OTHER or p_high < p1:
            continue
        for j, (y_low, p_low) in enumerate(low):
            if y_low != label or p_low < p2:
                continue
            score = p_high * p_low
            if best is None or score > best[3]:
                best = (i, j, label, score)
    return best
