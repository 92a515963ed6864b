"""The endpoint's model work on the scoring core (:func:`~twostream.core.scoring.decode_many`,
:class:`~twostream.core.scoring.StreamScorer`, :func:`~twostream.core.results.score_rows`), for
both topologies:

* :class:`FusedModels` (``serve.topology: fused``): both streams and the comparator in one
  place; a batch of uploads is decoded once, run through both streams at the same time (the
  low stream in a thread of its own: the replica holds the CPUs of both, and the query
  detector's fingerprints are made there after it) and compared at once.
* :class:`StreamRunner` (``split``): one stream's answers (:class:`StreamAnswer`), joined into
  a verdict by the ingress (:func:`twostream.online.answers.join_answers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
import torch

from twostream.core.config import TwoStreamConfig
from twostream.core.query_detector import Fingerprint, QueryDetectorConfig, fingerprint
from twostream.core.results import ScoredBatch, score_rows
from twostream.core.scoring import StreamScorer, decode_many, scatter_topk, stream_specs
from twostream.online.answers import StreamAnswer

WARMUP = np.zeros((32, 32, 3), np.uint8)


class Scored(NamedTuple):
    """One upload's verdict: row ``row`` of ``batch``, with the model times (ms) of that batch and
    the image's query-detector fingerprint (None: the detector is off, or the image not decoded)."""

    batch: ScoredBatch
    row: int
    timings_ms: dict[str, float]
    fingerprint: Fingerprint | None = None


def detector_config(config: TwoStreamConfig) -> QueryDetectorConfig | None:
    """The query detector's rules when it is on (``detector.enabled``), else None."""
    return config.detector.query_config() if config.detector.enabled else None


def fingerprints(images: Sequence[np.ndarray | None], config: QueryDetectorConfig | None) -> list[Fingerprint | None]:
    """Each decoded image's fingerprint (None for an undecoded one, or all when the detector is off)."""
    return [None if config is None or image is None else fingerprint(image, config) for image in images]


class StreamRunner:
    """One stream: encoded uploads -> :class:`StreamAnswer` each (decode, resize, forward, top-k)."""

    def __init__(self, config: TwoStreamConfig, kind: Literal["high", "low"]) -> None:
        self.scorer = StreamScorer(config, kind)
        self.limits = config.limits
        self.streams = stream_specs(config)  # both streams': each runner decodes as the other does
        self.detector = detector_config(config) if kind == "low" else None  # the cheaper stream fingerprints
        self.answers([WARMUP])  # allocations, lazy init

    def answers(self, items: Sequence[bytes | np.ndarray]) -> list[StreamAnswer]:
        started = time.perf_counter()
        images, errors = decode_many(items, self.limits, self.streams)
        rows = [k for k, image in enumerate(images) if image is not None]
        idx, prob = scatter_topk(len(items), rows, *self.scorer.topk([images[k] for k in rows]))
        ms = (time.perf_counter() - started) * 1e3
        prints = fingerprints(images, self.detector)
        return [
            StreamAnswer(idx[k], prob[k], None if image is None else image.shape[:2], error, ms, prints[k])
            for k, (image, error) in enumerate(zip(images, errors))
        ]


class FusedModels:
    """Both streams and Algorithm 1: ``score([(encoded, image_id), ...])`` -> one :class:`Scored` each."""

    def __init__(self, config: TwoStreamConfig) -> None:
        self.config = config
        self.detector = detector_config(config)
        self.high = StreamScorer(config, "high")
        self.low = StreamScorer(config, "low")
        # torch's thread count is per OS thread: the low stream's thread gets this one's.
        self._low_thread = ThreadPoolExecutor(
            1, thread_name_prefix="low-stream", initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
        )
        self.score([(WARMUP, "warm-up")])

    def score(self, items: Sequence[tuple[bytes | np.ndarray, str]]) -> list[Scored]:
        t0 = time.perf_counter()
        images, errors = decode_many([data for data, _ in items], self.config.limits,
                                     (self.high.stream.spec, self.low.stream.spec))
        rows = [k for k, image in enumerate(images) if image is not None]
        good = [images[k] for k in rows]
        t1 = time.perf_counter()
        low_run = self._low_thread.submit(_timed, self.low.topk, good)
        prints_run = self._low_thread.submit(fingerprints, images, self.detector)  # beside the high stream
        high_ms, high = _timed(self.high.topk, good)
        low_ms, low = low_run.result()
        prints = prints_run.result()
        t2 = time.perf_counter()
        sizes = [None if image is None else image.shape[:2] for image in images]
        batch = score_rows(
            [i for _, i in items], errors, sizes, *scatter_topk(len(items), rows, *high),
            *scatter_topk(len(items), rows, *low), self.config.thresholds,
        )
        t3 = time.perf_counter()
        timings = {
            "decode": (t1 - t0) * 1e3,
            "high_model": high_ms,
            "low_model": low_ms,
            "compare": (t3 - t2) * 1e3,
        }
        return [Scored(batch, k, timings, prints[k]) for k in range(len(items))]


def _timed(topk: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]], images: list[np.ndarray]):
    """(milliseconds, ``topk(images)``)."""
    started = time.perf_counter()
    result = topk(images)
    return (time.perf_counter() - started) * 1e3, result
