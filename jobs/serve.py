"""The online endpoint on Ray Serve: ``build_app(config) -> Application`` and :func:`app_builder`.

Only the Ray Serve deployments live here; what they run is in :mod:`twostream.online` and the
scoring core (docs/serve.md). Two topologies (``serve.topology``), on the same scoring core:

* ``fused`` (default) - ``Ingress`` replicas hold both streams and the comparator
  (:class:`twostream.online.models.FusedModels`), batched with ``@serve.batch`` (up to
  ``serve.max_batch_size`` uploads, ``serve.batch_wait_timeout_s``): one hop from the HTTP proxy
  to the models.
* ``split`` - a thin ``Ingress`` and one ``Stream`` deployment per stream (``HighStream``,
  ``LowStream``: ``high|low.pool_size`` replicas with their own ``num_cpus``/``num_gpus``), each
  a ``@serve.batch`` :class:`twostream.online.models.StreamRunner`; the ingress joins the two
  answers (:func:`twostream.online.answers.join_answers`, Algorithm 1).

In both, the ingress checks the request (:mod:`twostream.online.http`) and the image header
(:func:`twostream.core.preprocess.check_image_header`), judges the image's fingerprint with the
stateful query detector (:func:`twostream.online.detector_store.endpoint_detector`, its state in
the same Redis), and applies Algorithm 2 itself in Redis
(:class:`twostream.online.redis_store.RedisReputation`, one atomic script per image, shared by
all replicas), then answers at ``serve.answer_detail`` (:func:`twostream.online.api.build_classify_response`).

``serve run cluster/serve.yaml`` uses :func:`app_builder` (``serve.redis_url`` required);
``twostream serve`` uses :func:`build_app`, with an embedded redis-server when no URL is set.
"""

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib.request

import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from jobs.ray_cluster import HAPROXY_ENV
from twostream import __version__
from twostream.core.config import TwoStreamConfig, build_config, merge_sections, read_config_file
from twostream.core.labels import Refusal
from twostream.core.labels import Verdict
from twostream.core.preprocess import ImageDecodeError, check_image_header
from twostream.online.answers import StreamAnswer, join_answers
from twostream.online.api import (
    CLASSIFY_REQUEST_BODY,
    ERROR_RESPONSES,
    BlockedResponse,
    ClassifyAnswer,
    ErrorResponse,
    Health,
    ResetResponse,
    SourceInfo,
    SourceList,
    build_classify_response,
)
from twostream.online.http import (
    ApiError,
    check_bearer,
    check_source_id,
    decode_error_status,
    new_image_id,
    read_upload,
)
from twostream.online.detector_store import endpoint_detector
from twostream.online.metrics import METRICS_CONTENT_TYPE, MetricDef, ServiceMetrics, merge_exports
from twostream.online.models import FusedModels, Scored, StreamRunner
from twostream.online.redis_store import RedisReputation, StoreUnavailable, Step, redact

log = logging.getLogger("twostream.serve")
EXPORT_TIMEOUT_S = 5.0  # reading one node's metrics export (GET /metrics)


class RayMetrics:
    """The ingress's metrics as Ray's (``ray.util.metrics``): every node's metrics agent exports
    them, one series per replica process; :func:`cluster_metrics` sums them."""

    def make(self, metric: MetricDef):
        from ray.util.metrics import Counter, Histogram

        if metric.kind == "counter":
            return _RayRecorder(Counter(metric.name, metric.help, tag_keys=metric.labels), "inc")
        made = Histogram(metric.name, metric.help, boundaries=list(metric.buckets), tag_keys=metric.labels)
        return _RayRecorder(made, "observe")


class _RayRecorder:
    def __init__(self, metric: Any, method: str) -> None:
        self.record_fn = getattr(metric, method)

    def record(self, value: float, labels: dict[str, str]) -> None:
        self.record_fn(value, tags=labels or None)


def cluster_metrics(state: dict[str, float | None]) -> str:
    """:data:`twostream.online.metrics.METRICS` summed over every replica of every live node
    (each node's metrics export, read over HTTP), with the reputation state's gauges. A node whose
    export cannot be read fails the scrape (a partial sum would look like counters going back)."""
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    texts = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=EXPORT_TIMEOUT_S) as answer:
            texts.append(answer.read().decode())
    return merge_exports(texts, prefix="ray_", state=state)

# --------------------------------------------------------------------------------------------
# Stream deployments (split topology)


@serve.deployment(name="Stream")
class StreamModel:
    """One classifier stream with dynamic batching. It receives the encoded image (a few
    dozen kB, where the pixels would be megabytes) and decodes it itself."""

    def __init__(self, config: dict[str, Any], kind: str) -> None:
        from twostream.core.scoring import use_threads

        cfg = TwoStreamConfig.model_validate(config)
        use_threads(getattr(cfg, kind))
        self.runner = StreamRunner(cfg, kind)
        self.topk.set_max_batch_size(cfg.serve.max_batch_size)
        self.topk.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def topk(self, items: list[bytes]) -> list[StreamAnswer]:
        # The forward pass runs in a thread so the replica keeps accepting (and batching) requests.
        return await asyncio.to_thread(self.runner.answers, items)


# --------------------------------------------------------------------------------------------
# Ingress

api = FastAPI(
    title="twostream online endpoint",
    version=__version__,
    description=(
        "Two-stream adversarial image detection (Algorithm 1) with per-source reputation "
        "(Algorithm 2, state in Redis). See docs/serve.md."
    ),
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def unavailable(exc: StoreUnavailable) -> ApiError:
    """The 503 of an unreachable reputation store (the image is not answered without its step)."""
    return ApiError(503, "reputation_unavailable", f"reputation state unavailable, nothing was recorded: {exc}")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self, config: dict[str, Any], high: DeploymentHandle | None = None, low: DeploymentHandle | None = None
    ) -> None:
        self.config = TwoStreamConfig.model_validate(config)
        settings = self.config.serve
        self.high, self.low = high, low
        self.models: FusedModels | None = None
        if settings.topology == "fused":
            from twostream.core.scoring import use_threads

            use_threads(self.config.high)
            self.models = FusedModels(self.config)
            self._fused.set_max_batch_size(settings.max_batch_size)
            self._fused.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.metrics = ServiceMetrics(RayMetrics())
        self.admin_token = settings.resolved_admin_token()
        # Behind HAProxy every peer is HAProxy: the client's address is not known here.
        self.client_address_known = os.environ.get(HAPROXY_ENV) != "1"
        if not (self.client_address_known or settings.trust_source_header):
            raise ValueError("serve.trust_source_header=false takes the client address as the source, which the "
                             f"replicas do not see behind HAProxy: start the cluster without {HAPROXY_ENV}=1")
        self._store: RedisReputation | None = None
        self.detector = endpoint_detector(self.config)
        self._detector_thread = ThreadPoolExecutor(1, thread_name_prefix="query-detector")

    @property
    def store(self) -> RedisReputation:
        """The Redis client, made on first use (on the replica's event loop)."""
        if self._store is None:
            s = self.config.serve
            self._store = RedisReputation(
                s.redis_url, self.config.reputation, prefix=s.redis_prefix, timeout_s=s.redis_timeout_s,
                retry_s=s.redis_retry_s,
            )
        return self._store

    def _done(self, route: str, status: int, started: float) -> None:
        self.metrics.observe_request(route, status, time.perf_counter() - started)

    # -- models -----------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _fused(self, items: list[tuple[bytes, str]]) -> list[Scored]:
        # In a thread: the event loop keeps taking requests (and batching them) meanwhile.
        return await asyncio.to_thread(self.models.score, items)

    async def _score(self, data: bytes, image_id: str) -> Scored:
        """Both streams and Algorithm 1 on one upload, in either topology."""
        if self.models is not None:
            return await self._fused((data, image_id))
        try:
            high, low = await asyncio.gather(self.high.topk.remote(data), self.low.topk.remote(data))
        except Exception as exc:
            raise ApiError(503, "scoring_unavailable", f"stream deployment: {exc}") from None
        t0 = time.perf_counter()
        batch = join_answers(image_id, high, low, self.config.thresholds)
        compare = (time.perf_counter() - t0) * 1e3
        timings = {"high_model": high.model_ms, "low_model": low.model_ms, "compare": compare}
        return Scored(batch, 0, timings, low.fingerprint)

    async def _query_attack(self, scored: Scored, source: str, image_id: str) -> bool:
        """Whether the stateful query detector flags the image (False when it is off); it is
        remembered for later queries. 503 when the detector's Redis does not answer within
        ``serve.redis_retry_s``."""
        if self.detector is None or scored.fingerprint is None:
            return False
        from redis.exceptions import RedisError

        judge = functools.partial(self.detector.judge, scored.fingerprint, source=source, query_id=image_id,
                                  now=time.time())
        try:
            _, flagged = await asyncio.get_running_loop().run_in_executor(self._detector_thread, judge)
        except (RedisError, OSError) as exc:  # the same Redis as the reputation state: the same 503
            raise unavailable(StoreUnavailable(f"query detector: {exc}")) from None
        if flagged:
            self.metrics.inc("twostream_query_detections")
        return flagged

    # -- routes -----------------------------------------------------------------------------
    @api.post(
        "/v1/classify",
        response_model=ClassifyAnswer,
        responses={
            200: {"description": (
                "scored: ClassifyResponse (serve.answer_detail full), LabelResponse (label), VerdictResponse "
                "(verdict); a query attack (the detector matched recent near-identical queries): "
                "QueryAttackResponse at full and label, VerdictResponse 'rejected' at verdict")},
            403: {"model": BlockedResponse, "description": "the source is blacklisted"},
            **ERROR_RESPONSES,
        },
        openapi_extra=CLASSIFY_REQUEST_BODY,
        summary="Score one image and apply the source's reputation",
    )
    async def classify(self, request: Request):
        """Score one upload. The source id comes from the ``X-Source-Id`` header (name:
        ``serve.source_header``), else the form field ``source``, else the client address.
        A blacklisted source gets 403; its image is still scored and counted (SPEC 3). The query
        detector checks every decoded image; a detection answers ``query_attack`` and counts as
        a rejection."""
        started = time.perf_counter()
        status = 500
        try:
            response = await self._classify(request, started)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            if exc.status in (413, 415, 422):
                self.metrics.inc("twostream_verdicts", verdict=str(Verdict.ERROR))
            raise
        except ClientDisconnect:  # the client went away mid-body: nothing was held, nothing to answer
            status = 499
            return Response(status_code=499)
        except Exception:
            log.exception("classify failed")
            raise
        finally:
            self._done("classify", status, started)

    async def _classify(self, request: Request, started: float) -> JSONResponse:
        client = request.client.host if request.client and self.client_address_known else None
        data, source = await read_upload(request.headers, request.stream(), client, self.config.serve)
        t0 = time.perf_counter()
        try:  # format and size before anything else; the models decode the pixels
            check_image_header(data, self.config.limits)
        except ImageDecodeError as exc:
            raise decode_error_status(str(exc)) from None  # not an Algorithm-2 event
        t1 = time.perf_counter()
        scored = await self._score(data, new_image_id())
        batch, row = scored.batch, scored.row
        t2 = time.perf_counter()
        if not batch.scored[row]:  # corrupt past its header: not an Algorithm-2 event either
            raise decode_error_status(batch.error[row])
        attack = await self._query_attack(scored, source, batch.image_id[row])
        t3 = time.perf_counter()
        rejected = bool(batch.rejected[row]) or attack
        shown = Refusal.QUERY_ATTACK if attack else Refusal.ADVERSARIAL if rejected else batch.label[row]
        try:
            step: Step = await self.store.observe(source, batch.image_id[row], rejected, shown)
        except StoreUnavailable as exc:
            raise unavailable(exc) from None
        t4 = time.perf_counter()

        stages = {"check": t1 - t0, "streams": t2 - t1, "detector": t3 - t2, "reputation": t4 - t3}
        self.metrics.observe_scored(batch.verdict[row], step.outcome.response, stages)
        body = build_classify_response(
            batch,
            row,
            source=source,
            timestamp=step.timestamp,
            outcome=step.outcome,
            timings_ms={
                "check": stages["check"] * 1e3,
                "streams": stages["streams"] * 1e3,
                **scored.timings_ms,
                "detector": stages["detector"] * 1e3,
                "reputation": stages["reputation"] * 1e3,
                "total": (time.perf_counter() - started) * 1e3,
            },
            seq=step.seq,
            detail=self.config.serve.answer_detail,
        )
        status = 403 if isinstance(body, BlockedResponse) else 200
        return JSONResponse(body.model_dump(mode="json"), status_code=status)

    @contextlib.asynccontextmanager
    async def _observed(self, route: str) -> AsyncIterator[None]:
        """Time a lookup/admin route into the metrics: 200, its ApiError's status, or 503 when the
        reputation store is unavailable."""
        started = time.perf_counter()
        status = 500
        try:
            yield
            status = 200
        except StoreUnavailable as exc:
            status = 503
            raise unavailable(exc) from None
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self._done(route, status, started)

    async def _lookup(self, source: str) -> dict[str, Any]:
        async with self._observed("source"):
            check_source_id(source)
            state = await self.store.get(source)
            if state is None:
                raise ApiError(404, "unknown_source", f"source {source!r} has no scored images")
            return SourceInfo.of(source, state).model_dump()

    async def _reset(self, source: str, request: Request) -> dict[str, Any]:
        async with self._observed("reset"):
            check_bearer(request.headers.get("authorization"), self.admin_token)
            check_source_id(source)
            previous = await self.store.reset(source)
            return {"source": source, "existed": previous is not None,
                    "previous": None if previous is None else SourceInfo.of(source, previous).model_dump()}

    @api.get("/v1/source", response_model=SourceInfo, responses={404: {"model": ErrorResponse}},
             summary="Standing of one source given as the query parameter `id` (any id)")
    async def get_source_by_query(self, id: str = Query(..., description="the source id")):
        return await self._lookup(id)

    @api.post("/v1/source/reset", response_model=ResetResponse, summary="Admin: forget the source `id` (query)")
    async def reset_source_by_query(self, request: Request, id: str = Query(..., description="the source id")):
        return await self._reset(id, request)

    @api.post(
        "/v1/sources/{source:path}/reset",
        response_model=ResetResponse,
        responses={
            401: {"model": ErrorResponse, "description": "no bearer token"},
            403: {"model": ErrorResponse, "description": "wrong token, or admin routes disabled"},
        },
        summary="Admin: forget a source (CC 0, off the blacklist); the id URL-encoded, '/' allowed",
    )
    async def reset_source(self, source: str, request: Request):
        return await self._reset(source, request)

    @api.get(
        "/v1/sources/{source:path}",
        response_model=SourceInfo,
        responses={404: {"model": ErrorResponse, "description": "never seen (or reset)"}},
        summary="Standing and history counts of one source; the id URL-encoded, '/' allowed",
    )
    async def get_source(self, source: str):
        return await self._lookup(source)

    @api.get("/v1/sources", response_model=SourceList, summary="Sources, optionally only (non-)blacklisted ones")
    async def list_sources(
        self,
        blacklisted: bool | None = Query(None, description="true: only blacklisted; false: only not"),
        limit: int = Query(100, gt=0, description="at most this many rows (sorted by source id)"),
    ):
        started = time.perf_counter()
        limit = min(limit, self.config.serve.max_sources_listed)
        try:
            total, rows = await self.store.list(blacklisted, limit)
            _, listed = await self.store.counts()
        except StoreUnavailable as exc:
            self._done("sources", 503, started)
            raise unavailable(exc) from None
        self._done("sources", 200, started)
        return {"count": total, "blacklist_size": listed,
                "sources": [SourceInfo.of(s, st).model_dump() for s, st in rows]}

    @api.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}},
             summary="Liveness of the ingress and of the reputation state (Redis)")
    async def healthz(self):
        try:
            await self.store.ping()
            sources, listed = await self.store.counts()
        except StoreUnavailable as exc:
            raise unavailable(exc) from None
        return {"status": "ok", "sources": sources, "blacklist_size": listed,
                "redis": redact(self.config.serve.redis_url), "topology": self.config.serve.topology}

    @api.get("/metrics", summary="Prometheus metrics of the whole deployment (every replica, every node)",
             response_class=Response)
    async def metrics(self):
        try:
            sources, blacklist = await self.store.counts()
        except StoreUnavailable:
            blacklist = sources = None
        state = {"twostream_blacklist_size": blacklist, "twostream_sources": sources}
        try:
            text = await asyncio.to_thread(cluster_metrics, state)
        except OSError as exc:
            raise ApiError(503, "metrics_unavailable", f"a node's metrics export could not be read: {exc}") from None
        return Response(text.encode(), media_type=METRICS_CONTENT_TYPE)


# --------------------------------------------------------------------------------------------
# Application


def build_app(config: TwoStreamConfig) -> Application:
    """The bound application for ``serve.run`` (``config.serve.redis_url`` must be set)."""
    settings = config.serve
    if not settings.redis_url:
        raise ValueError(
            "serve.redis_url is not set: the reputation state lives in Redis (`twostream serve` starts "
            "an embedded redis-server; with serve run/deploy give serve.redis_url)"
        )
    data = config.model_dump(mode="json")
    ingress = dict(num_replicas=settings.ingress_replicas, max_ongoing_requests=max(settings.max_ongoing_requests, 100))
    if settings.topology == "fused":
        resources = {
            "num_cpus": settings.ingress_num_cpus + config.high.num_cpus + config.low.num_cpus,
            "num_gpus": config.high.num_gpus + config.low.num_gpus,
        }
        return Ingress.options(**ingress, ray_actor_options=resources).bind(data)

    def stream(kind: str):
        cfg = config.high if kind == "high" else config.low
        return StreamModel.options(
            name="HighStream" if kind == "high" else "LowStream",
            num_replicas=cfg.pool_size,
            max_ongoing_requests=settings.max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        ).bind(data, kind)

    return Ingress.options(**ingress, ray_actor_options={"num_cpus": settings.ingress_num_cpus}).bind(
        data, stream("high"), stream("low")
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Builder for ``serve run``/``serve deploy``: args ``config_file``, ``config``, ``overrides``."""
    data = read_config_file(args["config_file"]) if args.get("config_file") else {}
    data = merge_sections(data, args.get("config") or {})
    return build_app(build_config(TwoStreamConfig, data, list(args.get("overrides") or [])))
