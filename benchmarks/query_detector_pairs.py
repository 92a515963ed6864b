"""The query detector's pair statistics (``core/query_detector.differences``) for honest JPEG
re-encodings of one photograph and for the detector-aware attacker's shapings, side by side:
the evidence behind rule 2's JPEG veto and its inside-block test (docs/detector.md, "The
JPEG-veto evasion and its fix").

    nice python benchmarks/query_detector_pairs.py [--photos 8] [--runs 4] [--queries 30]
        [--modes jpeg:4,jpeg:2,grid16:4,blockac:3,noise:4]

Honest: every pair of near-duplicates (same size, >= min_shared shared hashes, within max_linf on
the sample) among a photograph's JPEG variants (quality 50-100 in steps of 2, 4:4:4 and 4:2:0,
20 re-shares and the original file). Attacker: every pair of a Square-like run's queries (eps
4/255) re-shaped by each ``ADAPTIVE_MODES`` mode. Per set: how many pairs are near, JPEG-like
(vetoed) and matches, and percentiles of the inner ratio, the block ratio and the share of
inside-block windows whose difference is the same on both pixels.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_detector import REPO, jpeg, load, square_run  # noqa: E402  (the benchmark beside this one)
from twostream.attacks.blackbox import adaptive_perturbation  # noqa: E402
from twostream.core.query_detector import QueryDetectorConfig, _layout, differences, fingerprint  # noqa: E402

log = logging.getLogger("benchmarks.query_detector_pairs")


def pair_rows(images: list[np.ndarray], config: QueryDetectorConfig) -> list[dict[str, float]]:
    """The statistics of every near pair among ``images`` (in any order)."""
    fps = [fingerprint(x, config) for x in images]
    rows = []
    for a, b in itertools.combinations(fps, 2):
        shared = sum(x == y for x, y in zip(a.hashes, b.hashes))
        linf = int(np.abs(a.sample.astype(np.int16) - b.sample).max()) if a.geometry == b.geometry else 256
        if a.digest == b.digest or shared < config.min_shared or linf > config.max_linf:
            continue
        edge = _layout(*a.geometry, config)[4]
        d = differences(a.sample, b.sample[None], config.max_linf // 2, edge)
        signed = (b.sample.astype(np.int16) - a.sample).reshape(-1, 2, 3)[~edge]
        moved = np.abs(signed).sum(axis=(1, 2)) > 0
        same = (signed[moved, 0] == signed[moved, 1]).all(axis=1).mean() if moved.any() else 1.0
        rows.append({"inner": float(d.inner_ratio[0]), "block": float(d.block_ratio[0]), "const": float(same),
                     "jpeg": bool(d.jpeg_like(config)[0]), "match": bool(d.matches(config)[0])})
    return rows


def report(name: str, rows: list[dict[str, float]]) -> None:
    if not rows:
        log.info("%-12s no near pairs", name)
        return
    pct = lambda key, qs: " / ".join(f"{np.percentile([r[key] for r in rows], q):.2f}" for q in qs)  # noqa: E731
    log.info("| %s | %d | %d | %d | %s | %.0f%% | %s |", name, len(rows), sum(r["jpeg"] for r in rows),
             sum(r["match"] for r in rows), pct("inner", (1, 10, 50, 99)), 100 * np.median([r["const"] for r in rows]),
             pct("block", (50,)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--modes", default="jpeg:4,jpeg:2,grid16:4,blockac:3,noise:4")
    ap.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = QueryDetectorConfig()
    paths = sorted((args.assets / "imagenet-sample").glob("*.JPEG"))
    rng = np.random.default_rng(args.seed)
    log.info("| pairs | near pairs | JPEG-like (vetoed) | matches | inner ratio p1 / p10 / p50 / p99 | "
             "same inside blocks (p50) | block ratio p50 |\n| --- | --- | --- | --- | --- | --- | --- |")
    honest = []
    for p in rng.choice(len(paths), size=args.photos, replace=False):
        x = load(paths[int(p)])
        variants = [jpeg(x, q, s) for q in range(50, 101, 2) for s in (0, 2)] + [x]
        variants += [jpeg(jpeg(x, int(rng.integers(70, 96)), s), int(rng.integers(50, 96)), s) for s in (0, 2)
                     for _ in range(10)]
        honest += pair_rows(variants, config)
    report("honest JPEG encodings", honest)
    originals = [load(paths[int(p)]) for p in rng.choice(len(paths), size=args.runs, replace=False)]
    for mode in args.modes.split(","):
        rows = []
        for x0 in originals:
            perturb, _ = adaptive_perturbation(mode, rng)
            rows += pair_rows([perturb(q) for _, q in zip(range(args.queries), square_run(x0, rng, eps=4))], config)
        report(mode, rows)


if __name__ == "__main__":
    main()
