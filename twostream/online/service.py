"""The online service without Ray: config, API models, request checks, metrics, reputation store.

:mod:`jobs.serve` composes these into a Ray Serve application (a FastAPI ingress, one
deployment per stream, one reputation deployment); everything here is plain Python so that it
is unit-tested without a cluster (``tests/test_service.py``). API and persistence: docs/serve.md.

Scoring is not here: the ingress calls :func:`twostream.core.scoring.decode_many` and
:func:`twostream.core.scoring.verdict_columns`, the stream deployments call
:func:`twostream.core.scoring.prepare` and :func:`twostream.core.scoring.stream_topk`, the reputation
deployment calls :meth:`twostream.core.reputation.ReputationLedger.observe` through
:class:`ReputationStore`.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hmac
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from twostream import storage
from twostream.core.config import ReputationConfig, TwoStreamConfig, build_config, read_config_file
from twostream.core.reputation import BLOCKED, ReputationLedger, SourceState, Upload

log = logging.getLogger("twostream.online")

ADMIN_TOKEN_ENV = "TWOSTREAM_ADMIN_TOKEN"

# --------------------------------------------------------------------------------------------
# Configuration


class ServeSettings(BaseModel):
    """The ``serve:`` section. Stream replicas and their CPU/GPU shares come from
    ``high.pool_size``/``high.num_gpus``/``high.num_cpus`` (and ``low.*``), as in the batch job."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy")
    app_name: str = Field("twostream", description="Serve application name")
    route_prefix: str = Field("/", description="route prefix of the application")
    ingress_replicas: int = Field(1, gt=0, description="replicas of the FastAPI ingress")
    ingress_num_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved per ingress replica")
    reputation_num_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved by the reputation replica")
    max_batch_size: int = Field(8, gt=0, le=1024, description="@serve.batch size per stream replica")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description=(
            "longest wait for a batch to fill after its first image; 0: a batch is whatever "
            "queued while the previous one ran (no wait at low load)"
        ),
    )
    max_ongoing_requests: int = Field(64, gt=0, description="in-flight requests per stream replica")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest request body (else 413)")
    source_header: str = Field("X-Source-Id", min_length=1, description="header carrying the source id")
    trust_source_header: bool = Field(
        True, description="honour the source header/field; false: always the client address"
    )
    admin_token: str | None = Field(
        None, description=f"bearer token of the admin routes (else ${ADMIN_TOKEN_ENV}; none: disabled)"
    )
    snapshot_uri: str | None = Field(None, description="reputation snapshot: local path or s3:// URI")
    snapshot_period_s: float = Field(30.0, gt=0.0, description="seconds between snapshots (when changed)")
    order_timeout_s: float = Field(
        30.0, gt=0.0, description="longest wait for an earlier request of the same source"
    )
    max_sources_listed: int = Field(1000, gt=0, description="cap of GET /v1/sources")


class ServeConfig(TwoStreamConfig):
    """The scoring config plus the ``serve:`` section."""

    serve: ServeSettings = ServeSettings()

    def resolved_admin_token(self) -> str | None:
        return self.serve.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


def load_serve_config(path: str | None = None, overrides: list[str] = ()) -> ServeConfig:
    data = read_config_file(path) if path else {}
    return build_config(ServeConfig, data, list(overrides))


# --------------------------------------------------------------------------------------------
# API models (the OpenAPI schema is generated from these)


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
    timestamp: float = Field(description="server arrival time (Unix seconds), the Algorithm-2 order key")
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
        "ms: decode; streams (both stream calls, concurrent); high_model/low_model (resize + "
        "forward of the batch this image ran in, inside each stream replica); compare; reputation; total"
    ))


class BlockedResponse(BaseModel):
    """403: the source is on the blacklist; the image was still scored and counted."""

    error: Literal["source_blacklisted"] = "source_blacklisted"
    detail: str
    image_id: str
    source: str
    timestamp: float
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
    snapshot_uri: str | None
    last_snapshot_at: float | None


# --------------------------------------------------------------------------------------------
# Request checks


class ApiError(Exception):
    """An error answer: HTTP status, a code and a reason (rendered as :class:`ErrorResponse`)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


RAW_MEDIA_TYPES = frozenset(
    {
        "application/octet-stream",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
    }
)
MULTIPART = "multipart/form-data"
IMAGE_FIELDS = ("image", "file")
SOURCE_FIELD = "source"
_SOURCE_RE = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces, 1-256 chars


def media_kind(content_type: str | None) -> Literal["raw", "multipart"]:
    """``raw`` (the body is the image) or ``multipart``; anything else is a 415."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == MULTIPART:
        return "multipart"
    if mime in RAW_MEDIA_TYPES:
        return "raw"
    shown = mime or "none"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {shown!r} is not accepted: send the image as the raw body "
        f"(image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff or "
        f"application/octet-stream) or as field 'image' of multipart/form-data",
    )


def check_content_length(value: str | None, limit: int) -> None:
    """413 as soon as a declared length is over the limit (before reading the body)."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid Content-Length {value!r}") from None
    if length > limit:
        raise too_large(length, limit)


def too_large(length: int | None, limit: int) -> ApiError:
    got = f"{length} bytes" if length is not None else "more"
    return ApiError(413, "payload_too_large", f"request body is {got}; the limit is {limit} bytes")


async def read_limited(chunks, limit: int) -> bytes:
    """Join an async iterator of byte chunks, failing with 413 once past ``limit``."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(None, limit)
        parts.append(chunk)
    return b"".join(parts)


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """The image part (field ``image`` or ``file``) and the text fields of a form upload."""
    if "boundary=" not in content_type:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "bad_request", "malformed multipart/form-data body")
    image: bytes | None = None
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if name in IMAGE_FIELDS and image is None:
            image = payload
        elif part.get_filename() is None:
            fields[name] = payload.decode("utf-8", errors="replace")
    if image is None:
        raise ApiError(
            400, "missing_image", "multipart/form-data upload without an 'image' (or 'file') field"
        )
    return image, fields


def resolve_source(
    header_value: str | None,
    field_value: str | None,
    client_host: str | None,
    trust_client_value: bool = True,
) -> str:
    """The source id: the header, else the form field, else the client address.

    An empty or malformed explicit value is a 400 (never silently replaced); no value and no
    client address is a 400 too.
    """
    for given, where in ((header_value, "header"), (field_value, "field")):
        if given is None or not trust_client_value:
            continue
        if not _SOURCE_RE.match(given):
            raise ApiError(
                400,
                "bad_source",
                f"source id from the {where} must be 1-256 printable ASCII characters without spaces",
            )
        return given
    if client_host:
        return client_host
    raise ApiError(400, "missing_source", "no source id given and the client address is unknown")


def check_bearer(authorization: str | None, token: str | None) -> None:
    """401 without credentials, 403 with wrong ones or when admin routes are disabled."""
    if not token:
        raise ApiError(403, "admin_disabled", f"admin routes are disabled: set serve.admin_token or ${ADMIN_TOKEN_ENV}")
    if not authorization:
        raise ApiError(
            401, "unauthorized", "admin route: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401, "unauthorized", "admin route: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(403, "forbidden", "invalid admin token")


def decode_error_status(reason: str) -> ApiError:
    """A decode failure: 415 for a recognised but unsupported format, otherwise 422."""
    if reason.startswith("unsupported image format"):
        return ApiError(415, "unsupported_image_format", reason)
    return ApiError(422, "undecodable_image", reason)


def new_image_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------
# Response building


def top_entries(indices, probs, cifar_labels, names) -> list[TopEntry]:
    return [
        TopEntry(index=int(i), name=str(names[int(i)]), cifar10=str(m), prob=float(p))
        for i, p, m in zip(indices, probs, cifar_labels)
    ]


def build_classify_response(
    *,
    image_id: str,
    source: str,
    timestamp: float,
    response: str,
    cc: int,
    blacklisted: bool,
    columns: dict[str, Any],
    row: int,
    high_idx,
    high_prob,
    low_idx,
    low_prob,
    imagenet_names,
    cifar_names,
    width: int,
    height: int,
    timings_ms: dict[str, float],
) -> ClassifyResponse | BlockedResponse:
    """The 200 body, or the 403 body when Algorithm 2 answered ``blocked``."""
    standing = Standing(cc=cc, blacklisted=blacklisted)
    if response == BLOCKED:
        return BlockedResponse(
            detail=(
                f"source {source!r} is blacklisted (CC={cc}); its images are still scored and "
                f"it leaves the blacklist when CC returns to 0"
            ),
            image_id=image_id,
            source=source,
            timestamp=timestamp,
            standing=standing,
        )
    index = int(columns["imagenet_index"][row])
    return ClassifyResponse(
        image_id=image_id,
        source=source,
        timestamp=timestamp,
        response=response,
        verdict=str(columns["verdict"][row]),
        label=columns["label"][row],
        imagenet_index=index if index >= 0 else None,
        imagenet_name=str(imagenet_names[index]) if index >= 0 else None,
        agreement=float(columns["agreement"][row]),
        high_topk=top_entries(high_idx, high_prob, columns["high_labels"][row], imagenet_names),
        low_topk=top_entries(low_idx, low_prob, columns["low_labels"][row], cifar_names),
        standing=standing,
        width=width,
        height=height,
        timings_ms={k: round(v, 3) for k, v in timings_ms.items()},
    )


# --------------------------------------------------------------------------------------------
# Metrics (Prometheus text from a registry of our own)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)


class ServiceMetrics:
    """Counters and histograms of one ingress replica, rendered by ``GET /metrics``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "twostream_requests", "HTTP requests by route and status", ["route", "status"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "twostream_verdicts", "Algorithm 1 verdicts (accepted, adversarial, error)", ["verdict"],
            registry=self.registry,
        )
        self.responses = Counter(
            "twostream_responses", "Algorithm 2 responses (label, adversarial, blocked)", ["response"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "twostream_request_latency_seconds", "request latency in the ingress", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage = Histogram(
            "twostream_stage_latency_seconds", "classify stage latency", ["stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.blacklist_size = Gauge(
            "twostream_blacklist_size", "sources on the blacklist now", registry=self.registry
        )
        self.sources = Gauge("twostream_sources", "sources known to the ledger", registry=self.registry)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self, blacklist_size: int | None = None, sources: int | None = None) -> bytes:
        from prometheus_client import generate_latest

        if blacklist_size is not None:
            self.blacklist_size.set(blacklist_size)
        if sources is not None:
            self.sources.set(sources)
        return generate_latest(self.registry)


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --------------------------------------------------------------------------------------------
# Reputation store: the ledger, per-source arrival order, snapshots


@dataclass(frozen=True)
class Ticket:
    """A place in one source's arrival order, handed out when a request arrives."""

    epoch: str  # the store instance; tickets of a previous instance are re-issued
    source: str
    seq: int
    timestamp: float


class _SourceQueue:
    __slots__ = ("next_seq", "turn", "cancelled", "cond")

    def __init__(self) -> None:
        self.next_seq = 0  # next ticket to hand out
        self.turn = 0  # next ticket to apply
        self.cancelled: set[int] = set()
        self.cond = asyncio.Condition()


class ReputationStore:
    """Algorithm 2 online: arrival order per source, no lost updates, periodic snapshots.

    Meant to live in exactly one asyncio event loop (one Serve replica): ``reserve`` hands a
    request its place (and its timestamp, the arrival time, strictly increasing) when it
    arrives; ``commit`` applies its verdict with :meth:`ReputationLedger.observe` only when
    every earlier ticket of the same source was applied or cancelled, so the state and each
    response equal :func:`twostream.core.reputation.replay` over ``(timestamp, image_id)`` whatever
    order the scoring finishes in. Mutations happen between awaits of one loop, so there are no
    lost increments. ``cancel`` gives a place back (a decode error is not an Algorithm-2 event);
    a ticket not committed within ``order_timeout_s`` is skipped so a lost request cannot stall
    its source.

    Snapshots: ``snapshot_now`` writes :meth:`ReputationLedger.snapshot` to ``snapshot_uri``;
    ``run_periodic`` does it every ``period_s`` when the state changed; the owner calls
    ``close`` on shutdown. A crash loses at most the changes since the last snapshot.
    """

    def __init__(
        self,
        config: ReputationConfig | None = None,
        *,
        snapshot_uri: str | None = None,
        period_s: float = 30.0,
        order_timeout_s: float = 30.0,
        clock=time.time,
    ) -> None:
        self.config = config or ReputationConfig()
        self.snapshot_uri = snapshot_uri
        self.period_s = period_s
        self.order_timeout_s = order_timeout_s
        self.clock = clock
        self.epoch = uuid.uuid4().hex
        self.ledger = ReputationLedger(self.config)
        self.restored_from: str | None = None
        if snapshot_uri and storage.exists(snapshot_uri):
            restored = ReputationLedger.restore(storage.read_bytes(snapshot_uri))
            if restored.config != self.config:
                log.warning(
                    "snapshot %s was taken with reputation config %s; continuing with %s",
                    snapshot_uri, restored.config.model_dump(), self.config.model_dump(),
                )
                restored.config = self.config
            self.ledger = restored
            self.restored_from = snapshot_uri
        self._queues: dict[str, _SourceQueue] = {}
        self._last_ts = max((st.last_seen or 0.0 for _, st in self.ledger.items()), default=0.0)
        self._version = 0  # bumped by every change
        self._saved_version = 0
        self.last_snapshot_at: float | None = None
        self._snapshot_lock = asyncio.Lock()
        self._periodic: asyncio.Task | None = None

    # -- ordering ------------------------------------------------------------------------

    def _queue(self, source: str) -> _SourceQueue:
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = _SourceQueue()
        return queue

    def reserve(self, source: str) -> Ticket:
        """The arrival of a request from ``source``: its place and timestamp."""
        now = round(self.clock(), 6)
        timestamp = now if now > self._last_ts else round(self._last_ts + 1e-6, 6)
        self._last_ts = timestamp
        queue = self._queue(source)
        seq = queue.next_seq
        queue.next_seq += 1
        return Ticket(self.epoch, source, seq, timestamp)

    def _advance(self, queue: _SourceQueue) -> None:
        while queue.turn in queue.cancelled:
            queue.cancelled.discard(queue.turn)
            queue.turn += 1

    async def cancel(self, ticket: Ticket) -> None:
        """Give the place back (the request produced no Algorithm-2 event)."""
        if ticket.epoch != self.epoch:
            return
        queue = self._queue(ticket.source)
        async with queue.cond:
            if ticket.seq >= queue.turn:
                queue.cancelled.add(ticket.seq)
                self._advance(queue)
                queue.cond.notify_all()

    async def commit(self, ticket: Ticket, image_id: str, rejected: bool, verdict: str):
        """Apply the verdict in the source's arrival order; returns (Response, Ticket used)."""
        if ticket.epoch != self.epoch:  # issued before a restart: take a new place now
            ticket = self.reserve(ticket.source)
        queue = self._queue(ticket.source)
        async with queue.cond:
            try:
                await asyncio.wait_for(
                    queue.cond.wait_for(lambda: queue.turn >= ticket.seq), self.order_timeout_s
                )
            except asyncio.TimeoutError:
                log.warning(
                    "source %r: tickets %d..%d were never committed; skipping them",
                    ticket.source, queue.turn, ticket.seq - 1,
                )
                queue.turn = max(queue.turn, ticket.seq)
            upload = Upload(ticket.source, ticket.timestamp, image_id, rejected, verdict)
            response = self.ledger.observe(upload)
            self._version += 1
            queue.turn = max(queue.turn, ticket.seq + 1)
            self._advance(queue)
            queue.cond.notify_all()
        return response, ticket

    # -- reads and admin -----------------------------------------------------------------

    def get(self, source: str) -> SourceState | None:
        return self.ledger._states.get(source) if source in self.ledger else None

    def list(self, blacklisted: bool | None = None, limit: int = 1000) -> tuple[int, list[tuple[str, SourceState]]]:
        rows = [
            (s, st) for s, st in sorted(self.ledger.items())
            if blacklisted is None or st.blacklisted == blacklisted
        ]
        return len(rows), rows[:limit]

    def reset(self, source: str) -> SourceState | None:
        previous = self.get(source)
        if previous is not None:
            self.ledger.reset(source)
            self._version += 1
        return previous

    def counts(self) -> tuple[int, int]:
        """(sources, blacklist size)."""
        return len(self.ledger), sum(1 for _, st in self.ledger.items() if st.blacklisted)

    # -- persistence ---------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._version != self._saved_version

    async def snapshot_now(self) -> bool:
        """Write a snapshot if there is a target; returns whether one was written."""
        if not self.snapshot_uri:
            return False
        async with self._snapshot_lock:
            version = self._version
            blob = self.ledger.snapshot()  # consistent: no await between reading and serialising
            await asyncio.to_thread(storage.write_bytes, self.snapshot_uri, blob)
            self._saved_version = version
            self.last_snapshot_at = self.clock()
        return True

    def snapshot_sync(self) -> bool:
        """The same without an event loop (shutdown paths)."""
        if not self.snapshot_uri:
            return False
        version = self._version
        storage.write_bytes(self.snapshot_uri, self.ledger.snapshot())
        self._saved_version = version
        self.last_snapshot_at = self.clock()
        return True

    async def run_periodic(self) -> None:
        """Snapshot every ``period_s`` when something changed (errors are logged, not fatal)."""
        while True:
            await asyncio.sleep(self.period_s)
            if self.dirty:
                try:
                    await self.snapshot_now()
                except Exception:  # keep serving; the next period tries again
                    log.exception("reputation snapshot to %s failed", self.snapshot_uri)

    def start(self) -> None:
        """Start the periodic snapshots in the running loop (idempotent)."""
        if self.snapshot_uri and (self._periodic is None or self._periodic.done()):
            self._periodic = asyncio.get_running_loop().create_task(self.run_periodic())

    async def close(self) -> None:
        """Stop the periodic task and write a final snapshot when the state changed."""
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        if self.dirty:
            await self.snapshot_now()
