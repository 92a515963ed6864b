"""The one scoring path shared by the CLI, the Ray batch job, the Serve app and the evaluation.

Stages, each a plain function so that the Ray job can place them in separate pools:

1. :func:`decode_many` - bytes -> RGB arrays (errors kept per image).
2. :func:`prepare` - each stream's own differentiable resize, stacked into a batch.
3. :func:`stream_topk` - forward pass, softmax, top-k.
4. :func:`verdict_columns` - Algorithm 1 over the batch (:mod:`twostream.core.comparator`).

:class:`Scorer` chains them: ``Scorer(config).score_batch(images) -> list[ScoreResult]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from twostream.core.comparator import compare
from twostream.core.config import CIFAR10_LABELS, LimitsConfig, StreamConfig, ThresholdsConfig, TwoStreamConfig
from twostream.core.mapping import load_mapping
from twostream.core.models import Stream, build_stream
from twostream.core.preprocess import ImageDecodeError, decode_image, to_tensor01

ACCEPTED = "accepted"
ADVERSARIAL = "adversarial"
ERROR = "error"

_LABELS = np.array(CIFAR10_LABELS + ("other",), dtype=object)  # index -1 -> "other"


@dataclass
class ScoreResult:
    """The verdict on one image, with both streams' evidence."""

    image_id: str
    verdict: str  # accepted | adversarial | error
    label: str | None  # CIFAR-10 label when accepted
    imagenet_index: int | None  # the winning ImageNet class when accepted
    agreement: float  # P_high[i] * P_low[j] of the winning pair, 0 when rejected
    high_idx: list[int] = field(default_factory=list)  # H-Net top-5 ImageNet indices
    high_prob: list[float] = field(default_factory=list)
    high_labels: list[str] = field(default_factory=list)  # top-5 mapped through the table
    low_idx: list[int] = field(default_factory=list)  # L-Net top-2 CIFAR-10 indices
    low_prob: list[float] = field(default_factory=list)
    low_labels: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.verdict == ADVERSARIAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_threads(cfg: StreamConfig) -> int:
    """Set torch's intra-op threads for a stream's worker and return the count.

    ``cfg.threads``, or with 0 the node's cores shared among the stream's pool: Ray starts
    workers with ``OMP_NUM_THREADS=1``, which would leave the other cores of a CPU node idle.
    """
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.pool_size)
    torch.set_num_threads(threads)
    return threads


def decode_many(
    items: Sequence[bytes | np.ndarray], limits: LimitsConfig
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode each item (bytes, or an already decoded (H, W, 3) uint8 array, checked).

    A failure becomes ``None`` with its reason instead of an exception.
    """
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for item in items:
        try:
            if isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                    raise ImageDecodeError(f"expected (H, W, 3) uint8, got {item.shape} {item.dtype}")
                images.append(item)
            else:
                images.append(decode_image(bytes(item), limits))
            errors.append(None)
        except ImageDecodeError as exc:
            images.append(None)
            errors.append(str(exc))
    return images, errors


def prepare(stream: Stream, images: Sequence[np.ndarray]) -> torch.Tensor:
    """Resize each RGB image with the stream's own resize and stack: (N, 3, h, w) in [0, 1]."""
    with torch.no_grad():
        return torch.cat([stream.resize(to_tensor01(image)) for image in images])


def stream_topk(
    stream: Stream, batch: torch.Tensor, k: int, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class indices (int64) and softmax probabilities (float32) for a prepared batch."""
    indices, probs = [], []
    with torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            logits = stream(batch[start : start + batch_size].to(device))
            top = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
            indices.append(top.indices.cpu())
            probs.append(top.values.cpu())
    if not indices:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return torch.cat(indices).numpy(), torch.cat(probs).numpy()


def verdict_columns(
    high_idx: np.ndarray,
    high_prob: np.ndarray,
    low_idx: np.ndarray,
    low_prob: np.ndarray,
    thresholds: ThresholdsConfig,
) -> dict[str, np.ndarray]:
    """Algorithm 1 over a batch, as columns ready for a table.

    Columns: ``verdict``, ``label`` (None when rejected), ``imagenet_index`` (-1 when
    rejected), ``agreement``, ``high_labels`` (top-5 mapped labels), ``low_labels``.
    """
    mapping = load_mapping().array
    result = compare(high_idx, high_prob, low_idx, low_prob, mapping, thresholds.p1, thresholds.p2)
    label = _LABELS[result.label.astype(np.int64)]
    return {
        "verdict": np.where(result.accepted, ACCEPTED, ADVERSARIAL).astype(object),
        "label": np.where(result.accepted, label, None),
        "imagenet_index": result.imagenet_index,
        "agreement": result.score,
        "high_labels": _LABELS[mapping[np.asarray(high_idx)].astype(np.int64)],
        "low_labels": _LABELS[np.asarray(low_idx).astype(np.int64)],
    }


class Scorer:
    """Both streams plus the comparator; ``score_batch`` is the whole per-image verdict."""

    def __init__(
        self,
        config: TwoStreamConfig | None = None,
        *,
        high: Stream | None = None,
        low: Stream | None = None,
    ) -> None:
        self.config = config or TwoStreamConfig()
        if self.config.high.threads:
            torch.set_num_threads(self.config.high.threads)
        self.high_device = resolve_device(self.config.high.device)
        self.low_device = resolve_device(self.config.low.device)
        self.high = (high or build_stream(self.config.high, "high")).to(self.high_device).eval()
        self.low = (low or build_stream(self.config.low, "low")).to(self.low_device).eval()

    def score_batch(
        self, images: Sequence[bytes | np.ndarray], ids: Sequence[str] | None = None
    ) -> list[ScoreResult]:
        """Score images given as encoded bytes or decoded (H, W, 3) uint8 RGB arrays."""
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(images))]
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        cfg = self.config

        started = time.perf_counter()
        decoded, errors = decode_many(images, cfg.limits)
        decode_ms = (time.perf_counter() - started) * 1e3

        good = [k for k, image in enumerate(decoded) if image is not None]
        good_images = [decoded[k] for k in good]
        n = max(len(good), 1)
        timings = {"decode": decode_ms / max(len(images), 1)}
        columns: dict[str, np.ndarray] = {}
        if good:
            t0 = time.perf_counter()
            high_idx, high_prob = stream_topk(
                self.high, prepare(self.high, good_images), 5, cfg.high.batch_size, self.high_device
            )
            t1 = time.perf_counter()
            low_idx, low_prob = stream_topk(
                self.low, prepare(self.low, good_images), 2, cfg.low.batch_size, self.low_device
            )
            t2 = time.perf_counter()
            columns = verdict_columns(high_idx, high_prob, low_idx, low_prob, cfg.thresholds)
            t3 = time.perf_counter()
            columns.update(high_idx=high_idx, high_prob=high_prob, low_idx=low_idx, low_prob=low_prob)
            timings.update(high=(t1 - t0) * 1e3 / n, low=(t2 - t1) * 1e3 / n, compare=(t3 - t2) * 1e3 / n)

        results = [
            ScoreResult(image_id=ids[k], verdict=ERROR, label=None, imagenet_index=None,
                        agreement=0.0, error=errors[k], timings_ms=dict(timings))
            for k in range(len(images))
        ]
        for row, k in enumerate(good):
            height, width = decoded[k].shape[:2]
            index = int(columns["imagenet_index"][row])
            results[k] = ScoreResult(
                image_id=ids[k],
                verdict=str(columns["verdict"][row]),
                label=columns["label"][row],
                imagenet_index=index if index >= 0 else None,
                agreement=float(columns["agreement"][row]),
                high_idx=[int(v) for v in columns["high_idx"][row]],
                high_prob=[float(v) for v in columns["high_prob"][row]],
                high_labels=[str(v) for v in columns["high_labels"][row]],
                low_idx=[int(v) for v in columns["low_idx"][row]],
                low_prob=[float(v) for v in columns["low_prob"][row]],
                low_labels=[str(v) for v in columns["low_labels"][row]],
                width=int(width),
                height=int(height),
                timings_ms=dict(timings),
            )
        return results
