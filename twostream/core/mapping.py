"""The ImageNet-1k -> CIFAR-10 mapping table M (SPEC 1).

Shipped as ``twostream/core/data/imagenet_to_cifar10.csv`` (index, wnid, name, cifar10_label) with
a version in ``imagenet_to_cifar10.VERSION``; built by ``tools/build_mapping.py`` from WordNet
3.0 hypernyms plus CIFAR-10's class definitions (rules and counts: docs/mapping.md).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from twostream.core.comparator import OTHER
from twostream.core.labels import CIFAR10_LABELS

TABLE = "imagenet_to_cifar10.csv"
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ImageNetMapping:
    """One row per ImageNet class, in ImageNet index order."""

    array: np.ndarray  # (1000,) int8: CIFAR-10 index, or OTHER (-1)
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    labels: tuple[str, ...]  # CIFAR-10 label name or "other"
    version: str

    def label_of(self, imagenet_index: int) -> str:
        return self.labels[imagenet_index]

    def counts(self) -> dict[str, int]:
        """Number of ImageNet classes per label, ``other`` included."""
        counted = Counter(self.labels)
        return {label: counted[label] for label in CIFAR10_LABELS + ("other",)}


def parse_mapping(text: str, version: str = "unversioned") -> ImageNetMapping:
    """Parse and validate the CSV text of a mapping table."""
    reader = csv.DictReader(io.StringIO(text))
    expected = ["imagenet_index", "wnid", "name", "cifar10_label"]
    if reader.fieldnames != expected:
        raise ValueError(f"mapping table header is {reader.fieldnames}, expected {expected}")
    known = set(CIFAR10_LABELS) | {"other"}
    wnids, names, labels = [], [], []
    for line, row in enumerate(reader, start=2):
        if row["imagenet_index"] != str(len(labels)):
            raise ValueError(f"mapping table line {line}: index {row['imagenet_index']!r}, expected {len(labels)}")
        if row["cifar10_label"] not in known:
            raise ValueError(f"mapping table line {line}: unknown label {row['cifar10_label']!r}")
        wnids.append(row["wnid"])
        names.append(row["name"])
        labels.append(row["cifar10_label"])
    if len(labels) != NUM_CLASSES:
        raise ValueError(f"mapping table has {len(labels)} rows, expected {NUM_CLASSES}")
    index = {label: k for k, label in enumerate(CIFAR10_LABELS)}
    array = np.array([index.get(label, OTHER) for label in labels], dtype=np.int8)
    array.setflags(write=False)
    return ImageNetMapping(array, tuple(wnids), tuple(names), tuple(labels), version)


@lru_cache(maxsize=1)
def load_mapping() -> ImageNetMapping:
    """The table shipped with the package (cached)."""
    data = resources.files("twostream.core") / "data"
    version = (data / "imagenet_to_cifar10.VERSION").read_text().strip()
    return parse_mapping((data / TABLE).read_text(encoding="utf-8"), version)
