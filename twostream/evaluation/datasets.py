"""Labelled image sets for the evaluation.

A :class:`Dataset` is a list of images (URIs: local paths or ``s3://``) with a CIFAR-10 truth
per image: an index 0..9, or ``-1`` for an out-of-scope image (its category is none of the ten;
the defence is expected to reject it). Three layouts:

* ``folder:<root>`` - ImageFolder layout named by CIFAR-10 class: ``<root>/<class>/<image>``
  with ``<class>`` one of ``airplane ... truck``; a folder named ``other`` holds out-of-scope
  images; any other folder name is an error.
* ``manifest:<file>`` - CSV (header) or JSON Lines with a column ``uri`` (or ``path``; relative
  paths are relative to the manifest) and ``label`` (a CIFAR-10 name, ``other``, or 0..9/-1).
* ``imagenet-sample:<root>`` - ``labels.csv`` (``file, wnid, imagenet_index, ...``) plus the
  photographs; the truth is the project's own ImageNet -> CIFAR-10 table
  (:func:`twostream.core.mapping.load_mapping`), so the classes it maps to ``other`` are out of scope.

Images are decoded with the serving path's decoder and brought to one working resolution:
shorter side resized to ``size`` (PIL bicubic, antialiased), centre crop ``size x size``, 8-bit
RGB. That square is "the full-resolution image" the attacks perturb and the scorer reads
(default 256 = timm's resize size for a 224 crop at crop_pct 0.875). One shape for all images
lets attacks run in batches and makes a universal perturbation well defined.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from twostream import storage
from twostream.core.config import LimitsConfig
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models.stream import InputSpec
from twostream.core.preprocess import decode_image

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset spec or layout is invalid; the message says why."""


@dataclass
class Dataset:
    name: str
    ids: list[str]
    uris: list[str]
    labels: np.ndarray  # int64 CIFAR-10 index, -1 = out of scope
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: np.ndarray | list[int]) -> "Dataset":
        keep = np.asarray(keep, dtype=np.int64)
        return Dataset(self.name, [self.ids[k] for k in keep], [self.uris[k] for k in keep],
                       self.labels[keep], dict(self.meta))

    def in_scope(self) -> "Dataset":
        return self.select(np.flatnonzero(self.labels >= 0))

    def out_of_scope(self) -> "Dataset":
        return self.select(np.flatnonzero(self.labels < 0))

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """A seeded random subset of ``n`` images (all when ``n`` is None or >= len), in id order."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.select(np.sort(rng.choice(len(self), size=n, replace=False)))


def parse_label(value: str | int) -> int:
    """A CIFAR-10 name, ``other``, or an integer 0..9 / -1 -> index (-1 = out of scope)."""
    text = str(value).strip().lower()
    if text in CIFAR10_LABELS:
        return CIFAR10_LABELS.index(text)
    if text in ("other", "-1", ""):
        return -1
    try:
        index = int(text)
    except ValueError:
        raise DatasetError(f"label {value!r} is not a CIFAR-10 class, 'other' or an index") from None
    if not -1 <= index <= 9:
        raise DatasetError(f"label index {index} out of range -1..9")
    return index


def image_folder(root: str, name: str | None = None) -> Dataset:
    ids, uris, labels = [], [], []
    files = storage.list_files(root, IMAGE_SUFFIXES)
    _, root_path = storage.filesystem(root)
    root_clean = ("s3://" + root_path) if storage.is_s3(root) else root_path
    for uri in sorted(files):
        rel = uri[len(root_clean):].lstrip("/")
        parts = rel.split("/")
        if len(parts) < 2:
            continue  # loose files at the root carry no label
        label = parts[0].lower()
        if label != "other" and label not in CIFAR10_LABELS:
            raise DatasetError(f"{root}: folder {parts[0]!r} is not a CIFAR-10 class or 'other'")
        ids.append(rel)
        uris.append(uri)
        labels.append(parse_label(label))
    if not ids:
        raise DatasetError(f"{root}: no images in <class>/ folders")
    return Dataset(name or os.path.basename(root_clean), ids, uris, np.array(labels, np.int64),
                   {"layout": "folder", "root": root})


def manifest(path: str, name: str | None = None) -> Dataset:
    text = storage.read_bytes(path).decode("utf-8")
    if path.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    ids, uris, labels = [], [], []
    for k, row in enumerate(rows):
        uri = row.get("uri") or row.get("path")
        if not uri or "label" not in row:
            raise DatasetError(f"{path}: row {k + 1} needs 'uri' (or 'path') and 'label'")
        if "://" not in uri and not os.path.isabs(uri):
            uri = storage.join(base, uri)
        ids.append(str(row.get("id") or uri.rsplit("/", 1)[-1]))
        uris.append(uri)
        labels.append(parse_label(row["label"]))
    stem = os.path.splitext(os.path.basename(path))[0]
    return Dataset(name or stem, ids, uris, np.array(labels, np.int64), {"layout": "manifest", "path": path})


def imagenet_sample(root: str, name: str = "imagenet-sample") -> Dataset:
    from twostream.core.mapping import load_mapping

    mapping = load_mapping().array
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(root, "labels.csv")).decode())))
    ids = [r["file"] for r in rows]
    uris = [storage.join(root, r["file"]) for r in rows]
    labels = np.array([int(mapping[int(r["imagenet_index"])]) for r in rows], np.int64)
    imagenet = np.array([int(r["imagenet_index"]) for r in rows], np.int64)
    return Dataset(name, ids, uris, labels, {"layout": "imagenet-sample", "root": root,
                                            "imagenet_index": imagenet.tolist()})


def open_dataset(spec: str) -> Dataset:
    """``[name=]kind:location`` with kind ``folder``, ``manifest`` or ``imagenet-sample``."""
    name = None
    if "=" in spec.split(":", 1)[0]:
        name, spec = spec.split("=", 1)
    if ":" not in spec or spec.startswith(("s3://", "/")):
        raise DatasetError(f"dataset spec {spec!r} must be kind:location (folder, manifest, imagenet-sample)")
    kind, location = spec.split(":", 1)
    if kind == "folder":
        return image_folder(location, name)
    if kind == "manifest":
        return manifest(location, name)
    if kind == "imagenet-sample":
        return imagenet_sample(location, name or "imagenet-sample")
    raise DatasetError(f"unknown dataset kind {kind!r} (folder, manifest, imagenet-sample)")


def to_working_size(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> shorter side ``size`` (bicubic, antialiased) -> centre crop, uint8."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_images(dataset: Dataset, size: int = 256, limits: LimitsConfig | None = None,
                streams: Sequence[InputSpec] = ()) -> np.ndarray:
    """Decode every image as an upload is decoded for ``streams`` (``scoring.stream_specs``: a
    large JPEG reduced as ``limits.reduced_decode`` allows) and bring it to ``size x size``:
    (N, size, size, 3) uint8."""
    out = np.empty((len(dataset), size, size, 3), np.uint8)
    for k, uri in enumerate(dataset.uris):
        out[k] = to_working_size(decode_image(storage.read_bytes(uri), limits, streams), size)
    return out


def to_batch(images: np.ndarray) -> "torch.Tensor":
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 torch tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def from_batch(x: "torch.Tensor") -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8, rounded (what an upload would carry)."""
    import torch

    return x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
