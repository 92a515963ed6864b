"""The HTTP API's models (the OpenAPI schema is generated from them) and the classify answer,
built from one row of a :class:`~twostream.core.results.ScoredBatch` and the source's
Algorithm-2 outcome: :func:`build_classify_response`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, Field

from twostream.core.labels import CIFAR10_LABELS, Refusal
from twostream.core.mapping import load_mapping
from twostream.core.reputation import Outcome
from twostream.core.reputation import SourceState
from twostream.core.results import ScoredBatch


class TopEntry(BaseModel):
    index: int = Field(description="class index in the stream's label space")
    name: str = Field(description="class name (ImageNet synset name for the high stream)")
    cifar10: str = Field(description="CIFAR-10 label the class maps to, or 'other'")
    prob: float = Field(description="softmax probability")


class Standing(BaseModel):
    cc: int = Field(description="Algorithm 2 counter CC after this image")
    blacklisted: bool


class ClassifyResponse(BaseModel):
    """200: the image was scored and the source is not blocked."""

    image_id: str
    source: str
    timestamp: float = Field(description=(
        "when Redis applied the image to its source (Unix seconds, strictly increasing per source): "
        "the Algorithm-2 order key"))
    seq: int = Field(description="the image's place in its source's order (1 for the first image)")
    response: str = Field(description="Algorithm 2 response: a CIFAR-10 label or 'adversarial'")
    verdict: Literal["accepted", "adversarial"] = Field(description="Algorithm 1 verdict")
    label: str | None = Field(description="CIFAR-10 label when accepted")
    imagenet_index: int | None = Field(description="winning ImageNet class when accepted")
    imagenet_name: str | None = None
    agreement: float = Field(description="P_high * P_low of the winning pair; 0 when rejected")
    high_topk: list[TopEntry] = Field(description="high-resolution stream (ImageNet) top-5")
    low_topk: list[TopEntry] = Field(description="low-resolution stream (CIFAR-10) top-2")
    standing: Standing
    width: int
    height: int
    timings_ms: dict[str, float] = Field(description=(
        "ms: check (header); streams (the model call: fused batch, or both stream replicas "
        "concurrently); high_model/low_model (each stream on the batch this image ran in; split: "
        "decode included); decode (fused); compare; detector (the query detector's step); reputation "
        "(the Redis step); total"
    ))


class LabelResponse(BaseModel):
    """200 at ``serve.answer_detail: label``: the answer without the scores."""

    image_id: str
    source: str
    timestamp: float = Field(description="as in the full answer: the Algorithm-2 order key")
    seq: int
    response: str = Field(description="Algorithm 2 response: a CIFAR-10 label, 'adversarial' or 'query_attack'")
    standing: Standing


class VerdictResponse(BaseModel):
    """200 at ``serve.answer_detail: verdict``: accepted or rejected (adversarial or a query
    attack alike), no label."""

    image_id: str
    source: str
    timestamp: float
    seq: int
    verdict: Literal["accepted", "rejected"]
    standing: Standing


class QueryAttackResponse(BaseModel):
    """200 at ``serve.answer_detail: full`` or ``label`` when the stateful query detector matched
    the image to several recent near-identical queries (from any source): no label, no scores; it
    counts in Algorithm 2 as a rejection (at ``verdict``: a :class:`VerdictResponse`, rejected)."""

    image_id: str
    source: str
    timestamp: float
    seq: int
    response: Literal["query_attack"] = "query_attack"
    detail: str
    standing: Standing


class BlockedResponse(BaseModel):
    """403: the source is on the blacklist; the image was still scored and counted."""

    error: Literal["source_blacklisted"] = "source_blacklisted"
    detail: str
    image_id: str
    source: str
    timestamp: float
    seq: int
    response: Literal["blocked"] = "blocked"
    standing: Standing


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code")
    detail: str = Field(description="human-readable reason")


class SourceInfo(BaseModel):
    source: str
    cc: int
    blacklisted: bool
    images: int = Field(description="scored images (Algorithm-2 events)")
    rejected: int
    blocked: int
    first_seen: float | None
    last_seen: float | None
    intervals: list[list[float | None]] = Field(description="blacklist intervals [joined, left|null]")

    @classmethod
    def of(cls, source: str, state: SourceState) -> "SourceInfo":
        """The standing of ``source`` as the API shows it."""
        return cls(source=source, **asdict(state))


class SourceList(BaseModel):
    count: int = Field(description="sources matching the filter (before the limit)")
    blacklist_size: int
    sources: list[SourceInfo]


class ResetResponse(BaseModel):
    source: str
    existed: bool
    previous: SourceInfo | None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    sources: int
    blacklist_size: int
    redis: str = Field(description="the Redis holding the reputation state (password hidden)")
    topology: Literal["fused", "split"]


# OpenAPI extras of the routes: the error answers and the classify body (raw image or form).
ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "bad request: malformed multipart or over its limits (parts, field, header size), bad source id"),
        (408, "the body did not arrive within serve.body_timeout_s"),
        (413, "body over serve.max_body_bytes"),
        (415, "unsupported media type or image format"),
        (422, "undecodable image or decompression bomb (detail says why)"),
        (503, "the reputation state (Redis) or a stream deployment is unavailable; nothing was recorded"),
    )
}
CLASSIFY_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as the raw body, or as field 'image' (optional field 'source') of a form.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "source": {"type": "string"},
                    },
                }
            },
        },
    }
}


def top_entries(indices: Sequence[int], probs: Sequence[float], labels: Sequence[str],
                names: Sequence[str]) -> list[TopEntry]:
    """A stream's top-k as API entries (class names from ``names``)."""
    return [
        TopEntry(index=i, name=names[i], cifar10=label, prob=p) for i, p, label in zip(indices, probs, labels)
    ]


AnswerDetail = Literal["full", "label", "verdict"]
# What 200 may carry: which one is serve.answer_detail's (docs/serve.md).
ClassifyAnswer = ClassifyResponse | LabelResponse | VerdictResponse | QueryAttackResponse
QUERY_ATTACK_DETAIL = ("the image is one of a run of near-identical recent queries (a query attack); "
                       "it is not classified and counts as a rejected image of its source")


def build_classify_response(
    batch: ScoredBatch,
    row: int,
    *,
    source: str,
    timestamp: float,
    outcome: Outcome,
    timings_ms: dict[str, float],
    seq: int,
    detail: AnswerDetail = "full",
) -> ClassifyAnswer | BlockedResponse:
    """The 200 body of scored image ``row`` at answer detail ``detail``, or the 403 body when
    Algorithm 2 answered ``blocked``. A query attack (``outcome.response``) is answered without a
    label or scores at every level."""
    result = batch.row(row)
    standing = Standing(cc=outcome.cc, blacklisted=outcome.blacklisted)
    if outcome.response == Refusal.BLOCKED:
        return BlockedResponse(
            detail=(
                f"source {source!r} is blacklisted (CC={outcome.cc}); its images are still scored "
                f"and it leaves the blacklist when CC returns to 0"
            ),
            image_id=result.image_id,
            source=source,
            timestamp=timestamp,
            seq=seq,
            standing=standing,
        )
    stamp = dict(image_id=result.image_id, source=source, timestamp=timestamp, seq=seq, standing=standing)
    if detail == "verdict":
        accepted = outcome.response not in (Refusal.ADVERSARIAL, Refusal.QUERY_ATTACK)
        return VerdictResponse(verdict="accepted" if accepted else "rejected", **stamp)
    if outcome.response == Refusal.QUERY_ATTACK:
        return QueryAttackResponse(detail=QUERY_ATTACK_DETAIL, **stamp)
    if detail == "label":
        return LabelResponse(response=outcome.response, **stamp)
    imagenet_names = load_mapping().names
    index = result.imagenet_index
    return ClassifyResponse(
        image_id=result.image_id,
        source=source,
        timestamp=timestamp,
        seq=seq,
        response=outcome.response,
        verdict=result.verdict,
        label=result.label,
        imagenet_index=index,
        imagenet_name=imagenet_names[index] if index is not None else None,
        agreement=result.agreement,
        high_topk=top_entries(result.high_idx, result.high_prob, result.high_labels, imagenet_names),
        low_topk=top_entries(result.low_idx, result.low_prob, result.low_labels, CIFAR10_LABELS),
        standing=standing,
        width=result.width,
        height=result.height,
        timings_ms={k: round(v, 3) for k, v in timings_ms.items()},
    )
