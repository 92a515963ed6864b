"""The Serve application in-process on a loopback port, driven over real HTTP, with its
reputation state in a real redis-server started for this module (appendfsync always).

Small random-init models whose weights are saved to files first, so the application and the
library :class:`~twostream.core.scoring.Scorer` load the very same parameters. The default
(fused) topology at ``/``, the split one at ``/split`` on the same Redis state. Then hostile
clients, a query attack over many source ids and both apps with restarts between, and kills of a
replica and of Redis mid-stream (last: they reset the replica's metrics).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.timing]  # latencies asserted

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server not installed (make test installs it)", allow_module_level=True)

ADMIN = "test-admin-token"
HIGH_MODEL = "resnet10t"
LOW_MODEL = "cifar_resnet20"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_random_weights(model: str, kind: str, path, seed: int) -> str:
    from twostream.core.config import HighStreamConfig, LowStreamConfig
    from twostream.core.models import build_stream

    torch.manual_seed(seed)
    cfg = (HighStreamConfig if kind == "high" else LowStreamConfig)(model=model, weights="random")
    torch.save(build_stream(cfg, kind).net.state_dict(), path)
    return str(path)


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout}s")
        time.sleep(0.25)


def start_app(tmp, extra: list[str] = ()) -> dict:
    """Redis, Ray and both topologies of the application; returns what the tests need."""
    from ray import serve

    from jobs.ray_cluster import connect, serve_cluster_env, serve_http_options
    from jobs.serve import build_app
    from twostream.core.config import load_config
    from twostream.core.scoring import Scorer
    from twostream.online.redis_server import EmbeddedRedis

    high_w = save_random_weights(HIGH_MODEL, "high", tmp / "high.pt", 0)
    low_w = save_random_weights(LOW_MODEL, "low", tmp / "low.pt", 1)
    redis = EmbeddedRedis(tmp / "redis", appendfsync="always")
    redis.start()
    port = free_port()
    overrides = [
        f"high.model={HIGH_MODEL}", f"high.weights={high_w}", "high.num_cpus=0.5", "high.threads=1",
        f"low.model={LOW_MODEL}", f"low.weights={low_w}", "low.num_cpus=0.5", "low.threads=1",
        # Low thresholds so that random-init models give both verdicts.
        "thresholds.p1=0.0", "thresholds.p2=0.0",
        "limits.max_pixels=4000000",
        f"serve.port={port}", "serve.max_body_bytes=3000000", f"serve.admin_token={ADMIN}",
        f"serve.redis_url={redis.url}", "serve.redis_retry_s=5", "serve.body_timeout_s=3",
        "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.01",
        "serve.drain_s=1",  # no load balancer in front to wait for: the teardown's shutdown takes 1 s, not 30
        "serve.answer_detail=full",  # the tests read the scores
        *extra,
    ]
    config = load_config(None, overrides)
    split = config.model_copy(deep=True)
    split.serve.topology = "split"
    env = serve_cluster_env(config.serve)  # the default: HAProxy in front of the replicas
    env["RAY_metrics_report_interval_ms"] = "500"  # /metrics sums Ray's exports: let them follow closely
    saved = {k: os.environ.get(k) for k in env}
    connect(num_cpus=2, log_to_driver=False, cluster_env=env)
    try:
        serve.start(http_options=serve_http_options(config.serve))
        serve.run(build_app(config), name=config.serve.app_name, route_prefix="/")
        serve.run(build_app(split), name="split", route_prefix="/split")
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz")
        wait_http(base + "/split/healthz")
        return {"base": base, "config": config, "scorer": Scorer(config), "tmp": tmp, "redis": redis, "env": saved}
    except BaseException:
        stop_app({"redis": redis, "env": saved})
        raise


def stop_app(setup: dict) -> None:
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        setup["redis"].stop()
        for key, value in setup["env"].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    app = start_app(tmp_path_factory.mktemp("serve"))
    yield app
    stop_app(app)


def images_pool(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = int(rng.integers(24, 120)), int(rng.integers(24, 120))
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(-60, 60, (h, w, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


def classify(base: str, data: bytes, source: str | None = None, ctype: str = "image/png", **kw):
    headers = {"Content-Type": ctype}
    if source is not None:
        headers["X-Source-Id"] = source
    return requests.post(base + "/v1/classify", data=data, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def verdict_pool(setup):
    """Library verdicts of a pool of images: some accepted, some rejected."""
    pool = images_pool(40)
    results = setup["scorer"].score_batch([png(p) for p in pool])
    accepted = [png(p) for p, r in zip(pool, results) if r.verdict == "accepted"]
    rejected = [png(p) for p, r in zip(pool, results) if r.verdict == "adversarial"]
    assert accepted and rejected, "random models gave one verdict only; change the pool or thresholds"
    return {"pool": pool, "results": results, "accepted": accepted, "rejected": rejected}


def test_verdicts_equal_the_library(setup, verdict_pool):
    base = setup["base"]
    pool, expected = verdict_pool["pool"][:12], verdict_pool["results"][:12]
    with ThreadPoolExecutor(6) as ex:  # concurrent, so the streams batch
        answers = list(ex.map(lambda k: classify(base, png(pool[k]), f"verdicts-{k}"), range(len(pool))))
    for answer, want in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["verdict"] == want.verdict and got["label"] == want.label
        assert got["imagenet_index"] == want.imagenet_index
        assert [e["index"] for e in got["high_topk"]] == want.high_idx
        assert [e["index"] for e in got["low_topk"]] == want.low_idx
        assert [e["cifar10"] for e in got["high_topk"]] == want.high_labels
        np.testing.assert_allclose([e["prob"] for e in got["high_topk"]], want.high_prob, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([e["prob"] for e in got["low_topk"]], want.low_prob, rtol=1e-4, atol=1e-6)
        assert got["agreement"] == pytest.approx(want.agreement, rel=1e-4, abs=1e-7)
        assert (got["width"], got["height"]) == (want.width, want.height)
        assert got["standing"] == {"cc": int(want.verdict == "adversarial"), "blacklisted": False}
        assert {"check", "streams", "high_model", "low_model", "reputation", "total"} <= set(got["timings_ms"])


def _sequence(setup, verdict_pool, source: str, plan: str, workers: int):
    """Send images ('r' rejected / 'a' accepted) from one source; return (uploads, answers)."""
    from twostream.core.reputation import Upload

    accepted, rejected = verdict_pool["accepted"], verdict_pool["rejected"]
    items = [
        (rejected[k % len(rejected)] if c == "r" else accepted[k % len(accepted)], c == "r")
        for k, c in enumerate(plan)
    ]
    with ThreadPoolExecutor(workers) as ex:
        answers = list(ex.map(lambda item: classify(setup["base"], item[0], source), items))
    uploads = []
    for (data, is_rejected), answer in zip(items, answers):
        assert answer.status_code in (200, 403), answer.text
        body = answer.json()
        verdict = "adversarial" if is_rejected else "x"
        uploads.append(Upload(source, body["timestamp"], body["image_id"], is_rejected, verdict))
    return uploads, answers


def test_reputation_sequence_equals_replay_and_403_when_blacklisted(setup, verdict_pool):
    from twostream.core.reputation import replay

    # Sequential: blacklisted after 3 rejections, then earns its way back with accepted images.
    plan = "rrarrrraaaaaaaar"
    uploads, answers = _sequence(setup, verdict_pool, "seq-src", plan, workers=1)
    expected, ledger = replay(uploads, setup["config"].reputation)
    statuses = [a.status_code for a in answers]
    assert 403 in statuses and statuses[-2] == 200  # blocked on the way, back at the end
    for answer, want in zip(answers, expected):
        body = answer.json()
        assert body["standing"] == {"cc": want.cc, "blacklisted": want.blacklisted}
        if want.response == "blocked":
            assert answer.status_code == 403
            assert body["error"] == "source_blacklisted" and "blacklisted" in body["detail"]
            assert body["response"] == "blocked" and "verdict" not in body
        else:
            assert answer.status_code == 200 and body["response"] != "blocked"
            assert (body["response"] == "adversarial") == (body["verdict"] == "adversarial")
    info = requests.get(setup["base"] + "/v1/sources/seq-src", timeout=10).json()
    state = ledger.get("seq-src")
    assert (info["cc"], info["blacklisted"], info["images"], info["rejected"], info["blocked"]) == (
        state.cc, state.blacklisted, state.images, state.rejected, state.blocked
    )
    assert info["intervals"] == state.intervals


def test_concurrent_requests_from_one_source_lose_no_increment(setup, verdict_pool):
    from twostream.core.reputation import replay

    rng = np.random.default_rng(5)
    plan = "".join(rng.choice(["r", "a"], size=40, p=[0.6, 0.4]))
    uploads, answers = _sequence(setup, verdict_pool, "burst-src", plan, workers=8)
    # The order applied (the sequence numbers Redis returned) is the timestamps' order.
    seqs = [a.json()["seq"] for a in answers]
    assert sorted(seqs) == list(range(1, len(plan) + 1))
    by_seq = sorted(range(len(plan)), key=lambda k: seqs[k])
    assert [uploads[k].timestamp for k in by_seq] == sorted(u.timestamp for u in uploads)
    expected, ledger = replay(uploads, setup["config"].reputation)
    for answer, want in zip(answers, expected):
        body = answer.json()
        assert body["standing"] == {"cc": want.cc, "blacklisted": want.blacklisted}
        assert (answer.status_code == 403) == (want.response == "blocked")
    info = requests.get(setup["base"] + "/v1/sources/burst-src", timeout=10).json()
    assert info["images"] == len(plan) and info["rejected"] == plan.count("r")
    assert info["cc"] == ledger.get("burst-src").cc


def test_source_from_header_or_form_field_never_from_a_forwarded_address(setup, verdict_pool):
    base = setup["base"]
    data = verdict_pool["accepted"][0]
    answer = requests.post(base + "/v1/classify", files={"image": ("a.png", data, "image/png")},
                           data={"source": "form-src"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["source"] == "form-src"
    answer = requests.post(base + "/v1/classify", files={"image": ("a.png", data, "image/png")},
                           data={"source": "form-src"}, headers={"X-Source-Id": "header-src"}, timeout=60)
    # Two names for one upload: neither wins (issue 29), the answer names both.
    assert answer.status_code == 400 and answer.json()["error"] == "ambiguous_source", answer.text
    assert "'header-src'" in answer.json()["detail"] and "'form-src'" in answer.json()["detail"]
    # No source id: behind HAProxy (the default serve.http_proxy) the replicas never see the client's
    # address, so the request is refused, also when it names an address of its own.
    for spoof in ({}, {"X-Forwarded-For": "203.0.113.9"}):
        answer = requests.post(base + "/v1/classify", data=data, headers={"Content-Type": "image/png", **spoof},
                               timeout=60)
        assert answer.status_code == 400 and answer.json()["error"] == "missing_source", answer.text


def test_error_codes(setup):
    base = setup["base"]
    # 413: declared and actual body over serve.max_body_bytes (3 MB).
    big = b"\0" * 3_100_000
    answer = classify(base, big, "err-src")
    assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"

    def chunked():
        for _ in range(40):
            yield b"\0" * 100_000

    answer = requests.post(base + "/v1/classify", data=chunked(), timeout=60,
                           headers={"Content-Type": "image/png", "X-Source-Id": "err-src"})
    assert answer.status_code == 413
    # 415: media types and formats that are not images we take.
    answer = classify(base, b"hello", "err-src", ctype="text/plain")
    assert answer.status_code == 415 and "Content-Type" in answer.json()["detail"]
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    answer = classify(base, ico.getvalue(), "err-src", ctype="application/octet-stream")
    assert answer.status_code == 415 and "ICO" in answer.json()["detail"]
    # 422: garbage, truncated, decompression bomb (a small file declaring 3000x3000 > 4 Mpx).
    answer = classify(base, b"not an image at all", "err-src")
    assert answer.status_code == 422 and "not a recognised" in answer.json()["detail"]
    good = png(images_pool(1)[0])
    answer = classify(base, good[: len(good) // 2], "err-src")
    assert answer.status_code == 422 and answer.json()["error"] == "undecodable_image"
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, format="PNG", optimize=True)
    assert len(bomb.getvalue()) < 100_000
    answer = classify(base, bomb.getvalue(), "err-src")
    assert answer.status_code == 422 and "too many pixels" in answer.json()["detail"]
    # 400: a bad source id, a form without the image.
    answer = classify(base, good, "has space")
    assert answer.status_code == 400 and answer.json()["error"] == "bad_source"
    answer = requests.post(base + "/v1/classify", files={"other": ("a.png", good)}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "missing_image"
    # None of these were Algorithm-2 events, and the service is still up.
    assert requests.get(base + "/v1/sources/err-src", timeout=10).status_code == 404
    # A file corrupt past its header fails in the models: not an Algorithm-2 event, and the
    # source's next image is answered at once (there is no per-source place to give up).
    assert classify(base, good[: len(good) // 2], "trunc-src").status_code == 422
    started = time.monotonic()
    answer = requests.post(base + "/v1/classify", data=good, timeout=20,
                           headers={"Content-Type": "image/png", "X-Source-Id": "trunc-src"})
    assert answer.status_code == 200 and time.monotonic() - started < 5
    info = requests.get(base + "/v1/sources/trunc-src", timeout=10).json()
    assert info["images"] == 1
    assert requests.get(base + "/healthz", timeout=10).status_code == 200


def test_sources_listing_and_admin_reset(setup, verdict_pool):
    base = setup["base"]
    for _ in range(3):
        classify(base, verdict_pool["rejected"][0], "listed-src")
    listing = requests.get(base + "/v1/sources", params={"blacklisted": "true"}, timeout=10).json()
    assert "listed-src" in [row["source"] for row in listing["sources"]]
    assert all(row["blacklisted"] for row in listing["sources"])
    assert listing["blacklist_size"] == listing["count"] >= 1
    everyone = requests.get(base + "/v1/sources", timeout=10).json()
    assert everyone["count"] >= listing["count"]

    url = base + "/v1/sources/listed-src/reset"
    answer = requests.post(url, timeout=10)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert requests.post(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
    assert requests.post(url, headers={"Authorization": "Basic abc"}, timeout=10).status_code == 401
    assert requests.get(base + "/v1/sources/listed-src", timeout=10).json()["blacklisted"]
    answer = requests.post(url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["existed"] and answer.json()["previous"]["blacklisted"]
    assert requests.get(base + "/v1/sources/listed-src", timeout=10).status_code == 404
    assert classify(base, verdict_pool["rejected"][0], "listed-src").json()["standing"]["cc"] == 1


def test_metrics_and_openapi(setup):
    from prometheus_client.parser import text_string_to_metric_families

    base = setup["base"]
    deadline = time.monotonic() + 60  # until Ray's metrics agents have reported the earlier tests' requests
    while True:
        answer = requests.get(base + "/metrics", timeout=10)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        statuses = {s.labels.get("status") for s in families["twostream_requests"].samples}
        if {"200", "403", "413", "415", "422"} <= statuses or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"200", "403", "413", "415", "422"} <= statuses
    verdicts = {s.labels["verdict"] for s in families["twostream_verdicts"].samples}
    assert {"accepted", "adversarial", "error"} <= verdicts
    assert families["twostream_blacklist_size"].samples[0].value >= 1
    assert "twostream_request_latency_seconds" in families
    schema = requests.get(base + "/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/sources/{source}", "/v1/sources", "/v1/sources/{source}/reset",
            "/healthz", "/metrics"} <= set(schema["paths"])
    assert "ClassifyResponse" in schema["components"]["schemas"]




def test_split_topology_answers_the_same_on_the_same_state(setup, verdict_pool):
    base = setup["base"]
    pool, expected = verdict_pool["pool"][:4], verdict_pool["results"][:4]
    for k, (pixels, want) in enumerate(zip(pool, expected)):
        answer = classify(base + "/split", png(pixels), f"split-{k}")
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert (got["verdict"], got["label"], got["imagenet_index"]) == (want.verdict, want.label, want.imagenet_index)
        assert [e["index"] for e in got["high_topk"]] == want.high_idx
        np.testing.assert_allclose([e["prob"] for e in got["low_topk"]], want.low_prob, rtol=1e-4, atol=1e-6)
    # One state behind both applications: a source's steps continue across them.
    data = verdict_pool["rejected"][0]
    seqs = [classify(u, data, "both-apps").json()["seq"] for u in (base, base + "/split", base)]
    assert seqs == [1, 2, 3]
    assert requests.get(base + "/split/healthz", timeout=10).json()["topology"] == "split"


def _load(setup, rows) -> None:
    """Write source states straight into the endpoint's Redis (as `twostream reputation import`)."""
    import asyncio

    from twostream.online.redis_store import RedisReputation

    async def main():
        store = RedisReputation(setup["config"].serve.redis_url)
        await store.load(rows)
        await store.close()

    asyncio.run(main())


def test_any_source_id_can_be_looked_up_and_reset(setup, verdict_pool):
    from urllib.parse import quote

    from twostream.core.reputation import SourceState
    from twostream.core.sources import SourceRow

    base = setup["base"]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    # From a request: printable ASCII, '/' and '%' included.
    for source in ("cam/7", "50%off", "a/b/reset"):
        assert classify(base, verdict_pool["rejected"][0], source).status_code == 200
        answer = requests.get(f"{base}/v1/sources/{quote(source, safe='')}", timeout=10)
        assert answer.status_code == 200 and answer.json()["source"] == source and answer.json()["images"] == 1
    # Imported from a batch run or an audit: any text up to the length limit.
    odd = ["has space", "caf\u00e9 \u2603", "/lead", "trail/", "%2F", "x" * 256]
    _load(setup, [SourceRow(s, SourceState(cc=1, images=1, rejected=1, first_seen=1.0, last_seen=1.0), 0) for s in odd])
    for source in odd:
        by_path = requests.get(f"{base}/v1/sources/{quote(source, safe='')}", timeout=10)
        by_query = requests.get(f"{base}/v1/source", params={"id": source}, timeout=10)
        assert by_path.status_code == by_query.status_code == 200, (source, by_path.text)
        assert by_path.json() == by_query.json() and by_path.json()["source"] == source
    for k, source in enumerate(odd):
        if k % 2:
            answer = requests.post(f"{base}/v1/sources/{quote(source, safe='')}/reset", headers=auth, timeout=10)
        else:
            answer = requests.post(f"{base}/v1/source/reset", params={"id": source}, headers=auth, timeout=10)
        assert answer.status_code == 200 and answer.json()["existed"], (source, answer.text)
        assert requests.get(f"{base}/v1/source", params={"id": source}, timeout=10).status_code == 404
    assert requests.get(f"{base}/v1/source", params={"id": "y" * 257}, timeout=10).status_code == 400


def _max_health_latency(base: str, busy, seconds: float) -> tuple[float, list]:
    """Run ``busy()`` in threads while polling /healthz; the slowest /healthz and busy's results."""
    with ThreadPoolExecutor(3) as ex:
        jobs = [ex.submit(busy) for _ in range(2)]
        worst = 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or not all(j.done() for j in jobs):
            t0 = time.monotonic()
            assert requests.get(base + "/healthz", timeout=10).status_code == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        return worst, [j.result() for j in jobs]


def test_hostile_multipart_is_refused_and_health_stays_fast(setup, verdict_pool):
    base = setup["base"]
    boundary = "B"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n".encode()
    limit = setup["config"].serve.max_body_bytes
    fields = (limit - 1000) // len(part)  # as many tiny fields as fit under the size limit
    body = part * fields + f"--{boundary}--\r\n".encode()
    assert len(body) < limit and fields > 50_000
    ctype = f"multipart/form-data; boundary={boundary}"

    def hostile():
        codes = []
        for _ in range(5):
            answer = requests.post(base + "/v1/classify", data=body, timeout=60,
                                   headers={"Content-Type": ctype, "X-Source-Id": "hostile-src"})
            codes.append((answer.status_code, answer.json()["error"]))
        return codes

    worst, results = _max_health_latency(base, hostile, 2.0)
    assert worst < 1.0, f"/healthz took {worst:.2f}s while hostile forms were refused"
    assert {c for r in results for c in r} == {(400, "too_many_parts")}
    # A huge part header line, and an oversized text field: refused too.
    long_header = (f"--{boundary}\r\nContent-Disposition: form-data; name=image; filename="
                   f"\"{'n' * 100_000}\"\r\n\r\nx\r\n--{boundary}--\r\n").encode()
    answer = requests.post(base + "/v1/classify", data=long_header, headers={"Content-Type": ctype}, timeout=60)
    assert answer.status_code == 400 and "header" in answer.json()["detail"].lower()
    big_field = (f"--{boundary}\r\nContent-Disposition: form-data; name=source\r\n\r\n{'s' * 100_000}\r\n"
                 f"--{boundary}--\r\n").encode()
    answer = requests.post(base + "/v1/classify", data=big_field, headers={"Content-Type": ctype}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "field_too_large"
    # The source was never touched, and a real upload from it goes through.
    assert requests.get(base + "/v1/sources/hostile-src", timeout=10).status_code == 404
    assert classify(base, verdict_pool["accepted"][0], "hostile-src").status_code == 200


def _raw_request(base: str, head: str, body: bytes, then_close: bool, wait_s: float = 0.0) -> bytes:
    """Send a request's head and part of its body on a raw socket; then close, or wait for an answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        if then_close:
            return b""
        time.sleep(wait_s)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                    break
        except OSError:
            pass
        return b"".join(chunks)


def test_slow_and_broken_off_uploads_free_everything(setup, verdict_pool):
    base = setup["base"]
    good = verdict_pool["accepted"][0]
    head = ("POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Source-Id: {src}\r\n"
            "Content-Length: {n}\r\n\r\n")
    # Broken off: half a body, then the client is gone. Nothing is held for the source.
    for _ in range(3):
        _raw_request(base, head.format(src="broken-src", n=len(good)), good[: len(good) // 2], then_close=True)
    started = time.monotonic()
    answer = classify(base, good, "broken-src")
    assert answer.status_code == 200 and time.monotonic() - started < 5
    assert answer.json()["seq"] == 1  # the broken uploads were not Algorithm-2 events

    # Slow loris: the body never completes; the endpoint answers 408 after serve.body_timeout_s
    # and stays responsive meanwhile.
    def slow():
        return _raw_request(base, head.format(src="slow-src", n=len(good)), good[:100], then_close=False)

    timeout = setup["config"].serve.body_timeout_s
    worst, results = _max_health_latency(base, slow, timeout)
    assert worst < 1.0, f"/healthz took {worst:.2f}s during slow uploads"
    assert all(b" 408 " in r.split(b"\r\n", 1)[0] for r in results), results
    answer = classify(base, good, "slow-src")
    assert answer.status_code == 200 and answer.json()["seq"] == 1


def _replica(app: str, deployment: str) -> str:
    [name] = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#") and a["namespace"] == "serve"
    ]
    return name


def _attack_run(n: int, seed: int = 5) -> list[np.ndarray]:
    """A hand-built query attack: a photograph (a 90x120 crop of a demo photograph: a geometry
    no other test sends), then steps of -2, 0 or +2 (/255) per value, kept within 8/255 of it."""
    from twostream.demo.photos import __file__ as photos_py

    with Image.open(sorted((Path(photos_py).parent / "data").glob("*.jpg"))[0]) as im:
        start = np.asarray(im.convert("RGB"))[:90, :120].astype(np.int16)
    rng = np.random.default_rng(seed)
    run, current = [], start.copy()
    for _ in range(n):
        run.append(current.astype(np.uint8))
        current = np.clip(np.clip(current + rng.choice([-2, 0, 2], size=start.shape), start - 8, start + 8), 0, 255)
    return run


def _detections(base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(requests.get(base + "/metrics", timeout=10).text)}
    return sum(s.value for s in families["twostream_query_detections"].samples if s.name.endswith("_total"))


def test_query_attack_is_answered_across_sources_replicas_and_restarts(setup):
    """A query attack sent one query per source id, alternately to the fused and the split app
    (two ingress replicas on one Redis state), with exact re-uploads in between, is answered
    query_attack exactly where a MemoryStore detector with the same rules predicts (PNG: the
    replicas decode the very pixels). After the 10th query Redis is restarted and both ingress
    replicas are killed (their successors hold no state of their own): the next queries are
    flagged at once, which only the kept state allows. A detection counts as a rejection."""
    from twostream.core.query_detector import QueryDetector

    base = setup["base"]
    run = _attack_run(20)
    plan = [*range(10), 3, *range(10, 20), 12]  # query numbers; 3 and 12 again: exact re-uploads
    reference = QueryDetector(setup["config"].detector.query_config())
    expected = [reference.detect(run[q], query_id=str(k))[1] for k, q in enumerate(plan)]
    assert expected[10] is False and expected[-1] is False  # the re-uploads
    first = expected.index(True)
    assert 6 <= first <= 10 and expected[11], expected  # flagged within a handful; right after the restart too
    urls = [base, base + "/split"]
    flagged = sum(expected[:11])  # /metrics sums every replica of both apps (ray.util.metrics)
    before = _detections(base)
    for k, q in enumerate(plan):
        if k == 11:  # the restarts, between the re-upload and the next query
            deadline = time.monotonic() + 60  # Ray's metrics agents report every 0.5 s here
            while _detections(base) - before != flagged and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _detections(base) - before == flagged
            redis = setup["redis"]
            redis.stop()
            redis.start()
            for app in ("twostream", "split"):
                ray.kill(ray.get_actor(_replica(app, "Ingress"), namespace="serve"), no_restart=True)
            probe = png(np.full((30, 40, 3), 77, np.uint8))
            for url in urls:  # until each app's new replica answers, three times in a row
                deadline, answered = time.monotonic() + 300, 0
                while answered < 3:
                    try:
                        fresh = f"after-restart-{time.monotonic_ns()}"  # a new source: never blacklisted
                        answered = answered + 1 if classify(url, probe, fresh).status_code == 200 else 0
                    except requests.RequestException:
                        answered = 0
                    assert time.monotonic() < deadline, f"{url} did not come back"
                    time.sleep(0.2)
        answer = classify(urls[k % 2], png(run[q]), f"attacker-{k}")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if expected[k]:
            assert set(body) == {"image_id", "source", "timestamp", "seq", "response", "detail", "standing"}, k
            assert body["response"] == "query_attack" and body["standing"] == {"cc": 1, "blacklisted": False}
        else:
            assert body["response"] != "query_attack" and "high_topk" in body, k


def test_replica_and_redis_restarts_mid_stream_lose_nothing(setup, verdict_pool):
    """8 sources send 14 images each, sequentially, while the ingress replica (fused: the models
    too) and a stream replica of the split app are killed, then Redis is SIGKILLed and restarted.
    Every answered image is in the final state (appendfsync always), each source's state equals a
    sequential replay in the order applied (the seq numbers), and an image whose request failed
    counts only if its seq is in the state (the step ran before the replica died)."""
    import itertools
    import threading

    from twostream.core.reputation import ReputationLedger, Upload

    base = setup["base"]
    accepted, rejected = verdict_pool["accepted"], verdict_pool["rejected"]
    rng = np.random.default_rng(11)
    plans = {f"kill-{k}": "".join(rng.choice(["r", "a"], size=14, p=[0.6, 0.4])) for k in range(8)}
    results: dict[str, list] = {s: [] for s in plans}
    progress = itertools.count()

    def sender(source: str, plan: str) -> None:
        url = base if int(source[-1]) % 2 == 0 else base + "/split"
        for k, c in enumerate(plan):
            data = rejected[k % len(rejected)] if c == "r" else accepted[k % len(accepted)]
            try:
                answer = classify(url, data, source)
                body = answer.json() if answer.status_code in (200, 403) else None
            except (requests.RequestException, ValueError):
                body = None
            results[source].append((c == "r", body))
            next(progress)
            time.sleep(0.05)

    threads = [threading.Thread(target=sender, args=item) for item in plans.items()]
    for t in threads:
        t.start()
    total = sum(len(p) for p in plans.values())

    def wait_for(n: int) -> None:
        while len([1 for r in results.values() for _ in r]) < n:
            time.sleep(0.05)

    wait_for(total // 4)
    ray.kill(ray.get_actor(_replica("twostream", "Ingress"), namespace="serve"), no_restart=True)
    ray.kill(ray.get_actor(_replica("split", "LowStream"), namespace="serve"), no_restart=True)
    wait_for(total // 2)
    redis = setup["redis"]
    redis.process.kill()
    redis.process.wait()
    redis.process = None
    time.sleep(0.5)
    redis.start()
    for t in threads:
        t.join(timeout=600)

    answered = sum(1 for r in results.values() for _, body in r if body)
    assert answered >= total // 2, f"only {answered} of {total} answered"
    config = setup["config"].reputation
    for source, events in results.items():
        state = requests.get(f"{base}/v1/sources/{source}", timeout=30).json()
        ledger = _replay_in_seq_order(source, events, state["images"], config)
        got = ledger.get(source)
        assert (state["images"], state["rejected"], state["blocked"], state["cc"], state["blacklisted"]) == (
            got.images, got.rejected, got.blocked, got.cc, got.blacklisted), source
        assert len(state["intervals"]) == len(got.intervals)
    assert requests.get(base + "/healthz", timeout=10).status_code == 200


def _replay_in_seq_order(source: str, events: list, images: int, config):
    """A sequential replay of one source's requests (sent one at a time) in the order applied.

    Answered requests carry their seq; the failed ones between two answered requests were
    applied when the seqs skip: all of them, none, or (tried in turn) the subset whose replay
    gives the standing of the next answered request."""
    import copy
    from itertools import combinations

    from twostream.core.reputation import ReputationLedger, Upload

    ledger = ReputationLedger(config)
    seq, failed = 0, []
    for k, (is_rejected, body) in enumerate([*events, (None, {"seq": images + 1, "standing": None})]):
        if body is None:
            failed.append((k, is_rejected))
            continue
        gap = body["seq"] - seq - 1
        assert 0 <= gap <= len(failed), (source, k, body["seq"], seq, failed)
        for chosen in combinations(failed, gap):
            trial = copy.deepcopy(ledger)
            for j, r in chosen:
                trial.observe(Upload(source, float(j), f"failed-{j}", r, "x"))
            if is_rejected is None:
                ledger = trial
                break
            want = trial.observe(Upload(source, body["timestamp"], body["image_id"], is_rejected, "x"))
            if body["standing"] == {"cc": want.cc, "blacklisted": want.blacklisted}:
                ledger = trial
                break
        else:
            raise AssertionError(f"{source}: answer {k} (seq {body['seq']}) matches no replay")
        seq, failed = body["seq"], []
    return ledger


def test_redis_unreachable_is_a_503_never_a_pass_through(setup, verdict_pool):
    base = setup["base"]
    redis = setup["redis"]
    redis.stop()
    try:
        answer = requests.get(base + "/healthz", timeout=30)
        assert answer.status_code == 503 and answer.json()["error"] == "reputation_unavailable"
        assert "unreachable" in answer.json()["detail"]
        answer = classify(base, verdict_pool["accepted"][0], "down-src")
        assert answer.status_code == 503 and answer.json()["error"] == "reputation_unavailable"
        assert requests.get(base + "/v1/sources/down-src", timeout=30).status_code == 503
    finally:
        redis.start()
    wait_http(base + "/healthz", timeout=30)
    assert requests.get(base + "/v1/sources/down-src", timeout=10).status_code == 404
