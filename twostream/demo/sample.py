"""The demo upload set (``twostream sample``): who sends what, with each source's role as ground truth.

:data:`DEMO` lists the senders; each sends, in time order, one upload per letter of its pattern:
``c`` a clean variant of an in-scope photograph, ``o`` a clean variant of an out-of-scope one,
``a`` an attacked copy of an in-scope variant (the sender's ``attack``, run by name through
``twostream.attacks.run.run_attack`` on the configured models, i.e. the ones the demo scores
with). Photographs are drawn round-robin from :mod:`.photos`; the n-th use of a photograph is its
variant n (crop, flip, exposure). Sender j's i-th upload is at ``T0 + 30 i + 3 j`` seconds, so all
sources send at once and Algorithm 2 sees each one's uploads in the order of its pattern.

Written under the output folder: ``images/loose/<id>.{jpg,png}`` and ``images/shards/
shard-NNN.tar`` (WebDataset, ``<id>.json`` sidecars; the later half of the uploads),
``manifest.csv`` (``key, image_id, source, timestamp`` as the batch job reads them, plus the
ground truth ``role, attack, category, photo``), ``sample.json`` (senders, attacks with their
parameters, sizes, seed, models) and ``LICENSES.md`` (the photographs' licences). Clean uploads
are JPEG (quality 92), attacked ones PNG so the perturbation survives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from twostream.core.config import TwoStreamConfig
from twostream.core.labels import CIFAR10_LABELS
from twostream.demo import photos

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("TWOSTREAM_CACHE", Path.home() / ".cache" / "twostream")) / "samples"
FORMAT = "demo-1"  # bump when the layout or the drawing of photographs changes (invalidates caches)
T0 = 1_700_000_000.0
MANIFEST_FIELDS = ("key", "image_id", "source", "timestamp", "role", "attack", "category", "photo")


@dataclass(frozen=True)
class Sender:
    """One source of the sample: its id, its role (the ground truth) and what it uploads."""

    source: str
    role: str
    pattern: str  # one letter per upload in time order: c clean in-scope, o clean out-of-scope, a attacked
    attack: str | None = None  # the attack of its ``a`` uploads


# Source ids are documentation addresses (RFC 5737); nothing in an id, key or file name says the role.
DEMO: tuple[Sender, ...] = (
    Sender("203.0.113.11", "honest", "cccccc"),
    Sender("203.0.113.12", "honest", "cccccc"),
    Sender("203.0.113.13", "honest", "cccccc"),
    Sender("203.0.113.21", "honest-out-of-scope", "oooooo"),
    Sender("198.51.100.7", "attacker-t2-ifgsm", "aaaaaa", "t2-ifgsm"),
    Sender("198.51.100.8", "attacker-adaptive-8", "aaaaaa", "adaptive-8"),
    Sender("198.51.100.9", "attacker-strategic", "acacacacac", "t2-ifgsm"),
)


@dataclass
class SampleInfo:
    """Where a generated sample is, and its size."""

    root: Path
    uploads: int
    attacked: int
    sources: int

    @property
    def input_dir(self) -> Path:
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"


@dataclass
class _Upload:
    source: str
    role: str
    timestamp: float
    photo: str
    k: int  # variant of the photograph
    attack: str | None


def plan(senders: Sequence[Sender]) -> list[_Upload]:
    """Every upload of ``senders`` in (timestamp, source) order, photographs drawn round-robin."""
    pools = {"c": photos.in_scope(), "o": photos.out_of_scope()}  # "a" draws from the in-scope pool
    drawn: Counter = Counter()  # per pool
    used: Counter = Counter()  # per photograph: the next variant
    uploads = []
    for j, sender in enumerate(senders):
        for i, letter in enumerate(sender.pattern):
            if letter not in ("c", "o", "a"):
                raise ValueError(f"{sender.source}: pattern letter {letter!r} is not one of c, o, a")
            if letter == "a" and not sender.attack:
                raise ValueError(f"{sender.source}: an 'a' upload needs the sender's attack")
            pool = "o" if letter == "o" else "c"
            photo = pools[pool][drawn[pool] % len(pools[pool])]
            drawn[pool] += 1
            uploads.append(_Upload(sender.source, sender.role, T0 + 30.0 * i + 3.0 * j, photo, used[photo],
                                   sender.attack if letter == "a" else None))
            used[photo] += 1
    return sorted(uploads, key=lambda u: (u.timestamp, u.source))


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def generate(out: Path, senders: Sequence[Sender] = DEMO, *, shards: int = 2, max_side: int = 320,
             config: TwoStreamConfig | None = None, seed: int = 0, progress: bool = True) -> SampleInfo:
    """Write the sample of ``senders`` under ``out`` (see the module docstring)."""
    import torch

    from twostream.core.preprocess import from_tensor01, to_tensor01

    config = config or TwoStreamConfig()
    out = Path(out)
    images_dir = out / "images"
    (images_dir / "loose").mkdir(parents=True, exist_ok=True)
    (images_dir / "shards").mkdir(parents=True, exist_ok=True)
    uploads = plan(senders)
    scorer = None
    if any(u.attack for u in uploads):
        from twostream.attacks.run import run_attack
        from twostream.core.scoring import Scorer

        scorer = Scorer(config)
    originals = photos.photographs()
    attacks: dict[str, dict] = {}
    rows = []
    half = len(uploads) // 2
    tars = [tarfile.open(images_dir / "shards" / f"shard-{s:03d}.tar", "w") for s in range(shards)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time: more threads only contend (20x slower on 2 busy cores)
    try:
        for t, u in enumerate(tqdm(uploads, desc="demo sample", unit="image", disable=not progress)):
            image = photos.variant(originals[u.photo], u.k, max_side, seed)
            category = photos.PHOTOS[u.photo].category
            if u.attack:
                result = run_attack(u.attack, to_tensor01(image), np.array([CIFAR10_LABELS.index(category)]),
                                    scorer.high, scorer.low, seed=seed + t, batch_size=1,
                                    thresholds=(config.thresholds.p1, config.thresholds.p2))
                image = from_tensor01(result.x_adv)
                attacks.setdefault(u.attack, result.params)
            image_id = f"img-{t:03d}"
            ext, data = (".png", _encode(image, "PNG")) if u.attack else (".jpg", _encode(image, "JPEG"))
            meta = json.dumps({"image_id": image_id, "source": u.source, "timestamp": u.timestamp}).encode()
            if t < half or not shards:
                key = f"loose/{image_id}"
                (images_dir / f"{key}{ext}").write_bytes(data)
                (images_dir / f"{key}.json").write_bytes(meta)
            else:
                key = image_id
                _add(tars[t % shards], f"{key}{ext}", data)
                _add(tars[t % shards], f"{key}.json", meta)
            rows.append({"key": key, "image_id": image_id, "source": u.source, "timestamp": u.timestamp,
                         "role": u.role, "attack": u.attack or "", "category": category,
                         "photo": f"{u.photo}#{u.k}"})
    finally:
        torch.set_num_threads(threads)
        for tar in tars:
            tar.close()
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    info = SampleInfo(out, len(rows), sum(bool(u.attack) for u in uploads), len(senders))
    (out / "sample.json").write_text(json.dumps({
        "format": FORMAT, "uploads": info.uploads, "attacked": info.attacked,
        "senders": [asdict(s) for s in senders], "attacks": attacks, "max_side": max_side, "seed": seed,
        "models": {"high": config.high.model, "low": config.low.model},
    }, indent=1, default=str))
    with resources.files("twostream.demo").joinpath("data", "LICENSES.md").open("rb") as src, \
            open(out / "LICENSES.md", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return info


def cache_key(senders: Sequence[Sender], config: TwoStreamConfig, **kwargs) -> str:
    """What a cached sample depends on: senders, models, thresholds, attack parameters, options."""
    from twostream.attacks.run import attack_params

    attacks = sorted({s.attack for s in senders if s.attack})
    key = json.dumps({
        "format": FORMAT, "senders": [asdict(s) for s in senders],
        "high": config.high.model_dump(include={"model", "weights"}),
        "low": config.low.model_dump(include={"model", "weights"}),
        "thresholds": config.thresholds.model_dump(), "attacks": {a: attack_params(a) for a in attacks},
        **kwargs,
    }, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cached(senders: Sequence[Sender] = DEMO, *, config: TwoStreamConfig | None = None, shards: int = 2,
           max_side: int = 320, seed: int = 0, progress: bool = True) -> SampleInfo:
    """:func:`generate` into ``~/.cache/twostream/samples/<key>`` unless already there."""
    config = config or TwoStreamConfig()
    root = CACHE / cache_key(senders, config, shards=shards, max_side=max_side, seed=seed)
    if (root / "sample.json").exists():
        meta = json.loads((root / "sample.json").read_text())
        return SampleInfo(root, meta["uploads"], meta["attacked"], len(meta["senders"]))
    log.info("generating the demo sample into %s (once; later runs reuse it)", root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    info = generate(tmp, senders, shards=shards, max_side=max_side, config=config, seed=seed, progress=progress)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    info.root = root
    return info
