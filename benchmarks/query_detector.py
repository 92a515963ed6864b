"""The stateful query detector's figures: the honest false-positive rate, queries to the first
detection of simulated query-attack runs, the cost per image and the memory per remembered image.

    nice python benchmarks/query_detector.py [--uploads 20000] [--runs 40] [--min-matches 5]
        [--only honest|variants|attacks|adaptive|cost] [--identities one,rotate,net64,net64-grouped] [--assets DIR]

Honest model (the issue's): a shuffled stream of uploads of the shared photographs
(``imagenet-sample``), each photograph drawn by popularity (Zipf, a popular one is sent thousands
of times) from many sources, each upload the original file, a JPEG re-encoding (quality 50-95,
4:2:0 or 4:4:4 chroma), a re-share (re-encoded twice), a resize (x0.5 or x0.75, re-encoded) or a
crop (80-95% of each side, re-encoded). Attack runs (a fresh detector each, one query per source
id): random-noise walks (+-2/255 steps within 8/255, Square/SimBA-like noise), Square-like
square redraws, SimBA-like single-value steps, and HopSkipJump-like boundary walks (binary-search
interpolations towards the original from another photograph plus Gaussian probes). The attacker
who knows the detector (``--only adaptive``): the Square-like run on ``eps - margin``, each query
re-randomised by one of ``attacks.blackbox.ADAPTIVE_MODES`` and projected onto the 8/255 ball.
Each adaptive mode runs from each of ``--identities``: one source id, a new id per query, a new
address of one IPv6 /64 per query with ``reputation.group_by_prefix`` off (``net64``) or on
(``net64-grouped``: rule 3 counts per network, the source_key the endpoint passes). Near-duplicate counts
(``QueryReport.near``, and those from the upload's own source) are reported beside the flags.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from twostream.attacks.blackbox import ADAPTIVE_MODES, adaptive_perturbation
from twostream.core.config import PrefixGrouping
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig, fingerprint
from twostream.core.reputation import reputation_key

log = logging.getLogger("benchmarks.query_detector")
REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def jpeg(image: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


def honest_upload(image: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """One honest upload of a photograph: (what was done, the decoded pixels)."""
    kind = rng.choice(["original", "reencode", "reshare", "resize", "crop"], p=[0.3, 0.35, 0.1, 0.15, 0.1])
    q, sub = int(rng.integers(50, 96)), int(rng.choice([0, 2]))
    h, w = image.shape[:2]
    if kind == "original":
        return kind, image
    if kind == "reencode":
        return kind, jpeg(image, q, sub)
    if kind == "reshare":
        return kind, jpeg(jpeg(image, int(rng.integers(70, 96)), sub), q, sub)
    if kind == "resize":
        s = float(rng.choice([0.5, 0.75]))
        return kind, jpeg(np.asarray(Image.fromarray(image).resize((int(w * s), int(h * s)), Image.BICUBIC)), q, sub)
    fh, fw = rng.uniform(0.8, 0.95, size=2)
    ch, cw = int(h * fh), int(w * fw)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return kind, jpeg(np.ascontiguousarray(image[top:top + ch, left:left + cw]), q, sub)


def honest_stream(paths: list[Path], uploads: int, seed: int, config: QueryDetectorConfig) -> dict:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(paths) + 1) ** 1.1
    order = rng.permutation(len(paths))  # which photograph is popular: random
    picks = order[rng.choice(len(paths), size=uploads, p=weights / weights.sum())]
    detector = QueryDetector(config)
    cache: dict[int, np.ndarray] = {}
    flagged, dups, times, by_kind, near = [], 0, [], {}, []
    for i, p in enumerate(picks):
        image = cache.get(int(p))
        if image is None:
            image = cache.setdefault(int(p), load(paths[p])) if len(cache) < 300 else load(paths[p])
        kind, upload = honest_upload(image, rng)
        t0 = time.perf_counter()
        report, is_adv = detector.detect(upload, source=f"user{int(rng.integers(0, 5000))}", query_id=f"h{i}", now=float(i))
        times.append(time.perf_counter() - t0)
        dups += report.duplicate_of is not None
        near.append((len(report.near), report.source_near))
        by_kind[kind] = by_kind.get(kind, 0) + 1
        if is_adv:
            flagged.append((i, paths[p].name, kind, len(report.matches)))
        if (i + 1) % 5000 == 0:
            log.info("honest: %d uploads, %d flagged", i + 1, len(flagged))
    top = np.bincount(picks).max()
    return {"uploads": uploads, "flagged": flagged, "duplicates": dups, "times": times, "kinds": by_kind,
            "most_popular": int(top), "remembered": len(detector.store), "near": near}


def every_variant(paths: list[Path], photographs: int, seed: int,
                  config: QueryDetectorConfig) -> tuple[int, int, int, list[int]]:
    """The honest worst case: every JPEG quality 50-100 with both chroma layouts of one
    photograph at its own size (102 distinct near-duplicates), shuffled, per photograph in its own
    detector. Returns (uploads, flagged uploads, photographs with a flagged upload, the largest
    near-duplicate count per photograph)."""
    rng = np.random.default_rng(seed)
    uploads = flagged = hit = 0
    most: list[int] = []
    for p in rng.choice(len(paths), size=photographs, replace=False):
        image = load(paths[int(p)])
        variants = [jpeg(image, q, sub) for q in range(50, 101) for sub in (0, 2)]
        detector = QueryDetector(config)
        reports = [detector.detect(variants[i], query_id=f"v{i}")[0] for i in rng.permutation(len(variants))]
        n = sum(r.is_adversarial for r in reports)
        uploads, flagged, hit = uploads + len(variants), flagged + n, hit + (n > 0)
        most.append(max(len(r.near) for r in reports))
    return uploads, flagged, hit, most


def noise_run(x0: np.ndarray, rng: np.random.Generator, step: int = 2, eps: int = 8):
    x0 = x0.astype(np.int16)
    x = x0.copy()
    while True:
        x = np.clip(x + rng.choice([-step, step], size=x.shape), x0 - eps, x0 + eps).clip(0, 255)
        yield x.astype(np.uint8)


def square_run(x0: np.ndarray, rng: np.random.Generator, eps: int = 8):
    x0 = x0.astype(np.int16)
    x = (x0 + rng.choice([-eps, eps], size=(1, x0.shape[1], 3))).clip(0, 255)
    while True:
        x = x.copy()
        side = int(rng.integers(4, max(5, min(x0.shape[:2]) // 5)))
        r, c = int(rng.integers(0, x0.shape[0] - side)), int(rng.integers(0, x0.shape[1] - side))
        x[r:r + side, c:c + side] = (x0[r:r + side, c:c + side] + rng.choice([-eps, eps], size=(1, 1, 3))).clip(0, 255)
        yield x.astype(np.uint8)


def simba_run(x0: np.ndarray, rng: np.random.Generator, eps: int = 8):
    x = x0.astype(np.int16).copy()
    while True:
        idx = tuple(int(rng.integers(0, n)) for n in x.shape)
        x[idx] = np.clip(x[idx] + rng.choice([-eps, eps]), 0, 255)
        yield x.astype(np.uint8)


def boundary_run(x0: np.ndarray, other: np.ndarray, rng: np.random.Generator, probes: int = 10):
    """HopSkipJump-like: binary search of the blend weight towards the original, then Gaussian
    probes (L2 = 0.5% of the image's norm) around the boundary point, the weight shrinking."""
    x, y = x0.astype(np.float64), other.astype(np.float64)
    lo, hi = 0.0, 1.0
    for _ in range(8):  # binary search: where the label flips (here: at 0.35)
        mid = (lo + hi) / 2
        yield np.round((1 - mid) * x + mid * y).clip(0, 255).astype(np.uint8)
        lo, hi = (mid, hi) if mid < 0.35 else (lo, mid)
    alpha = hi
    while True:
        xb = (1 - alpha) * x + alpha * y
        for _ in range(probes):
            u = rng.normal(size=x.shape)
            yield np.round(xb + u / np.linalg.norm(u) * 0.005 * np.linalg.norm(x)).clip(0, 255).astype(np.uint8)
        alpha *= 0.97
        yield np.round((1 - alpha) * x + alpha * y).clip(0, 255).astype(np.uint8)


def adaptive_run(x0: np.ndarray, mode: str, rng: np.random.Generator, eps: int = 8):
    """The Square-like run on ``eps`` less the mode's margin, each query re-randomised by ``mode``
    and projected onto the L-inf ball of ``x0``, as the harness's detector-aware attacker does."""
    perturb, margin = adaptive_perturbation(mode, rng)
    low = np.clip(x0.astype(np.int16) - eps, 0, 255).astype(np.uint8)
    high = np.clip(x0.astype(np.int16) + eps, 0, 255).astype(np.uint8)
    for x in square_run(x0, rng, eps=eps - margin):
        yield np.clip(perturb(x), low, high)


IDENTITIES = {  # the source id of query i, and whether rule 3 groups by network
    "one": (lambda i: "attacker", False),
    "rotate": (lambda i: f"attacker{i}", False),
    "net64": (lambda i: f"2001:db8:a:b::{i + 1:x}", False),
    "net64-grouped": (lambda i: f"2001:db8:a:b::{i + 1:x}", True),
}


def queries_to_detection(run, limit: int, config: QueryDetectorConfig, identities: str = "rotate") -> int | None:
    source, grouped = IDENTITIES[identities]
    detector = QueryDetector(config, source_key=partial(reputation_key, grouping=PrefixGrouping() if grouped else None))
    for i, image in zip(range(limit), run):
        _, flagged = detector.detect(image, source=source(i), query_id=f"a{i}")
        if flagged:
            return i + 1
    return None


def memory_per_image(images: list[np.ndarray], config: QueryDetectorConfig) -> float:
    detector = QueryDetector(config)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, image in enumerate(images):
        detector.detect(image, query_id=f"m{i}")
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / len(detector.store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=40, help="attack runs per attack kind")
    ap.add_argument("--limit", type=int, default=200, help="queries per attack run at most")
    ap.add_argument("--min-matches", type=int, default=QueryDetectorConfig.min_matches)
    ap.add_argument("--min-source-near", type=lambda v: None if v == "off" else int(v),
                    default=QueryDetectorConfig.min_source_near,
                    help="near-duplicates from the query's own source that flag it, or off (the rules before "
                         "the veto fix: off with --jpeg-min-inner 0)")
    ap.add_argument("--jpeg-min-inner", type=float, default=QueryDetectorConfig.jpeg_min_inner)
    ap.add_argument("--adaptive", default="jpeg:4,jpeg:2,grid16:4,blockrgb:4,blockac:3,texture:4,realjpeg:70,noise:4",
                    help=f"the detector-aware modes run by --only adaptive (KIND:A, comma-separated; KIND one of "
                         f"{', '.join(ADAPTIVE_MODES)})")
    ap.add_argument("--identities", default="rotate,one",
                    help=f"where --only adaptive's queries come from (comma-separated: {', '.join(IDENTITIES)})")
    ap.add_argument("--only", choices=["honest", "variants", "attacks", "adaptive", "cost"], action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--variant-photos", type=int, default=20, help="photographs for the every-variant case")
    ap.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("twostream.core.query_detector").setLevel(logging.WARNING)  # one line per detection
    paths = sorted((args.assets / "imagenet-sample").glob("*.JPEG"))
    if not paths:
        raise SystemExit(f"no photographs under {args.assets / 'imagenet-sample'}")
    config = QueryDetectorConfig(min_matches=args.min_matches, min_source_near=args.min_source_near,
                                 jpeg_min_inner=args.jpeg_min_inner)
    log.info("config: %s", config)

    parts = set(args.only or ["honest", "variants", "attacks", "adaptive", "cost"])
    if "honest" in parts:
        t0 = time.perf_counter()
        honest = honest_stream(paths, args.uploads, args.seed, config)
        ms = np.array(honest["times"]) * 1e3
        fp = len(honest["flagged"])
        log.info("honest: %d uploads of %d photographs (most popular sent %d times; %s), %d exact re-uploads, "
                 "%d remembered at the end", honest["uploads"], len(paths), honest["most_popular"], honest["kinds"],
                 honest["duplicates"], honest["remembered"])
        log.info("honest false positives: %d / %d = %.4f%% (target <= 0.1%%)", fp, honest["uploads"], 100 * fp / honest["uploads"])
        for row in honest["flagged"][:10]:
            log.info("  flagged: upload %d, %s, %s, %d matches", *row)
        near = np.array([n for n, _ in honest["near"]])
        own = np.array([n for _, n in honest["near"]])
        log.info("honest near-duplicates per upload: mean %.2f, p99 %d, p99.9 %d, max %d; from the upload's own "
                 "source: max %d", near.mean(), np.percentile(near, 99), np.percentile(near, 99.9), near.max(), own.max())
        log.info("detect() per honest upload: mean %.3f ms, p50 %.3f ms, p99 %.3f ms",
                 ms.mean(), np.percentile(ms, 50), np.percentile(ms, 99))
        log.info("honest stream wall time (with the uploads' re-encoding): %.1f s", time.perf_counter() - t0)

    if "variants" in parts:
        uploads, flagged, hit, most = every_variant(paths, args.variant_photos, args.seed + 2, config)
        log.info("honest worst case, every JPEG variant (quality 50-100 x 4:2:0/4:4:4) of %d photographs, shuffled: "
                 "%d / %d uploads flagged (%.3f%%), %d photographs with a flagged upload; the most near-duplicates "
                 "of one upload per photograph: median %d, max %d", args.variant_photos, flagged, uploads,
                 100 * flagged / uploads, hit, statistics.median(most), max(most))

    if "attacks" in parts:
        rng = np.random.default_rng(args.seed + 1)
        originals = [load(paths[int(i)]) for i in rng.choice(len(paths), size=args.runs, replace=False)]
        for name in ("noise", "square", "simba", "boundary"):
            counts = []
            for k, x0 in enumerate(originals):
                if name == "noise":
                    run = noise_run(x0, rng)
                elif name == "square":
                    run = square_run(x0, rng)
                elif name == "simba":
                    run = simba_run(x0, rng)
                else:
                    other = np.asarray(Image.fromarray(originals[(k + 1) % len(originals)]).resize(x0.shape[1::-1]))
                    run = boundary_run(x0, other, rng)
                counts.append(queries_to_detection(run, args.limit, config))
            found = [c for c in counts if c is not None]
            log.info("attack %-8s: %d/%d runs detected within %d queries; queries to the first detection: "
                     "median %s, max %s", name, len(found), len(counts), args.limit,
                     statistics.median(found) if found else None, max(found) if found else None)

    if "adaptive" in parts:
        rng = np.random.default_rng(args.seed + 3)
        originals = [load(paths[int(i)]) for i in rng.choice(len(paths), size=args.runs, replace=False)]
        for m, mode in enumerate(args.adaptive.split(",")):
            for identities in args.identities.split(","):
                rng = np.random.default_rng([args.seed + 3, m])  # the same runs from every identity setting
                counts = [queries_to_detection(adaptive_run(x0, mode, rng), args.limit, config, identities)
                          for x0 in originals]
                found = [c for c in counts if c is not None]
                log.info("adaptive %-12s %-13s: %d/%d runs detected within %d queries; queries to the first "
                         "detection: median %s, max %s", mode, identities, len(found),
                         len(counts), args.limit, statistics.median(found) if found else None,
                         max(found) if found else None)

    if "cost" in parts:
        sample = [load(p) for p in paths[:1000]]
        per_image = memory_per_image(sample, config)
        payload = config.windows * 6 + config.index_windows * 8 + 16
        log.info("memory per remembered image (MemoryStore, tracemalloc over %d distinct photographs): %.0f bytes "
                 "(payload: %d bytes of sample + hashes + digest)", len(sample), per_image, payload)
        sizes = [im.shape[0] * im.shape[1] for im in sample]
        det = QueryDetector(config)
        times = []
        for i, im in enumerate(sample):
            t = time.perf_counter()
            det.detect(im, query_id=f"c{i}")
            times.append(time.perf_counter() - t)
        times_ms = np.array(times) * 1e3
        log.info("detect() on %d distinct photographs (mean %.0f pixels): p50 %.3f ms, mean %.3f ms, p99 %.3f ms",
                 len(sample), np.mean(sizes), np.percentile(times_ms, 50), times_ms.mean(), np.percentile(times_ms, 99))
        run = list(zip(range(200), adaptive_run(sample[0], "texture:4", np.random.default_rng(args.seed))))
        for round_ in range(2):  # rule 3's key on every verified candidate: grouping off vs on, alternating
            for identities in ("net64", "net64-grouped"):
                source, grouped = IDENTITIES[identities]
                det = QueryDetector(config, source_key=partial(reputation_key,
                                                               grouping=PrefixGrouping() if grouped else None))
                fps = [fingerprint(x, config) for _, x in run]
                t = time.perf_counter()
                for (i, _), fp in zip(run, fps):
                    det.judge(fp, source=source(i), query_id=f"r{i}")
                log.info("judge() over a texture:4 run of %d near-duplicates from one /64 (%s, round %d): "
                         "mean %.3f ms", len(run), identities, round_ + 1, (time.perf_counter() - t) * 1e3 / len(run))


if __name__ == "__main__":
    main()
