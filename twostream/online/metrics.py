"""Prometheus metrics of one ingress replica (a registry of its own): :class:`ServiceMetrics`
and the content type of ``GET /metrics``."""

from __future__ import annotations

from twostream.core.labels import Refusal

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
            "twostream_responses", "Algorithm 2 responses (label, adversarial, query_attack, blocked)", ["response"],
            registry=self.registry,
        )
        self.detections = Counter(
            "twostream_query_detections", "images the stateful query detector flagged (answered query_attack "
            "unless the source is blocked)", registry=self.registry,
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

    def observe_scored(self, verdict: str, response: str, stages: dict[str, float]) -> None:
        """One scored image: its verdict, its response's kind (a label, ``adversarial``,
        ``query_attack`` or ``blocked``) and the seconds of each classify stage."""
        self.verdicts.labels(verdict=verdict).inc()
        kind = response if response in (Refusal.ADVERSARIAL, Refusal.QUERY_ATTACK, Refusal.BLOCKED) else "label"
        self.responses.labels(response=kind).inc()
        for stage, seconds in stages.items():
            self.stage.labels(stage=stage).observe(seconds)

    def render(self, blacklist_size: int | None = None, sources: int | None = None) -> bytes:
        from prometheus_client import generate_latest

        if blacklist_size is not None:
            self.blacklist_size.set(blacklist_size)
        if sources is not None:
            self.sources.set(sources)
        return generate_latest(self.registry)


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
