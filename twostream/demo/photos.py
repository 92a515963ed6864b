"""The photographs shipped for the demo, their categories and licences, and real variants of them.

Files: ``twostream/demo/data/<name>.jpg`` (longest side 512 px, JPEG quality 92); source, licence
and how each file was made are recorded in ``data/LICENSES.md``. Chosen by category and licence
only: every redistributable photograph of a CIFAR-10 category we could find (scikit-image's cat,
the six in-scope Kodak photographs) and CC0 / public-domain photographs of other things.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

SKIMAGE = "scikit-image 0.26.0 data package"
KODAK = "Kodak Lossless True Color Image Suite (PhotoCD PCD0992)"
KODAK_LICENSE = "released by Eastman Kodak for unrestricted usage (see LICENSES.md)"


@dataclass(frozen=True)
class Photo:
    """One shipped photograph: its CIFAR-10 category (``other``: outside the ten) and licence."""

    name: str
    category: str
    origin: str
    license: str


PHOTOS: dict[str, Photo] = {p.name: p for p in (
    Photo("chelsea", "cat", SKIMAGE, "CC0 (Stefan van der Walt)"),
    Photo("kodim06", "ship", KODAK, KODAK_LICENSE),
    Photo("kodim09", "ship", KODAK, KODAK_LICENSE),
    Photo("kodim10", "ship", KODAK, KODAK_LICENSE),
    Photo("kodim11", "ship", KODAK, KODAK_LICENSE),
    Photo("kodim20", "airplane", KODAK, KODAK_LICENSE),
    Photo("kodim23", "bird", KODAK, KODAK_LICENSE),
    Photo("coffee", "other", SKIMAGE, "CC0 (Rachel Michetti)"),
    Photo("astronaut", "other", SKIMAGE, "public domain (NASA)"),
    Photo("rocket", "other", SKIMAGE, "public domain (SpaceX)"),
    Photo("camera", "other", SKIMAGE, "CC0 (Lav Varshney)"),
)}


def in_scope() -> list[str]:
    """Names of the photographs of one of the ten CIFAR-10 categories."""
    return [name for name, p in PHOTOS.items() if p.category != "other"]


def out_of_scope() -> list[str]:
    """Names of the photographs of something outside the ten categories."""
    return [name for name, p in PHOTOS.items() if p.category == "other"]


def load(name: str) -> np.ndarray:
    """One shipped photograph as (H, W, 3) uint8 RGB."""
    with resources.files("twostream.demo").joinpath("data", f"{name}.jpg").open("rb") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def photographs() -> dict[str, np.ndarray]:
    """Every shipped photograph as (H, W, 3) uint8 RGB, by name."""
    return {name: load(name) for name in PHOTOS}


def variant(image: np.ndarray, k: int, max_side: int = 320, seed: int = 0) -> np.ndarray:
    """The k-th deterministic variant of a photograph, longest side about ``max_side``.

    k = 0 is the whole photograph scaled to ``max_side``; k > 0 a crop of 60-95% of each side,
    flipped left-right half of the time, with an exposure change (gain 0.7-1.3) and scaled to
    70-100% of ``max_side``.
    """
    rng = np.random.default_rng([seed, k])
    h, w = image.shape[:2]
    if k:
        frac = rng.uniform(0.6, 0.95)
        ch, cw = int(h * frac), int(w * frac)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = np.clip(image.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image))
    scale = max_side / max(pil.size) * (rng.uniform(0.7, 1.0) if k else 1.0)
    size = (max(8, round(pil.size[0] * scale)), max(8, round(pil.size[1] * scale)))
    return np.array(pil.resize(size, Image.BICUBIC))
