"""The online endpoint on Ray Serve: ``build_app(config) -> Application`` and :func:`app_builder`.

Only the Ray Serve deployments live here; what they run is in :mod:`twostream.online` and the
scoring core (docs/serve.md):

* ``HighStream`` / ``LowStream`` - one per stream, ``high|low.pool_size`` replicas with
  ``num_cpus``/``num_gpus`` of their own; ``topk`` is a ``@serve.batch`` method (dynamic
  batching up to ``serve.max_batch_size`` images or ``serve.batch_wait_timeout_s``) that takes
  the encoded images, decodes them (:func:`twostream.core.scoring.decode_many`) and runs a
  :class:`twostream.core.scoring.StreamScorer`.
* ``Reputation`` - exactly one replica owning the per-source state
  (:class:`twostream.online.reputation_store.ReputationStore` around ``ReputationLedger.observe``),
  with periodic snapshots and a final one on shutdown, restored at start.
* ``Ingress`` - FastAPI: checks the request (:mod:`twostream.online.http`) and the image header
  (:func:`twostream.core.preprocess.check_image_header`), sends the encoded image to both streams
  concurrently, joins their answers into a one-row ``ScoredBatch``
  (:func:`twostream.online.answers.join_answers`, Algorithm 1), then the reputation deployment
  (Algorithm 2), and answers (:func:`twostream.online.api.build_classify_response`).

``serve run cluster/serve.yaml`` uses :func:`app_builder`; ``twostream serve`` uses
:func:`build_app`.
"""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from twostream import __version__
from twostream.core.config import TwoStreamConfig, build_config, merge_sections, read_config_file
from twostream.core.labels import Response as Answer
from twostream.core.labels import Verdict
from twostream.core.preprocess import ImageDecodeError, check_image_header
from twostream.core.reputation import Response as Outcome
from twostream.core.results import ScoredBatch
from twostream.online.answers import StreamAnswer, join_answers
from twostream.online.api import (
    CLASSIFY_REQUEST_BODY,
    ERROR_RESPONSES,
    BlockedResponse,
    ClassifyResponse,
    ErrorResponse,
    Health,
    ResetResponse,
    SourceInfo,
    SourceList,
    build_classify_response,
)
from twostream.online.http import ApiError, check_bearer, decode_error_status, new_image_id, read_upload
from twostream.online.metrics import METRICS_CONTENT_TYPE, ServiceMetrics
from twostream.online.reputation_store import ReputationStore, Ticket

log = logging.getLogger("twostream.serve")

# --------------------------------------------------------------------------------------------
# Stream deployments


@serve.deployment(name="Stream")
class StreamModel:
    """One classifier stream with dynamic batching. It receives the encoded image (a few
    dozen kB, where the pixels would be megabytes) and decodes it itself."""

    def __init__(self, config: dict[str, Any], kind: str) -> None:
        from twostream.core.scoring import StreamScorer, use_threads

        cfg = TwoStreamConfig.model_validate(config)
        use_threads(getattr(cfg, kind))
        self.scorer = StreamScorer(cfg, kind)
        self.limits = cfg.limits
        self.topk.set_max_batch_size(cfg.serve.max_batch_size)
        self.topk.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self._run([np.zeros((32, 32, 3), np.uint8)])  # warm-up (allocations, lazy init)

    def _run(self, items: list[bytes | np.ndarray]) -> list[StreamAnswer]:
        from twostream.core.scoring import decode_many, scatter_topk

        started = time.perf_counter()
        images, errors = decode_many(items, self.limits)
        rows = [k for k, image in enumerate(images) if image is not None]
        idx, prob = scatter_topk(len(items), rows, *self.scorer.topk([images[k] for k in rows]))
        ms = (time.perf_counter() - started) * 1e3
        return [
            StreamAnswer(idx[k], prob[k], None if image is None else image.shape[:2], error, ms)
            for k, (image, error) in enumerate(zip(images, errors))
        ]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def topk(self, items: list[bytes]) -> list[StreamAnswer]:
        # The forward pass runs in a thread so the replica keeps accepting (and batching) requests.
        return await asyncio.to_thread(self._run, items)


# --------------------------------------------------------------------------------------------
# Reputation deployment (exactly one replica: per-source order is the order it sees)


@serve.deployment(name="Reputation", num_replicas=1, max_ongoing_requests=100_000)
class Reputation:
    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = TwoStreamConfig.model_validate(config)
        self.store = ReputationStore(
            cfg.reputation,
            snapshot_uri=cfg.serve.snapshot_uri,
            period_s=cfg.serve.snapshot_period_s,
            order_timeout_s=cfg.serve.order_timeout_s,
        )
        if self.store.restored_from:
            log.info("reputation restored from %s (%d sources)", self.store.restored_from, len(self.store.ledger))
        self.store.start()

    async def reserve(self, source: str):
        return self.store.reserve(source)

    async def commit(self, ticket, image_id: str, rejected: bool, verdict: str):
        return await self.store.commit(ticket, image_id, rejected, verdict)

    async def cancel(self, ticket) -> None:
        await self.store.cancel(ticket)

    async def get(self, source: str):
        state = self.store.get(source)
        return None if state is None else SourceInfo.of(source, state).model_dump()

    async def list(self, blacklisted: bool | None, limit: int) -> dict[str, Any]:
        total, rows = self.store.list(blacklisted, limit)
        return {
            "count": total,
            "blacklist_size": self.store.counts()[1],
            "sources": [SourceInfo.of(s, st).model_dump() for s, st in rows],
        }

    async def reset(self, source: str):
        previous = self.store.reset(source)
        return None if previous is None else SourceInfo.of(source, previous).model_dump()

    async def health(self) -> dict[str, Any]:
        sources, blacklist = self.store.counts()
        return {
            "sources": sources,
            "blacklist_size": blacklist,
            "snapshot_uri": self.store.snapshot_uri,
            "last_snapshot_at": self.store.last_snapshot_at,
        }

    async def snapshot(self) -> bool:
        return await self.store.snapshot_now()

    async def check_health(self) -> None:
        self.store.start()  # restarts the periodic snapshot task if it ever died

    async def __del__(self) -> None:
        await self.store.close()


# --------------------------------------------------------------------------------------------
# Ingress

api = FastAPI(
    title="twostream online endpoint",
    version=__version__,
    description=(
        "Two-stream adversarial image detection (Algorithm 1) with per-source reputation "
        "(Algorithm 2). See docs/serve.md."
    ),
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: dict[str, Any],
        high: DeploymentHandle,
        low: DeploymentHandle,
        reputation: DeploymentHandle,
    ) -> None:
        self.config = TwoStreamConfig.model_validate(config)
        self.high = high
        self.low = low
        self.reputation = reputation
        self.metrics = ServiceMetrics()
        self.admin_token = self.config.serve.resolved_admin_token()

    def _done(self, route: str, status: int, started: float) -> None:
        self.metrics.observe_request(route, status, time.perf_counter() - started)

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={403: {"model": BlockedResponse, "description": "the source is blacklisted"}, **ERROR_RESPONSES},
        openapi_extra=CLASSIFY_REQUEST_BODY,
        summary="Score one image and apply the source's reputation",
    )
    async def classify(self, request: Request):
        """Score one upload. The source id comes from the ``X-Source-Id`` header (name:
        ``serve.source_header``), else the form field ``source``, else the client address.
        A blacklisted source gets 403; its image is still scored and counted (SPEC 3)."""
        started = time.perf_counter()
        status = 500
        try:
            response = await self._classify(request, started)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            if exc.status in (413, 415, 422):
                self.metrics.verdicts.labels(verdict=Verdict.ERROR).inc()
            raise
        except Exception:
            log.exception("classify failed")
            raise
        finally:
            self._done("classify", status, started)

    async def _classify(self, request: Request, started: float) -> JSONResponse:
        client = request.client.host if request.client else None
        data, source = await read_upload(request.headers, request.stream(), client, self.config.serve)
        t0 = time.perf_counter()
        try:  # format and size before anything else; each stream replica decodes the pixels
            check_image_header(data, self.config.limits)
        except ImageDecodeError as exc:
            raise decode_error_status(str(exc)) from None  # not an Algorithm-2 event
        t1 = time.perf_counter()
        ticket, high, low = await self._streams(source, data)
        t2 = time.perf_counter()
        batch = join_answers(new_image_id(), high, low, self.config.thresholds)
        if not batch.scored[0]:  # corrupt past its header
            self.reputation.cancel.remote(ticket)
            raise decode_error_status(batch.error[0])
        t3 = time.perf_counter()
        outcome, ticket = await self._commit(ticket, batch)
        t4 = time.perf_counter()

        stages = {"check": t1 - t0, "streams": t2 - t1, "compare": t3 - t2, "reputation": t4 - t3}
        self.metrics.observe_scored(batch.verdict[0], outcome.response, stages)
        body = build_classify_response(
            batch,
            0,
            source=source,
            timestamp=ticket.timestamp,
            outcome=outcome,
            timings_ms={
                "check": stages["check"] * 1e3,
                "streams": stages["streams"] * 1e3,
                "high_model": high.model_ms,
                "low_model": low.model_ms,
                "compare": stages["compare"] * 1e3,
                "reputation": stages["reputation"] * 1e3,
                "total": (time.perf_counter() - started) * 1e3,
            },
        )
        status = 403 if isinstance(body, BlockedResponse) else 200
        return JSONResponse(body.model_dump(mode="json"), status_code=status)

    async def _streams(self, source: str, data: bytes) -> tuple[Ticket, StreamAnswer, StreamAnswer]:
        """The request's place in the source's order and both streams' answers, concurrently."""
        reserve_ref = self.reputation.reserve.remote(source)
        high_ref = self.high.topk.remote(data)
        low_ref = self.low.topk.remote(data)
        try:
            ticket = await reserve_ref
        except Exception as exc:
            high_ref.cancel()
            low_ref.cancel()
            raise ApiError(503, "reputation_unavailable", f"reputation deployment: {exc}") from None
        try:
            high, low = await asyncio.gather(high_ref, low_ref)
        except Exception as exc:
            self.reputation.cancel.remote(ticket)
            raise ApiError(503, "scoring_unavailable", f"stream deployment: {exc}") from None
        return ticket, high, low

    async def _commit(self, ticket: Ticket, batch: ScoredBatch) -> tuple[Outcome, Ticket]:
        """Algorithm 2 on the scored image: the reputation deployment's response and the ticket used."""
        rejected = bool(batch.rejected[0])
        shown = Answer.ADVERSARIAL if rejected else batch.label[0]
        try:
            return await self.reputation.commit.remote(ticket, batch.image_id[0], rejected, shown)
        except Exception as exc:
            raise ApiError(503, "reputation_unavailable", f"reputation deployment: {exc}") from None

    @api.get(
        "/v1/sources/{source}",
        response_model=SourceInfo,
        responses={404: {"model": ErrorResponse, "description": "never seen (or reset)"}},
        summary="Standing and history counts of one source",
    )
    async def get_source(self, source: str):
        started = time.perf_counter()
        info = await self.reputation.get.remote(source)
        if info is None:
            self._done("source", 404, started)
            raise ApiError(404, "unknown_source", f"source {source!r} has no scored images")
        self._done("source", 200, started)
        return info

    @api.get("/v1/sources", response_model=SourceList, summary="Sources, optionally only (non-)blacklisted ones")
    async def list_sources(
        self,
        blacklisted: bool | None = Query(None, description="true: only blacklisted; false: only not"),
        limit: int = Query(100, gt=0, description="at most this many rows (sorted by source id)"),
    ):
        started = time.perf_counter()
        limit = min(limit, self.config.serve.max_sources_listed)
        result = await self.reputation.list.remote(blacklisted, limit)
        self._done("sources", 200, started)
        return result

    @api.post(
        "/v1/sources/{source}/reset",
        response_model=ResetResponse,
        responses={
            401: {"model": ErrorResponse, "description": "no bearer token"},
            403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
        },
        summary="Admin: forget a source (CC 0, off the blacklist)",
    )
    async def reset_source(self, source: str, request: Request):
        started = time.perf_counter()
        try:
            check_bearer(request.headers.get("authorization"), self.admin_token)
        except ApiError as exc:
            self._done("reset", exc.status, started)
            raise
        previous = await self.reputation.reset.remote(source)
        self._done("reset", 200, started)
        return {"source": source, "existed": previous is not None, "previous": previous}

    @api.get("/healthz", response_model=Health, summary="Liveness of the ingress and the reputation store")
    async def healthz(self):
        try:
            info = await self.reputation.health.remote()
        except Exception as exc:
            raise ApiError(503, "reputation_unavailable", str(exc)) from None
        return {"status": "ok", **info}

    @api.get("/metrics", summary="Prometheus metrics of this ingress replica", response_class=Response)
    async def metrics(self):
        try:
            info = await self.reputation.health.remote()
            blacklist, sources = info["blacklist_size"], info["sources"]
        except Exception:
            blacklist = sources = None
        return Response(self.metrics.render(blacklist, sources), media_type=METRICS_CONTENT_TYPE)


# --------------------------------------------------------------------------------------------
# Application


def build_app(config: TwoStreamConfig) -> Application:
    """The bound application for ``serve.run``."""
    data = config.model_dump(mode="json")
    settings = config.serve

    def stream(kind: str):
        cfg = config.high if kind == "high" else config.low
        return StreamModel.options(
            name="HighStream" if kind == "high" else "LowStream",
            num_replicas=cfg.pool_size,
            max_ongoing_requests=settings.max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        ).bind(data, kind)

    reputation = Reputation.options(
        num_replicas=1, ray_actor_options={"num_cpus": settings.reputation_num_cpus}
    ).bind(data)
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=max(settings.max_ongoing_requests, 100),
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(data, stream("high"), stream("low"), reputation)


def app_builder(args: dict[str, Any]) -> Application:
    """Builder for ``serve run``/``serve deploy``: args ``config_file``, ``config``, ``overrides``."""
    data = read_config_file(args["config_file"]) if args.get("config_file") else {}
    data = merge_sections(data, args.get("config") or {})
    return build_app(build_config(TwoStreamConfig, data, list(args.get("overrides") or [])))
