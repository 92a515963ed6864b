"""Algorithm 2 on NumPy arrays: :func:`advance` (one image for each of many independent sources,
the Fig. 5 simulation) and :func:`scan` (every event of many sources at once, sorted by source and
time: the batch job's reduce). Both equal :class:`~twostream.core.reputation.ledger.ReputationLedger`
(tests/core/test_reputation_implementations.py)."""

from __future__ import annotations

import numpy as np

from twostream.core.config import ReputationConfig


def advance(
    cc: np.ndarray, blacklisted: np.ndarray, rejected: np.ndarray, config: ReputationConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image for each entry (an independent source): the rules of :meth:`ReputationLedger.observe`.

    Returns new ``(cc, blacklisted, blocked)`` arrays; the inputs are not modified. A response is
    blocked exactly when the source is on the list after the image: it stayed on, or just joined.
    """
    cc = np.asarray(cc)
    rejected = np.asarray(rejected, dtype=bool)
    new_cc = np.where(rejected, np.minimum(cc + config.step_up, config.cap), np.maximum(cc - config.step_down, 0))
    listed = np.where(blacklisted, new_cc > 0, new_cc >= config.threshold)
    return new_cc, listed, listed.copy()


def scan(pos: np.ndarray, step: np.ndarray, cc0: np.ndarray, listed0: np.ndarray,
         config: ReputationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 over sorted events of many sources at once: (cc, blacklisted) after each event.

    ``pos``: the event's position in its source's sequence (0 = first); ``step``: +step_up or
    -step_down; ``cc0``/``listed0``: the source's standing before its first event, per event.

    The counter is a walk clamped to [0, cap]. Each event is the map x -> clip(x + a, lo, hi);
    such maps compose into maps of the same form, so a segmented prefix scan (Hillis-Steele,
    log2(longest sequence) vector passes) gives every event's composed map from its source's
    start. The blacklist is hysteresis: on when cc >= threshold (> 0), off when cc == 0,
    otherwise unchanged, i.e. the value of the last such decisive event (a forward fill),
    else the source's starting standing.
    """
    n = len(pos)
    a = step.astype(np.int64)
    lo = np.zeros(n, np.int64)
    hi = np.full(n, config.cap, np.int64)
    d = 1
    longest = int(pos.max()) if n else 0
    while d <= longest:
        later = np.nonzero(pos >= d)[0]
        earlier = later - d
        a_g, lo_g, hi_g = a[later], lo[later], hi[later]
        lo[later] = np.clip(lo[earlier] + a_g, lo_g, hi_g)
        hi[later] = np.clip(hi[earlier] + a_g, lo_g, hi_g)
        a[later] = a[earlier] + a_g
        d *= 2
    cc = np.clip(cc0 + a, lo, hi)
    index = np.arange(n)
    decisive = (cc >= config.threshold) | (cc == 0)
    last = np.maximum.accumulate(np.where(decisive, index, -1))
    settled = last >= index - pos  # a decisive event of this source so far
    listed = np.where(settled, cc[np.maximum(last, 0)] >= config.threshold, listed0)
    return cc, listed
