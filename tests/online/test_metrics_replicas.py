"""The endpoint's metrics add up over replicas: two ingress replicas (fused topology) behind
Serve's proxy, requests over HTTP, and ``GET /metrics`` from whichever replica answers gives the
counts of both, equal to the requests sent (Ray's metrics, summed over the nodes' exports). And
``merge_exports`` on a hand-written export of two workers on two nodes."""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from twostream.online.metrics import merge_exports

pytestmark = [pytest.mark.ray, pytest.mark.own_process, pytest.mark.timeout(600)]

TWO_NODES = """\
# HELP ray_twostream_requests_total HTTP requests by route and status
# TYPE ray_twostream_requests_total counter
ray_twostream_requests_total{Component="core_worker",NodeAddress="10.0.0.1",WorkerId="a",route="classify",status="200"} 3.0
ray_twostream_requests_total{Component="core_worker",NodeAddress="10.0.0.1",WorkerId="b",route="classify",status="200"} 4.0
ray_twostream_requests_total{Component="core_worker",NodeAddress="10.0.0.1",WorkerId="b",route="classify",status="415"} 1.0
# HELP ray_twostream_request_latency_seconds request latency in the ingress
# TYPE ray_twostream_request_latency_seconds histogram
ray_twostream_request_latency_seconds_bucket{WorkerId="a",le="0.005",route="classify"} 1.0
ray_twostream_request_latency_seconds_bucket{WorkerId="a",le="+Inf",route="classify"} 3.0
ray_twostream_request_latency_seconds_count{WorkerId="a",route="classify"} 3.0
ray_twostream_request_latency_seconds_sum{WorkerId="a",route="classify"} 0.25
# HELP ray_tasks Ray's own
# TYPE ray_tasks gauge
ray_tasks{State="RUNNING"} 7.0
"""
OTHER_NODE = """\
# TYPE ray_twostream_requests_total counter
ray_twostream_requests_total{NodeAddress="10.0.0.2",WorkerId="c",route="classify",status="200"} 5.0
# TYPE ray_twostream_request_latency_seconds histogram
ray_twostream_request_latency_seconds_bucket{WorkerId="c",le="0.005",route="classify"} 0.0
ray_twostream_request_latency_seconds_bucket{WorkerId="c",le="+Inf",route="classify"} 2.0
ray_twostream_request_latency_seconds_count{WorkerId="c",route="classify"} 2.0
ray_twostream_request_latency_seconds_sum{WorkerId="c",route="classify"} 0.5
"""


def _samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_merge_exports_sums_workers_and_nodes() -> None:
    got = _samples(merge_exports([TWO_NODES, OTHER_NODE], state={"twostream_blacklist_size": 2,
                                                               "twostream_sources": None}))
    cls = ("route", "classify")
    assert got == {
        ("twostream_requests_total", (cls, ("status", "200"))): 12.0,  # 3 + 4 + 5
        ("twostream_requests_total", (cls, ("status", "415"))): 1.0,
        ("twostream_request_latency_seconds_bucket", (("le", "0.005"), cls)): 1.0,
        ("twostream_request_latency_seconds_bucket", (("le", "+Inf"), cls)): 5.0,
        ("twostream_request_latency_seconds_count", (cls,)): 5.0,
        ("twostream_request_latency_seconds_sum", (cls,)): 0.75,
        ("twostream_blacklist_size", ()): 2.0,  # the state's gauge; sources unknown: left out
    }


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Redis, a local Ray whose workers report metrics every 0.5 s, and the application with two
    ingress replicas."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    import ray
    from ray import serve

    from jobs.ray_cluster import connect, serve_cluster_env, serve_http_options
    from jobs.serve import build_app
    from twostream.core.config import load_config
    from twostream.online.redis_server import EmbeddedRedis
    from twostream.storage.local_s3 import free_port

    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    port = free_port()
    config = load_config(None, [
        "high.model=mobilenetv3_small_050", "high.weights=random", "high.num_cpus=0.25", "high.threads=1",
        "low.model=cifar_resnet20", "low.weights=random", "low.num_cpus=0.25", "low.threads=1",
        f"serve.port={port}", f"serve.redis_url={redis.url}", "serve.ingress_replicas=2",
        "serve.ingress_num_cpus=0.25", "serve.drain_s=1", "serve.http_proxy=ray",
    ])
    env = {**serve_cluster_env(config.serve), "RAY_metrics_report_interval_ms": "500",
           # a loaded machine starts a proxy's process in more than Serve's 5 s
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "180", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    saved = {k: os.environ.get(k) for k in env}
    connect(num_cpus=2, log_to_driver=False, cluster_env=env)
    try:
        serve.start(http_options=serve_http_options(config.serve))
        serve.run(build_app(config), name=config.serve.app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        redis.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _scrape(base: str) -> dict[tuple, float]:
    import requests

    answer = requests.get(base + "/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    return _samples(answer.text)


def test_two_ingress_replicas_metrics_add_up(two_replicas) -> None:
    import requests

    base = two_replicas
    deadline = time.monotonic() + 300
    while True:  # both replicas up
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the application did not come up"
        time.sleep(0.5)
    sent: dict[str, int] = {}
    for k in range(24):  # a new connection each: the proxy spreads them over the replicas
        bad = k % 4 == 3
        answer = requests.post(base + "/v1/classify", data=b"not an image at all" if bad else _png(k),
                               headers={"Content-Type": "image/png", "X-Source-Id": f"m-{k % 5}"}, timeout=120)
        sent[str(answer.status_code)] = sent.get(str(answer.status_code), 0) + 1
    assert sent.get("422") == 6 and sum(sent.values()) == 24, sent  # 18 scored (200 or 403), 6 refused

    def classified(samples: dict) -> dict[str, float]:
        return {dict(labels)["status"]: v for (name, labels), v in samples.items()
                if name == "twostream_requests_total" and dict(labels).get("route") == "classify"}

    deadline = time.monotonic() + 120
    while True:  # Ray's workers report every 0.5 s here: wait for the last requests to arrive
        samples = _scrape(base)
        if classified(samples) == {k: float(v) for k, v in sent.items()}:
            break
        assert time.monotonic() < deadline, f"scraped {classified(samples)}, sent {sent}"
        time.sleep(1)
    for _ in range(4):  # whichever replica answers the scrape: the same sums
        assert classified(_scrape(base)) == {k: float(v) for k, v in sent.items()}
    verdicts = {dict(labels)["verdict"]: v for (name, labels), v in samples.items()
                if name == "twostream_verdicts_total"}
    assert sum(verdicts.values()) == 24 and verdicts.get("error") == 6
    count = {dict(labels)["route"]: v for (name, labels), v in samples.items()
             if name == "twostream_request_latency_seconds_count"}
    assert count["classify"] == 24
    # both replicas served: Ray's own export holds one classify series per replica process
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    raw = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text
    workers = {dict(labels).get("WorkerId") for (name, labels), v in _samples(raw).items()
               if name == "ray_twostream_requests_total" and dict(labels).get("route") == "classify" and v > 0}
    assert len(workers) == 2, workers
