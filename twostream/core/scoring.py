"""The scoring path shared by the CLI, the Ray batch job, the Serve app, the audit and the evaluation.

Stages, each a plain function so that the Ray job and the Serve app can place them apart:

1. :func:`decode_many` - bytes -> RGB arrays (errors kept per image, ``limits.min_side`` checked).
2. :func:`prepare` - a stream's own differentiable resize, stacked into a batch: the stream's
   *prepared input*, the one function for every path (the batch job computes it in its decode
   tasks with :func:`input_spec` and ships only it to the stream actors, never the pixels).
3. :func:`stream_topk` - forward pass, softmax, top-k.
4. :func:`twostream.core.results.score_rows` - Algorithm 1 into a :class:`ScoredBatch`.

:class:`StreamScorer` is one stream ready to run stages 2-3 (built, placed, k and batch size
from the config); :class:`Scorer` chains all four: ``Scorer(config).score(images, ids)``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import PIL.Image
import torch

from twostream.core.config import LimitsConfig, StreamConfig, TwoStreamConfig
from twostream.core.models import SEPARABLE, InputSpec, Stream, build_stream, resize_image, resize_strips
from twostream.core.preprocess import (
    STRIP_ROWS,
    ImageDecodeError,
    check_min_side,
    decode_image,
    pixel_rows,
    to_tensor01,
)
from twostream.core.results import ScoredBatch, ScoreResult, score_rows


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
    items: Sequence[bytes | np.ndarray], limits: LimitsConfig, streams: Sequence[InputSpec] = ()
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode each item (bytes, or an already decoded (H, W, 3) uint8 array, checked) for
    ``streams``, the input geometry of both streams (:func:`stream_specs`; every scoring caller
    passes it): a large JPEG is decoded reduced as ``limits.reduced_decode`` allows
    (:func:`~twostream.core.preprocess.decode_image`); without streams, at full size.

    A failure becomes ``None`` with its reason instead of an exception. An image narrower or
    lower than ``limits.min_side`` is a failure too (nothing to classify; not a reputation event).
    """
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for item in items:
        try:
            if isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                    raise ImageDecodeError(f"expected (H, W, 3) uint8, got {item.shape} {item.dtype}")
                image = item
            else:
                image = decode_image(bytes(item), limits, streams)
            check_min_side(*image.shape[:2], limits)
            images.append(image)
            errors.append(None)
        except ImageDecodeError as exc:
            images.append(None)
            errors.append(str(exc))
    return images, errors


RGBImage = np.ndarray | torch.Tensor | PIL.Image.Image  # what prepare takes (see there)


def prepare(spec: InputSpec | Stream, images: Sequence[RGBImage]) -> torch.Tensor:
    """A stream's prepared input: each RGB image resized as the stream's :class:`InputSpec` says
    (``Stream.resize``), stacked: (N, 3, h, w) float32 in [0, 1]. Images are (H, W, 3) uint8
    arrays (the CPU decoder's), RGB Pillow images (:func:`~twostream.core.preprocess.decode_rgb`,
    read a strip at a time without a full array), or (3, H, W) uint8 tensors (the device
    decoder's, :mod:`twostream.core.device_decode`), prepared on their own device.

    An image of more than :data:`STRIP_ROWS` rows is converted to float and narrowed a strip at
    a time (:func:`~twostream.core.models.resize_strips`, the same tensor bit for bit), so a
    6000x6000 upload costs an 18 MB float strip instead of a 432 MB float copy."""
    spec = spec.spec if isinstance(spec, Stream) else spec
    with torch.no_grad():
        return torch.cat([_prepare_one(image, spec) for image in images])


def _rows(image: RGBImage, top: int, stop: int) -> np.ndarray | torch.Tensor:
    """Rows ``[top, stop)`` of an image, in its own layout (a tensor's are (3, rows, W))."""
    if isinstance(image, PIL.Image.Image):
        return pixel_rows(image, top, stop)
    return image[:, top:stop] if isinstance(image, torch.Tensor) else image[top:stop]


def _prepare_one(image: RGBImage, spec: InputSpec) -> torch.Tensor:
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
    else:
        height, width = image.shape[1:] if isinstance(image, torch.Tensor) else image.shape[:2]
    if height <= STRIP_ROWS or spec.interpolation not in SEPARABLE:
        return resize_image(to_tensor01(_rows(image, 0, height)), spec)
    strips = (to_tensor01(_rows(image, top, min(height, top + STRIP_ROWS))) for top in range(0, height, STRIP_ROWS))
    return resize_strips(strips, height, width, spec)


@functools.lru_cache(maxsize=8)
def _input_spec(kind: str, model: str) -> InputSpec:
    from twostream.core.config import HighStreamConfig, LowStreamConfig

    section = HighStreamConfig if kind == "high" else LowStreamConfig
    return build_stream(section(model=model, weights="random"), kind).spec  # the spec is the model's, not its weights'


def input_spec(config: TwoStreamConfig, kind: Literal["high", "low"]) -> InputSpec:
    """The :class:`InputSpec` of a stream's model (what :func:`prepare` needs), without loading
    its weights; cached per process."""
    return _input_spec(kind, getattr(config, kind).model)


def stream_specs(config: TwoStreamConfig) -> tuple[InputSpec, InputSpec]:
    """Both streams' :class:`InputSpec` (high, low): what every decode of an upload is for
    (:func:`decode_many`, ``limits.reduced_decode``); without weights, cached per process."""
    return input_spec(config, "high"), input_spec(config, "low")


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


class StreamScorer:
    """One stream ready to score decoded images: built from its config section, on its device,
    with its threads; ``topk`` returns the config's ``top_k`` for a list of RGB arrays."""

    def __init__(self, config: TwoStreamConfig, kind: Literal["high", "low"], stream: Stream | None = None) -> None:
        self.kind = kind
        self.config: StreamConfig = getattr(config, kind)
        self.k = self.config.top_k
        self.device = resolve_device(self.config.device)
        self.stream = (stream or build_stream(self.config, kind)).to(self.device).eval()

    def topk(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) class indices and probabilities; (0, k) arrays for no image."""
        if not images:
            return np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32)
        return self.topk_prepared(prepare(self.stream, images))

    def topk_prepared(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`topk` of images already through :func:`prepare`: (N, 3, h, w) at the stream's size."""
        return stream_topk(self.stream, batch, self.k, self.config.batch_size, self.device)


def scatter_topk(
    n: int, rows: Sequence[int], idx: np.ndarray, prob: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the scored ``rows`` placed into (n, k) arrays (zeros elsewhere)."""
    full_idx = np.zeros((n, idx.shape[1]), np.int64)
    full_prob = np.zeros((n, prob.shape[1]), np.float32)
    full_idx[list(rows)] = idx
    full_prob[list(rows)] = prob
    return full_idx, full_prob


class Scorer:
    """Both streams plus the comparator; ``score`` is the whole per-image verdict."""

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
        self.high_scorer = StreamScorer(self.config, "high", high)
        self.low_scorer = StreamScorer(self.config, "low", low)

    @property
    def high(self) -> Stream:
        """The H-Net module (what attacks differentiate through)."""
        return self.high_scorer.stream

    @property
    def low(self) -> Stream:
        """The L-Net module."""
        return self.low_scorer.stream

    def score(self, images: Sequence[bytes | np.ndarray], ids: Sequence[str] | None = None) -> ScoredBatch:
        """Score images given as encoded bytes or decoded (H, W, 3) uint8 RGB arrays."""
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(images))]
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        started = time.perf_counter()
        decoded, errors = decode_many(images, self.config.limits, (self.high.spec, self.low.spec))
        t0 = time.perf_counter()
        good = [k for k, image in enumerate(decoded) if image is not None]
        good_images = [decoded[k] for k in good]
        high = scatter_topk(len(images), good, *self.high_scorer.topk(good_images))
        t1 = time.perf_counter()
        low = scatter_topk(len(images), good, *self.low_scorer.topk(good_images))
        t2 = time.perf_counter()
        sizes = [image.shape[:2] if image is not None else None for image in decoded]
        batch = score_rows(ids, errors, sizes, *high, *low, self.config.thresholds)
        t3 = time.perf_counter()
        n = max(len(good), 1)
        batch.timings_ms = {"decode": (t0 - started) * 1e3 / max(len(images), 1)}
        if good:
            batch.timings_ms.update(high=(t1 - t0) * 1e3 / n, low=(t2 - t1) * 1e3 / n, compare=(t3 - t2) * 1e3 / n)
        return batch

    def score_batch(
        self, images: Sequence[bytes | np.ndarray], ids: Sequence[str] | None = None
    ) -> list[ScoreResult]:
        """:meth:`score` as one :class:`ScoreResult` per image."""
        return self.score(images, ids).results()
