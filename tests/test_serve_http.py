"""The Serve application in-process on a loopback port, driven over real HTTP.

Small random-init models whose weights are saved to files first, so the application and the
library :class:`~twostream.core.scoring.Scorer` load the very same parameters.
"""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")

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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ray import serve

    from jobs.serve import build_app
    from twostream.core.scoring import Scorer
    from twostream.core.config import load_config

    tmp = tmp_path_factory.mktemp("serve")
    high_w = save_random_weights(HIGH_MODEL, "high", tmp / "high.pt", 0)
    low_w = save_random_weights(LOW_MODEL, "low", tmp / "low.pt", 1)
    port = free_port()
    overrides = [
        f"high.model={HIGH_MODEL}", f"high.weights={high_w}", "high.num_cpus=0.5", "high.threads=1",
        f"low.model={LOW_MODEL}", f"low.weights={low_w}", "low.num_cpus=0.5", "low.threads=1",
        # Low thresholds so that random-init models give both verdicts.
        "thresholds.p1=0.0", "thresholds.p2=0.0",
        "limits.max_pixels=4000000",
        f"serve.port={port}", "serve.max_body_bytes=3000000", f"serve.admin_token={ADMIN}",
        f"serve.snapshot_uri={tmp / 'state' / 'reputation.snap'}", "serve.snapshot_period_s=0.5",
        "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.01",
    ]
    config = load_config(None, overrides)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.serve.app_name, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz")
        scorer = Scorer(config)
        yield {"base": base, "config": config, "scorer": scorer, "tmp": tmp}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


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
    plan = "".join(rng.choice(["r", "a"], size=24, p=[0.6, 0.4]))
    uploads, answers = _sequence(setup, verdict_pool, "burst-src", plan, workers=8)
    expected, ledger = replay(uploads, setup["config"].reputation)
    for answer, want in zip(answers, expected):
        body = answer.json()
        assert body["standing"] == {"cc": want.cc, "blacklisted": want.blacklisted}
        assert (answer.status_code == 403) == (want.response == "blocked")
    info = requests.get(setup["base"] + "/v1/sources/burst-src", timeout=10).json()
    assert info["images"] == len(plan) and info["rejected"] == plan.count("r")
    assert info["cc"] == ledger.get("burst-src").cc


def test_source_from_form_field_or_client_address(setup, verdict_pool):
    base = setup["base"]
    data = verdict_pool["accepted"][0]
    answer = requests.post(base + "/v1/classify", files={"image": ("a.png", data, "image/png")},
                           data={"source": "form-src"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["source"] == "form-src"
    answer = requests.post(base + "/v1/classify", files={"image": ("a.png", data, "image/png")},
                           data={"source": "form-src"}, headers={"X-Source-Id": "header-wins"}, timeout=60)
    assert answer.json()["source"] == "header-wins"
    answer = classify(base, data)  # no header: the client address
    assert answer.status_code == 200 and answer.json()["source"] == "127.0.0.1"


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
    # A file corrupt past its header fails in the stream replicas after the source's place in
    # the ledger was reserved: the place is given up, so its next image is not held back.
    assert classify(base, good[: len(good) // 2], "trunc-src").status_code == 422
    started = time.monotonic()
    answer = requests.post(base + "/v1/classify", data=good, timeout=20,
                           headers={"Content-Type": "image/png", "X-Source-Id": "trunc-src"})
    assert answer.status_code == 200 and time.monotonic() - started < setup["config"].serve.order_timeout_s
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
    answer = requests.get(base + "/metrics", timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    statuses = {s.labels.get("status") for s in families["twostream_requests"].samples}
    assert {"200", "403", "413", "415", "422"} <= statuses
    verdicts = {s.labels["verdict"] for s in families["twostream_verdicts"].samples}
    assert {"accepted", "adversarial", "error"} <= verdicts
    assert families["twostream_blacklist_size"].samples[0].value >= 1
    assert "twostream_request_latency_seconds" in families
    schema = requests.get(base + "/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/sources/{source}", "/v1/sources", "/v1/sources/{source}/reset",
            "/healthz", "/metrics"} <= set(schema["paths"])
    assert "ClassifyResponse" in schema["components"]["schemas"]


def test_state_survives_killing_the_reputation_replica(setup, verdict_pool):
    base = setup["base"]
    for data in (verdict_pool["rejected"][0], verdict_pool["rejected"][1 % len(verdict_pool["rejected"])]):
        assert classify(base, data, "persist-src").status_code == 200
    before = requests.get(base + "/v1/sources/persist-src", timeout=10).json()
    time.sleep(1.5)  # > serve.snapshot_period_s: the state is in a snapshot now

    [name] = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if "Reputation" in a["name"] and a["namespace"] == "serve"
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while True:  # the controller starts a new replica, which restores the snapshot
        try:
            answer = requests.get(base + "/v1/sources/persist-src", timeout=10)
            if answer.status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "reputation replica did not come back"
        time.sleep(0.5)
    after = answer.json()
    assert after == before
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Reputation" in a["name"]]
    assert name not in names
    # It keeps counting from the restored state.
    answer = classify(base, verdict_pool["rejected"][0], "persist-src")
    assert answer.status_code == 403 and answer.json()["standing"]["cc"] == 3
