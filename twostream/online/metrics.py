"""The endpoint's Prometheus metrics: their definitions (:data:`METRICS`, one line each),
:class:`ServiceMetrics` (what the ingress records), and :func:`merge_exports` (the sum over
replicas and nodes that ``GET /metrics`` answers).

Where the numbers go is a *backend* given to :class:`ServiceMetrics`: on Ray Serve, Ray's own
metrics (``ray.util.metrics``, made in ``jobs/serve.py``), which every node's metrics agent
exports with one series per worker process; ``GET /metrics`` on any replica then reads every
node's export and sums the series (:func:`merge_exports`), so a scrape behind the load balancer
sees the whole deployment, not the replica it reached. Without Ray (the library, unit tests),
:class:`PrometheusBackend` keeps them in a registry of its own. The gauges of the reputation
state (sources, blacklist size) are read from Redis when scraped: they are the deployment's
already and are not summed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from twostream.core.labels import Refusal

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MetricDef:
    """One metric: a counter or a histogram (``buckets``: upper bounds, seconds), its labels."""

    kind: Literal["counter", "histogram"]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS


# The ingress's metrics, one line each (a new metric: a line here, then ``metrics.inc(name, ...)``).
METRICS = (
    MetricDef("counter", "twostream_requests", "HTTP requests by route and status", ("route", "status")),
    MetricDef("counter", "twostream_verdicts", "Algorithm 1 verdicts (accepted, adversarial, error)", ("verdict",)),
    MetricDef("counter", "twostream_responses", "Algorithm 2 responses (label, adversarial, query_attack, blocked)",
              ("response",)),
    MetricDef("counter", "twostream_query_detections", "images the stateful query detector flagged (answered "
              "query_attack unless the source is blocked)", ()),
    MetricDef("histogram", "twostream_request_latency_seconds", "request latency in the ingress", ("route",)),
    MetricDef("histogram", "twostream_stage_latency_seconds", "classify stage latency", ("stage",)),
)
# Read from the reputation state when scraped (the deployment's already): name -> help.
STATE_GAUGES = {"twostream_blacklist_size": "sources on the blacklist now",
                "twostream_sources": "sources known to the ledger"}


class Backend(Protocol):
    """Makes a metric's recorder: ``record(value, labels)`` adds ``value`` to a counter or
    observes it in a histogram."""

    def make(self, metric: MetricDef) -> "Recorder": ...


class Recorder(Protocol):
    def record(self, value: float, labels: dict[str, str]) -> None: ...


class ServiceMetrics:
    """What the ingress records, through ``backend`` (default: a Prometheus registry of its own)."""

    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend or PrometheusBackend()
        self.recorders = {m.name: self.backend.make(m) for m in METRICS}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter, or observe a value in a histogram."""
        self.recorders[name].record(value, labels)

    observe = inc

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.inc("twostream_requests", route=route, status=str(status))
        self.observe("twostream_request_latency_seconds", seconds, route=route)

    def observe_scored(self, verdict: str, response: str, stages: dict[str, float]) -> None:
        """One scored image: its verdict, its response's kind (a label, ``adversarial``,
        ``query_attack`` or ``blocked``) and the seconds of each classify stage."""
        self.inc("twostream_verdicts", verdict=str(verdict))
        kind = response if response in (Refusal.ADVERSARIAL, Refusal.QUERY_ATTACK, Refusal.BLOCKED) else "label"
        self.inc("twostream_responses", response=str(kind))
        for stage, seconds in stages.items():
            self.observe("twostream_stage_latency_seconds", seconds, stage=stage)

    def render(self, blacklist_size: int | None = None, sources: int | None = None) -> bytes:
        """This process's metrics (a backend with ``render()``, as :class:`PrometheusBackend`) as
        ``GET /metrics`` gives them, with the reputation state's gauges."""
        state = {"twostream_blacklist_size": blacklist_size, "twostream_sources": sources}
        return merge_exports([self.backend.render()], prefix="", state=state).encode()


class PrometheusBackend:
    """The metrics in a ``prometheus_client`` registry of this process (:meth:`render`)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()

    def make(self, metric: MetricDef) -> Recorder:
        from prometheus_client import Counter, Histogram

        if metric.kind == "counter":
            made = Counter(metric.name, metric.help, metric.labels, registry=self.registry)
            return _Recorder(made, "inc")
        made = Histogram(metric.name, metric.help, metric.labels, buckets=metric.buckets, registry=self.registry)
        return _Recorder(made, "observe")

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


@dataclass
class _Recorder:
    metric: object
    method: str

    def record(self, value: float, labels: dict[str, str]) -> None:
        target = self.metric.labels(**labels) if labels else self.metric
        getattr(target, self.method)(value)


def merge_exports(texts: Iterable[str], prefix: str = "ray_",
                  state: dict[str, float | None] | None = None) -> str:
    """Prometheus text of :data:`METRICS` summed over every series that differs only in the
    exporter's own labels (worker, node, session, ...): ``texts`` are the exports of every node
    (Ray's metrics agents), where each metric is named ``prefix`` + its name, one series per
    worker process. ``state``: the :data:`STATE_GAUGES` values to append (None: not known)."""
    from prometheus_client.parser import text_string_to_metric_families

    ours = {m.name: m for m in METRICS}
    sums: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for text in texts:
        for family in text_string_to_metric_families(text):
            name = family.name[len(prefix):] if family.name.startswith(prefix) else None
            if name not in ours:
                continue
            keep = set(ours[name].labels) | {"le"}
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in keep))
                sums[sample.name[len(prefix):]][labels] += sample.value
    lines = []
    for metric in METRICS:
        shown = metric.name + ("_total" if metric.kind == "counter" else "")  # as prometheus_client writes it
        lines += [f"# HELP {shown} {metric.help}", f"# TYPE {shown} {metric.kind}"]
        suffixes = ("_total",) if metric.kind == "counter" else ("_bucket", "_count", "_sum")
        for suffix in suffixes:
            for labels, value in sorted(sums.get(metric.name + suffix, {}).items(), key=_bucket_order):
                lines.append(f"{metric.name}{suffix}{_format_labels(labels)} {_format_value(value)}")
    for name, value in (state or {}).items():
        if value is not None:
            lines += [f"# HELP {name} {STATE_GAUGES[name]}", f"# TYPE {name} gauge", f"{name} {_format_value(value)}"]
    return "\n".join(lines) + "\n"


def _bucket_order(item: tuple[tuple, float]) -> tuple:
    """Series by their labels, a histogram's buckets by their bound (``+Inf`` last)."""
    labels = dict(item[0])
    return (tuple((k, v) for k, v in item[0] if k != "le"), float(labels.get("le", "0")))


def _format_labels(labels: Sequence[tuple[str, str]]) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
