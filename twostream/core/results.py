"""The one result type of scoring: :class:`ScoredBatch`, columns for a batch of images.

:func:`score_rows` builds it from the two streams' top-k and the per-image errors (Algorithm 1
through :mod:`twostream.core.comparator`); every caller consumes it: :class:`~twostream.core.
scoring.Scorer`, the batch job's compare stage, the Serve app, the audit and the evaluation.
Masking of error rows, "no winner" as null, the mapped labels and the Arrow form live here
only. NumPy and pyarrow, no torch: the audit's what-if uses it without the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from twostream.core.comparator import compare
from twostream.core.config import ThresholdsConfig
from twostream.core.labels import CIFAR10_LABELS, OTHER_LABEL, Verdict
from twostream.core.mapping import load_mapping

_LABELS = np.array(CIFAR10_LABELS + (OTHER_LABEL,), dtype=object)  # index -1 -> "other"

# The scored columns of one image, in output order (the batch job adds its identity columns).
SCORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("image_id", pa.string()),
    pa.field("width", pa.int32()),  # decoded size (null on error)
    pa.field("height", pa.int32()),
    pa.field("verdict", pa.string()),  # Verdict
    pa.field("label", pa.string()),  # CIFAR-10 label when accepted, else null
    pa.field("imagenet_index", pa.int32()),  # winning ImageNet class when accepted, else null
    pa.field("agreement", pa.float64()),  # P_high * P_low of the winning pair, 0 when rejected
    pa.field("high_idx", pa.list_(pa.int32())),  # H-Net top-k ImageNet indices (null on error)
    pa.field("high_prob", pa.list_(pa.float32())),
    pa.field("high_labels", pa.list_(pa.string())),  # top-k mapped through the ImageNet->CIFAR-10 table
    pa.field("low_idx", pa.list_(pa.int32())),  # L-Net top-k CIFAR-10 indices
    pa.field("low_prob", pa.list_(pa.float32())),
    pa.field("low_labels", pa.list_(pa.string())),
    pa.field("error", pa.string()),  # why the input could not be scored, else null
)
SCORE_SCHEMA = pa.schema(list(SCORE_FIELDS))


@dataclass
class ScoreResult:
    """The verdict on one image, with both streams' evidence (a row of a :class:`ScoredBatch`)."""

    image_id: str
    verdict: str  # Verdict
    label: str | None  # CIFAR-10 label when accepted
    imagenet_index: int | None  # the winning ImageNet class when accepted
    agreement: float  # P_high[i] * P_low[j] of the winning pair, 0 when rejected
    high_idx: list[int] = field(default_factory=list)
    high_prob: list[float] = field(default_factory=list)
    high_labels: list[str] = field(default_factory=list)
    low_idx: list[int] = field(default_factory=list)
    low_prob: list[float] = field(default_factory=list)
    low_labels: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.verdict == Verdict.ADVERSARIAL

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScoredBatch:
    """Columns for N images. Error rows (``error`` set) have verdict ``error``, label None,
    ``imagenet_index`` -1, agreement 0, size -1 and top-k rows of zeros (null in Arrow)."""

    image_id: np.ndarray  # (N,) object str
    verdict: np.ndarray  # (N,) object: Verdict
    label: np.ndarray  # (N,) object: str | None
    imagenet_index: np.ndarray  # (N,) int32, -1 when none
    agreement: np.ndarray  # (N,) float64
    high_idx: np.ndarray  # (N, k_high) int32
    high_prob: np.ndarray  # (N, k_high) float32
    high_labels: np.ndarray  # (N, k_high) object
    low_idx: np.ndarray  # (N, k_low) int32
    low_prob: np.ndarray  # (N, k_low) float32
    low_labels: np.ndarray  # (N, k_low) object
    width: np.ndarray  # (N,) int32, -1 on error
    height: np.ndarray  # (N,) int32, -1 on error
    error: np.ndarray  # (N,) object: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)  # per image, of the whole batch

    def __len__(self) -> int:
        return len(self.image_id)

    @classmethod
    def concat(cls, batches: Sequence["ScoredBatch"]) -> "ScoredBatch":
        """The rows of one or more batches, in order (their timings are dropped)."""
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in batches])
                      for f in fields(cls) if f.name != "timings_ms"})

    @property
    def scored(self) -> np.ndarray:
        """True where both streams scored the image (an Algorithm-2 event)."""
        return self.verdict != Verdict.ERROR

    @property
    def rejected(self) -> np.ndarray:
        return self.verdict == Verdict.ADVERSARIAL

    def to_arrow(self) -> pa.Table:
        """The batch as a table with :data:`SCORE_SCHEMA` (nulls where an error row has no value)."""
        ok = self.scored
        missing = ~ok

        def lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
            k = values.shape[1]
            offsets = np.arange(len(values) + 1, dtype=np.int32) * k
            flat = pa.array(values.reshape(-1).tolist() if values.dtype == object else values.reshape(-1),
                            type=type_.value_type)
            return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(missing))

        columns = {
            "image_id": pa.array(self.image_id.tolist(), pa.string()),
            "width": pa.array(self.width, pa.int32(), mask=missing),
            "height": pa.array(self.height, pa.int32(), mask=missing),
            "verdict": pa.array([str(v) for v in self.verdict], pa.string()),
            "label": pa.array(self.label.tolist(), pa.string()),
            "imagenet_index": pa.array(self.imagenet_index, pa.int32(), mask=self.imagenet_index < 0),
            "agreement": pa.array(self.agreement, pa.float64()),
            "high_idx": lists(self.high_idx, pa.list_(pa.int32())),
            "high_prob": lists(self.high_prob, pa.list_(pa.float32())),
            "high_labels": lists(self.high_labels, pa.list_(pa.string())),
            "low_idx": lists(self.low_idx, pa.list_(pa.int32())),
            "low_prob": lists(self.low_prob, pa.list_(pa.float32())),
            "low_labels": lists(self.low_labels, pa.list_(pa.string())),
            "error": pa.array(self.error.tolist(), pa.string()),
        }
        return pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)

    def row(self, k: int) -> ScoreResult:
        """Image ``k`` as a :class:`ScoreResult` (empty top-k and no size on an error row)."""
        ok = self.verdict[k] != Verdict.ERROR
        index = int(self.imagenet_index[k])
        return ScoreResult(
            image_id=str(self.image_id[k]),
            verdict=str(self.verdict[k]),
            label=self.label[k],
            imagenet_index=index if index >= 0 else None,
            agreement=float(self.agreement[k]),
            high_idx=[int(v) for v in self.high_idx[k]] if ok else [],
            high_prob=[float(v) for v in self.high_prob[k]] if ok else [],
            high_labels=[str(v) for v in self.high_labels[k]] if ok else [],
            low_idx=[int(v) for v in self.low_idx[k]] if ok else [],
            low_prob=[float(v) for v in self.low_prob[k]] if ok else [],
            low_labels=[str(v) for v in self.low_labels[k]] if ok else [],
            width=int(self.width[k]) if ok else None,
            height=int(self.height[k]) if ok else None,
            error=self.error[k],
            timings_ms=dict(self.timings_ms),
        )

    def results(self) -> list[ScoreResult]:
        """One :class:`ScoreResult` per image, in order."""
        return [self.row(k) for k in range(len(self))]


def _matrix(values: Any, n: int, k: int, dtype: type) -> np.ndarray:
    array = np.array(values, dtype=dtype)  # a copy: the error rows are zeroed in place
    if array.size == 0:
        return np.zeros((n, k), dtype)
    if array.shape != (n, k):
        raise ValueError(f"top-k of shape {array.shape}, expected ({n}, {k})")
    return array


def score_rows(
    ids: Sequence[str],
    errors: Sequence[str | None],
    sizes: Sequence[tuple[int, int] | None],
    high_idx: Any,
    high_prob: Any,
    low_idx: Any,
    low_prob: Any,
    thresholds: ThresholdsConfig,
) -> ScoredBatch:
    """The one builder of results: Algorithm 1 on the rows without an error.

    ``errors[i]`` is None for a scored image (then ``sizes[i]`` is its decoded (height, width));
    the top-k arrays are ``(N, k)`` for all N rows, the values of error rows being ignored (an
    empty array stands for "no row scored").
    """
    n = len(ids)
    if not len(errors) == len(sizes) == n:
        raise ValueError(f"{n} ids, {len(errors)} errors, {len(sizes)} sizes")
    ok = np.array([e is None for e in errors], bool)
    k_high = np.shape(high_idx)[1] if np.ndim(high_idx) == 2 else 0
    k_low = np.shape(low_idx)[1] if np.ndim(low_idx) == 2 else 0
    h_idx = _matrix(high_idx, n, k_high, np.int64)
    h_prob = _matrix(high_prob, n, k_high, np.float32)
    l_idx = _matrix(low_idx, n, k_low, np.int64)
    l_prob = _matrix(low_prob, n, k_low, np.float32)
    h_idx[~ok] = 0
    h_prob[~ok] = 0
    l_idx[~ok] = 0
    l_prob[~ok] = 0

    mapping = load_mapping().array
    verdict = np.full(n, Verdict.ERROR, dtype=object)
    label = np.full(n, None, dtype=object)
    imagenet_index = np.full(n, -1, np.int32)
    agreement = np.zeros(n, np.float64)
    if ok.any():
        result = compare(h_idx[ok], h_prob[ok], l_idx[ok], l_prob[ok], mapping, thresholds.p1, thresholds.p2)
        accepted = result.accepted
        verdict[ok] = np.where(accepted, Verdict.ACCEPTED, Verdict.ADVERSARIAL)
        label[ok] = np.where(accepted, _LABELS[result.label.astype(np.int64)], None)
        imagenet_index[ok] = np.where(accepted, result.imagenet_index, -1)
        agreement[ok] = np.where(accepted, result.score, 0.0)
    height = np.array([s[0] if s is not None and e is None else -1 for s, e in zip(sizes, errors)], np.int32)
    width = np.array([s[1] if s is not None and e is None else -1 for s, e in zip(sizes, errors)], np.int32)
    return ScoredBatch(
        image_id=np.array([str(i) for i in ids], dtype=object),
        verdict=verdict,
        label=label,
        imagenet_index=imagenet_index,
        agreement=agreement,
        high_idx=h_idx.astype(np.int32),
        high_prob=h_prob,
        high_labels=_LABELS[mapping[h_idx].astype(np.int64)],
        low_idx=l_idx.astype(np.int32),
        low_prob=l_prob,
        low_labels=_LABELS[l_idx],
        width=width,
        height=height,
        error=np.array(list(errors), dtype=object),
    )
