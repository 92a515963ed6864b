"""Decode + prepare CPU per photograph, reduced-size JPEG decoding off and on, side by side.

What the scorer does before the forward passes (``decode_many`` for both streams' geometry,
then ``prepare`` for each stream), timed per image in CPU seconds on one torch thread, with
``limits.reduced_decode`` 0 (full-size decode) and at each ``--margins`` value, the ways
interleaved over each set so that the machine's load hits them alike. The sets:

* ``imagenet``: the shared ImageNet sample (``--assets``/imagenet-sample, 1,000 JPEGs, ~500x375);
* ``kodak``: the 24 Kodak photographs as shipped (768x512 PNG: never reduced, a control) and
  ``kodak-jpeg``: the same re-encoded as JPEG at quality 90;
* ``12mp``: each Kodak photograph upscaled (bicubic) to 4000x3000 (3000x4000 for a portrait one)
  and encoded as JPEG at quality 90, generated here.

For each set and margin it prints how many images are reduced, CPU ms per image (median of
``--repeat`` passes) and the ratio to off, and how far the prepared inputs move from off's (max
and mean absolute difference, in 8-bit levels, over both streams' inputs). With ``--verdicts`` the
reduced images are also scored by the default ``Scorer`` both ways and the changed verdicts
counted (images not reduced are decoded bit for bit as off's, so their verdicts cannot change).

    python benchmarks/photo_decode.py --margins 1 2 4 --verdicts
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostream.core.config import LimitsConfig, TwoStreamConfig  # noqa: E402
from twostream.core.preprocess import decode_rgb, jpeg_scale  # noqa: E402
from twostream.core.scoring import decode_many, prepare, stream_specs  # noqa: E402

log = logging.getLogger("benchmarks.photo_decode")
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_sets(assets: Path, limit: int) -> dict[str, list[bytes]]:
    """The sets of encoded photographs (module docstring)."""
    sample = sorted((assets / "imagenet-sample").glob("*.JPEG"))[: limit or None]
    kodak = sorted((assets / "kodak").glob("*.png"))
    kodak_rgb = [Image.open(p).convert("RGB") for p in kodak]
    return {
        "imagenet": [p.read_bytes() for p in sample],
        "kodak": [p.read_bytes() for p in kodak],
        "kodak-jpeg": [jpeg(im) for im in kodak_rgb],
        "12mp": [jpeg(im.resize((4000, 3000) if im.width >= im.height else (3000, 4000), Image.BICUBIC))
                 for im in kodak_rgb],
    }


def decode_prepare(blobs: list[bytes], config: TwoStreamConfig) -> list[torch.Tensor]:
    """Both streams' prepared inputs of each image, as the scorer makes them."""
    specs = stream_specs(config)
    images, errors = decode_many(blobs, config.limits, specs)
    if any(errors):
        raise SystemExit(f"decode failed: {[e for e in errors if e][:3]}")
    return [torch.cat([prepare(spec, [image]).reshape(-1) for spec in specs]) for image in images]


def cpu_ms(blobs: list[bytes], config: TwoStreamConfig) -> float:
    t0 = time.process_time()
    decode_prepare(blobs, config)
    return (time.process_time() - t0) * 1e3 / len(blobs)


def reduced(blobs: list[bytes], config: TwoStreamConfig) -> list[int]:
    """Indices of the images the config decodes reduced (from the headers)."""
    specs = stream_specs(config)
    out = []
    for k, data in enumerate(blobs):
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        if image.format == "JPEG" and jpeg_scale(h, w, specs, config.limits.reduced_decode) > 1:
            out.append(k)
    return out


def verdict_changes(blobs: list[bytes], configs: dict[str, TwoStreamConfig]) -> dict[str, list[str]]:
    """For each margin, the images (index: off -> on) whose verdict or label differs from off's."""
    from twostream.core.scoring import Scorer

    scorer = Scorer(configs["off"])
    base = scorer.score(blobs).results()
    changes = {}
    for name, config in configs.items():
        if name == "off":
            continue
        scorer.config = config
        now = scorer.score(blobs).results()
        changes[name] = [f"{k}: {a.verdict}/{a.label} -> {b.verdict}/{b.label}"
                         for k, (a, b) in enumerate(zip(base, now)) if (a.verdict, a.label) != (b.verdict, b.label)]
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--margins", type=float, nargs="+", default=[2.0], help="limits.reduced_decode values")
    parser.add_argument("--repeat", type=int, default=3, help="passes over each set per way (median kept)")
    parser.add_argument("--limit", type=int, default=0, help="first N ImageNet photographs only (0: all)")
    parser.add_argument("--sets", nargs="+", default=["imagenet", "kodak", "kodak-jpeg", "12mp"])
    parser.add_argument("--verdicts", action="store_true", help="score the reduced images both ways")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    configs = {"off": TwoStreamConfig(limits=LimitsConfig(reduced_decode=0.0))}
    configs.update({f"m={m:g}": TwoStreamConfig(limits=LimitsConfig(reduced_decode=m)) for m in args.margins})
    sets = photo_sets(args.assets, args.limit)
    for name in args.sets:
        blobs = sets[name]
        sizes = [decode_rgb(b).size for b in blobs[:1]]
        log.info("== %s: %d images (first %dx%d), %.0f kB each on average", name, len(blobs), *sizes[0],
                 sum(map(len, blobs)) / len(blobs) / 1e3)
        for config in configs.values():  # warm-up: the streams' geometry, torch's kernels
            decode_prepare(blobs[:2], config)
        cpu: dict[str, list[float]] = {way: [] for way in configs}
        for _ in range(args.repeat):
            for way, config in configs.items():
                cpu[way].append(cpu_ms(blobs, config))
        off = statistics.median(cpu["off"])
        want = decode_prepare(blobs, configs["off"])
        log.info("  %-6s %8s %9s %7s %12s %12s", "way", "reduced", "CPU ms", "ratio", "max |d| lvl", "mean |d| lvl")
        for way, config in configs.items():
            ms = statistics.median(cpu[way])
            got = decode_prepare(blobs, config)
            diffs = [(g - w).abs() * 255.0 for g, w in zip(got, want)]
            worst = max(float(d.max()) for d in diffs)
            mean = float(torch.cat(diffs).mean())
            log.info("  %-6s %8d %9.2f %6.2fx %12.2f %12.4f  (passes: %s)", way, len(reduced(blobs, config)), ms,
                     off / ms, worst, mean, " ".join(f"{v:.2f}" for v in cpu[way]))
        if args.verdicts:
            for way, config in configs.items():
                if way == "off":
                    continue
                idx = reduced(blobs, config)
                if not idx:
                    log.info("  %s: no image reduced, no verdict can change", way)
                    continue
                changes = verdict_changes([blobs[k] for k in idx], {"off": configs["off"], way: config})[way]
                log.info("  %s: %d of %d reduced images change verdict or label%s", way, len(changes), len(idx),
                         (": " + "; ".join(changes)) if changes else "")


if __name__ == "__main__":
    main()
