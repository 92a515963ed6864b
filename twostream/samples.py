"""A sample upload set for the demo and the tests: real photographs plus FGSM-perturbed copies.

Photographs: scikit-image's bundled data images whose licence allows redistribution:
``chelsea`` (a cat; CC0, Stefan van der Walt), ``coffee`` (CC0, Rachel Michetti), ``astronaut``
(public domain, NASA), ``rocket`` (public domain, SpaceX), ``hubble_deep_field`` (public domain,
NASA) and ``camera`` (CC0, Lav Varshney; grey, converted to RGB). More images than six come from
deterministic crops, flips and rescalings of them.

Perturbed copies: one step of FGSM (eps = 8/255 by default) against the high-resolution stream,
through ``stream.classify`` (its own differentiable resize), away from its own top-1 class, on the
full-resolution pixels; saved as PNG so the perturbation survives. This is deliberately minimal
and local: the evaluation attacks live in ``twostream.attacks``.

Layout written under the output folder: ``loose/<id>.{jpg,png}``, ``shards/shard-NNN.tar``
(WebDataset: ``<id>.jpg|png`` beside ``<id>.json`` with source and timestamp) and
``manifest.csv`` (key, image_id, source, timestamp, adversarial). Sources ``src-00``...; the
first ``attackers`` of them send the perturbed copies (and a few clean ones).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "astronaut": "public domain (NASA)",
    "rocket": "public domain (SpaceX)",
    "hubble_deep_field": "public domain (NASA)",
    "camera": "CC0 (Lav Varshney)",
}
CACHE = Path(os.environ.get("TWOSTREAM_CACHE", Path.home() / ".cache" / "twostream")) / "samples"


@dataclass
class SampleInfo:
    root: Path
    n: int
    adversarial: int
    sources: int
    attackers: int

    @property
    def input_dir(self) -> Path:
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"


def photographs() -> dict[str, np.ndarray]:
    """The redistributable scikit-image photographs as (H, W, 3) uint8 RGB."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        out[name] = np.ascontiguousarray(image[:, :, :3].astype(np.uint8))
    return out


def variant(image: np.ndarray, k: int, max_side: int = 320) -> np.ndarray:
    """The k-th deterministic variant (k = 0 is the photograph, scaled to max_side)."""
    rng = np.random.default_rng(k)
    h, w = image.shape[:2]
    if k:
        frac = rng.uniform(0.6, 0.95)
        ch, cw = int(h * frac), int(w * frac)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            image = image[:, ::-1]
    pil = Image.fromarray(np.ascontiguousarray(image))
    scale = max_side / max(pil.size) * (rng.uniform(0.7, 1.0) if k else 1.0)
    pil = pil.resize((max(8, round(pil.size[0] * scale)), max(8, round(pil.size[1] * scale))),
                     Image.BICUBIC)
    return np.array(pil)


def fgsm(stream, image: np.ndarray, eps: float) -> np.ndarray:
    """The evaluation's Type I FGSM (``t1-fgsm``, ART) on the full-resolution pixels, away from
    the stream's own top-1 class; 8-bit result."""
    from twostream.attacks.run import run_attack
    from twostream.core.preprocess import from_tensor01, to_tensor01

    result = run_attack("t1-fgsm", to_tensor01(image), np.zeros(1, np.int64), stream, None,
                        params={"eps": eps}, batch_size=1)
    return from_tensor01(result.x_adv)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def generate(out: Path, n: int = 64, adversarial_fraction: float = 0.25, sources: int = 6,
             attackers: int = 2, shards: int = 2, eps: float = 8 / 255, config=None,
             seed: int = 0) -> SampleInfo:
    """Write a sample of ``n`` images (a fraction of them perturbed) under ``out``."""
    from twostream.core.config import TwoStreamConfig
    from twostream.core.models import build_stream

    config = config or TwoStreamConfig()
    out = Path(out)
    images_dir = out / "images"
    (images_dir / "loose").mkdir(parents=True, exist_ok=True)
    (images_dir / "shards").mkdir(parents=True, exist_ok=True)
    n_adv = int(round(n * adversarial_fraction))
    n_clean = n - n_adv
    attackers = min(attackers, sources) if n_adv else 0
    photos = photographs()
    names = list(photos)
    stream = build_stream(config.high, "high").eval() if n_adv else None
    rng = np.random.default_rng(seed)

    items = []  # (image_id, array, adversarial, source)
    for k in range(n_clean):
        name = names[k % len(names)]
        items.append((f"{name}-{k:05d}", variant(photos[name], k // len(names)), False,
                      f"src-{k % sources:02d}"))
    for k in range(n_adv):
        name = names[k % len(names)]
        base = variant(photos[name], 1000 + k // len(names))
        adv = fgsm(stream, base, eps)
        items.append((f"{name}-adv-{k:05d}", adv, True, f"src-{k % attackers:02d}"))
    order = rng.permutation(len(items))  # interleave arrivals
    rows = []
    half = len(items) // 2
    tars = [tarfile.open(images_dir / "shards" / f"shard-{s:03d}.tar", "w") for s in range(shards)]
    try:
        for t, idx in enumerate(order):
            image_id, image, adv, source = items[idx]
            ext, fmt = (".png", "PNG") if adv else (".jpg", "JPEG")
            data = _encode(image, fmt)
            timestamp = 1_700_000_000.0 + 10.0 * t
            meta = {"image_id": image_id, "source": source, "timestamp": timestamp}
            if t < half or not shards:
                key = f"loose/{image_id}"
                (images_dir / f"{key}{ext}").write_bytes(data)
                (images_dir / f"{key}.json").write_text(json.dumps(meta))
            else:
                key = image_id
                tar = tars[t % shards]
                for member, blob in ((f"{key}{ext}", data), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
            rows.append({"key": key, "image_id": image_id, "source": source,
                         "timestamp": timestamp, "adversarial": int(adv)})
    finally:
        for tar in tars:
            tar.close()
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "LICENSES.txt").write_text(
        "Photographs from scikit-image's data package:\n"
        + "".join(f"  {k}: {v}\n" for k, v in PHOTOS.items())
        + "Perturbed copies: FGSM on the high-resolution stream (twostream.samples).\n"
    )
    return SampleInfo(out, n, n_adv, sources, attackers)


def cached(n: int = 64, adversarial_fraction: float = 0.25, config=None, **kwargs) -> SampleInfo:
    """:func:`generate` into ``~/.cache/twostream/samples/<digest>`` unless already there."""
    from twostream.core.config import TwoStreamConfig

    config = config or TwoStreamConfig()
    key = json.dumps({"n": n, "f": adversarial_fraction, "high": config.high.model_dump(),
                      **{k: str(v) for k, v in sorted(kwargs.items())}}, sort_keys=True)
    root = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (root / "manifest.csv").exists():
        with open(root / "manifest.csv") as handle:
            rows = list(csv.DictReader(handle))
        adv = sum(int(r["adversarial"]) for r in rows)
        return SampleInfo(root, len(rows), adv, kwargs.get("sources", 6),
                          kwargs.get("attackers", 2) if adv else 0)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    info = generate(tmp, n, adversarial_fraction, config=config, **kwargs)
    os.replace(tmp, root)
    info.root = root
    return info
