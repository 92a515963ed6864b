"""The endpoint's model work on the scoring core (:func:`~twostream.core.scoring.decode_many`,
:class:`~twostream.core.scoring.StreamScorer`, :func:`~twostream.core.results.score_rows`), for
both topologies:

* :class:`FusedModels` (``serve.topology: fused``): both streams and the comparator in one
  place; a batch of uploads is decoded once, run through both streams and compared at once.
* :class:`StreamRunner` (``split``): one stream's answers (:class:`StreamAnswer`), joined into
  a verdict by the ingress (:func:`twostream.online.answers.join_answers`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from twostream.core.config import TwoStreamConfig
from twostream.core.results import ScoredBatch, score_rows
from twostream.core.scoring import StreamScorer, decode_many, scatter_topk
from twostream.online.answers import StreamAnswer

WARMUP = np.zeros((32, 32, 3), np.uint8)


class Scored(NamedTuple):
    """One upload's verdict: row ``row`` of ``batch``, with the model times (ms) of that batch."""

    batch: ScoredBatch
    row: int
    timings_ms: dict[str, float]


class StreamRunner:
    """One stream: encoded uploads -> :class:`StreamAnswer` each (decode, resize, forward, top-k)."""

    def __init__(self, config: TwoStreamConfig, kind: Literal["high", "low"]) -> None:
        self.scorer = StreamScorer(config, kind)
        self.limits = config.limits
        self.answers([WARMUP])  # allocations, lazy init

    def answers(self, items: Sequence[bytes | np.ndarray]) -> list[StreamAnswer]:
        started = time.perf_counter()
        images, errors = decode_many(items, self.limits)
        rows = [k for k, image in enumerate(images) if image is not None]
        idx, prob = scatter_topk(len(items), rows, *self.scorer.topk([images[k] for k in rows]))
        ms = (time.perf_counter() - started) * 1e3
        return [
            StreamAnswer(idx[k], prob[k], None if image is None else image.shape[:2], error, ms)
            for k, (image, error) in enumerate(zip(images, errors))
        ]


class FusedModels:
    """Both streams and Algorithm 1: ``score([(encoded, image_id), ...])`` -> one :class:`Scored` each."""

    def __init__(self, config: TwoStreamConfig) -> None:
        self.config = config
        self.high = StreamScorer(config, "high")
        self.low = StreamScorer(config, "low")
        self.score([(WARMUP, "warm-up")])

    def score(self, items: Sequence[tuple[bytes | np.ndarray, str]]) -> list[Scored]:
        t0 = time.perf_counter()
        images, errors = decode_many([data for data, _ in items], self.config.limits)
        rows = [k for k, image in enumerate(images) if image is not None]
        good = [images[k] for k in rows]
        t1 = time.perf_counter()
        high = scatter_topk(len(items), rows, *self.high.topk(good))
        t2 = time.perf_counter()
        low = scatter_topk(len(items), rows, *self.low.topk(good))
        t3 = time.perf_counter()
        sizes = [None if image is None else image.shape[:2] for image in images]
        batch = score_rows([i for _, i in items], errors, sizes, *high, *low, self.config.thresholds)
        t4 = time.perf_counter()
        timings = {
            "decode": (t1 - t0) * 1e3,
            "high_model": (t2 - t1) * 1e3,
            "low_model": (t3 - t2) * 1e3,
            "compare": (t4 - t3) * 1e3,
        }
        return [Scored(batch, k, timings) for k in range(len(items))]
