"""What a stream replica answers for one image (:class:`StreamAnswer`: its top-k and, from the
low stream when the query detector is on, the image's fingerprint) and how the ingress joins
the two streams' answers into a one-row :class:`~twostream.core.results.ScoredBatch`
(:func:`join_answers`, Algorithm 1 through :func:`~twostream.core.results.score_rows`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from twostream.core.config import ThresholdsConfig
from twostream.core.query_detector import Fingerprint
from twostream.core.results import ScoredBatch, score_rows


class StreamAnswer(NamedTuple):
    """A stream replica's answer for one image: its top-k (zeros when it could not be decoded),
    its decoded size or why decoding failed, and the replica's time for the batch."""

    indices: np.ndarray  # (k,)
    probs: np.ndarray  # (k,)
    shape: tuple[int, int] | None  # decoded (height, width)
    error: str | None
    model_ms: float  # decode + resize + forward of the batch the image ran in
    fingerprint: Fingerprint | None = None  # the query detector's, where this stream makes it (low)


def join_answers(
    image_id: str, high: StreamAnswer, low: StreamAnswer, thresholds: ThresholdsConfig
) -> ScoredBatch:
    """The verdict on one image from both streams' answers (an error row when either failed)."""
    return score_rows(
        [image_id],
        [high.error or low.error],
        [high.shape],
        high.indices[None],
        high.probs[None],
        low.indices[None],
        low.probs[None],
        thresholds,
    )
