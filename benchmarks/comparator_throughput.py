"""Comparator throughput: vectorised Algorithm 1 on 1M rows vs the per-image reference.

Run: python benchmarks/comparator_throughput.py [--rows 1000000] [--repeat 5]
Target: >= 1M rows/s on one core, so that the comparator is never the bottleneck.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from twostream.core.comparator import compare, compare_one
from twostream.core.mapping import load_mapping

log = logging.getLogger("benchmark.comparator")


def random_tables(rows: int, seed: int = 0):
    """Plausible top-k tables: sorted probabilities, distinct classes per row."""
    rng = np.random.default_rng(seed)
    high_idx = rng.integers(0, 1000, size=(rows, 5))
    high_prob = np.sort(rng.dirichlet(np.ones(8), size=rows)[:, :5], axis=1)[:, ::-1].astype(np.float32)
    low_idx = np.stack([rng.integers(0, 10, rows), rng.integers(0, 10, rows)], axis=1)
    low_idx[:, 1] = np.where(low_idx[:, 1] == low_idx[:, 0], (low_idx[:, 0] + 1) % 10, low_idx[:, 1])
    low_prob = np.sort(rng.dirichlet(np.ones(3), size=rows)[:, :2], axis=1)[:, ::-1].astype(np.float32)
    return high_idx, np.ascontiguousarray(high_prob), low_idx, np.ascontiguousarray(low_prob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference-rows", type=int, default=20_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    mapping = load_mapping().array
    tables = random_tables(args.rows)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = compare(*tables, mapping)
        times.append(time.perf_counter() - start)
    best = min(times)
    vector_rate = args.rows / best

    n_ref = min(args.reference_rows, args.rows)
    high_idx, high_prob, low_idx, low_prob = tables
    start = time.perf_counter()
    for n in range(n_ref):
        compare_one(
            list(zip(high_idx[n].tolist(), high_prob[n].tolist())),
            list(zip(low_idx[n].tolist(), low_prob[n].tolist())),
            mapping,
        )
    ref_rate = n_ref / (time.perf_counter() - start)

    log.info("rows: %d, accepted: %.1f%%", args.rows, 100 * result.accepted.mean())
    log.info("vectorised compare: best %.3f s of %d -> %.2f M rows/s", best, args.repeat, vector_rate / 1e6)
    log.info("reference per-image loop: %.0f rows/s (on %d rows)", ref_rate, n_ref)
    log.info("speed-up vectorised / reference: %.0fx", vector_rate / ref_rate)
    log.info("target >= 1M rows/s: %s", "met" if vector_rate >= 1e6 else "NOT met")


if __name__ == "__main__":
    main()
