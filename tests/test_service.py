"""The online service's Ray-free parts: config, request checks, metrics, the reputation store."""

from __future__ import annotations

import asyncio
import random

import pytest

from twostream.core.config import ConfigError, ReputationConfig, TwoStreamConfig, load_config
from twostream.core.reputation import ReputationLedger, Upload, replay
from twostream.online.http import (
    ApiError,
    check_bearer,
    check_content_length,
    decode_error_status,
    media_kind,
    parse_multipart,
    read_limited,
    resolve_source,
)
from twostream.online.metrics import ServiceMetrics
from twostream.online.reputation_store import ReputationStore


def run(coro):
    return asyncio.run(coro)


# -- config ------------------------------------------------------------------------------


def test_serve_config_defaults_and_overrides(tmp_path, monkeypatch):
    cfg = load_config(None, ["serve.port=9123", "serve.max_batch_size=4", "high.pool_size=2"])
    assert cfg.serve.port == 9123 and cfg.serve.max_batch_size == 4 and cfg.high.pool_size == 2
    assert cfg.serve.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        load_config(None, ["serve.max_batch_size=0"])
    with pytest.raises(ConfigError, match="serve.nope"):
        load_config(None, ["serve.nope=1"])
    monkeypatch.delenv("TWOSTREAM_ADMIN_TOKEN", raising=False)
    assert TwoStreamConfig().serve.resolved_admin_token() is None
    monkeypatch.setenv("TWOSTREAM_ADMIN_TOKEN", "from-env")
    assert TwoStreamConfig().serve.resolved_admin_token() == "from-env"
    assert load_config(None, ["serve.admin_token=cfg"]).serve.resolved_admin_token() == "cfg"


def test_cluster_serve_yaml_is_a_valid_config():
    import yaml
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml").read_text())
    [app] = doc["applications"]
    assert app["import_path"] == "jobs.serve:app_builder"
    TwoStreamConfig.model_validate(app["args"].get("config", {}))


# -- request checks ----------------------------------------------------------------------


def test_media_kinds():
    assert media_kind("image/png") == "raw"
    assert media_kind("Image/JPEG; charset=binary") == "raw"
    assert media_kind("application/octet-stream") == "raw"
    assert media_kind("multipart/form-data; boundary=x") == "multipart"
    for bad in (None, "", "text/plain", "application/json", "image/svg+xml"):
        with pytest.raises(ApiError) as err:
            media_kind(bad)
        assert err.value.status == 415


def test_content_length_and_streamed_limit():
    check_content_length(None, 10)
    check_content_length("10", 10)
    with pytest.raises(ApiError) as err:
        check_content_length("11", 10)
    assert err.value.status == 413 and "limit is 10" in err.value.detail
    with pytest.raises(ApiError) as err:
        check_content_length("ten", 10)
    assert err.value.status == 400

    async def chunks(parts):
        for part in parts:
            yield part

    assert run(read_limited(chunks([b"abc", b"def"]), 6)) == b"abcdef"
    with pytest.raises(ApiError) as err:
        run(read_limited(chunks([b"abc", b"defg"]), 6))
    assert err.value.status == 413


def _form(fields: dict[str, tuple[str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    lines = []
    for name, (filename, data) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        lines.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode())
        if filename:
            lines.append(b"Content-Type: application/octet-stream\r\n")
        lines.append(b"\r\n" + data + b"\r\n")
    lines.append(f"--{boundary}--\r\n".encode())
    return b"".join(lines), f"multipart/form-data; boundary={boundary}"


def test_multipart_parsing_keeps_binary_bytes():
    payload = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n"
    body, ctype = _form({"source": (None, b"cam-7"), "image": ("x.png", payload)})
    image, fields = parse_multipart(body, ctype)
    assert image == payload and fields == {"source": "cam-7"}
    body, ctype = _form({"file": ("x.bin", b"abc")})
    assert parse_multipart(body, ctype)[0] == b"abc"
    body, ctype = _form({"source": (None, b"s")})
    with pytest.raises(ApiError) as err:
        parse_multipart(body, ctype)
    assert err.value.status == 400 and "image" in err.value.detail
    with pytest.raises(ApiError):
        parse_multipart(b"junk", "multipart/form-data")


def test_source_resolution():
    assert resolve_source("h", "f", "1.2.3.4") == "h"
    assert resolve_source(None, "f", "1.2.3.4") == "f"
    assert resolve_source(None, None, "1.2.3.4") == "1.2.3.4"
    assert resolve_source("h", "f", "1.2.3.4", trust_client_value=False) == "1.2.3.4"
    for bad in ("", "has space", "x" * 257, "caf\u00e9"):
        with pytest.raises(ApiError) as err:
            resolve_source(bad, None, "1.2.3.4")
        assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        resolve_source(None, None, None)
    assert err.value.status == 400 and err.value.error == "missing_source"


def test_bearer_check():
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    for header, status in ((None, 401), ("Basic abc", 401), ("Bearer", 401), ("Bearer nope", 403)):
        with pytest.raises(ApiError) as err:
            check_bearer(header, "s3cret")
        assert err.value.status == status
    with pytest.raises(ApiError) as err:
        check_bearer("Bearer anything", None)
    assert err.value.status == 403 and err.value.error == "admin_disabled"


def test_decode_error_statuses():
    assert decode_error_status("unsupported image format ICO").status == 415
    assert decode_error_status("too many pixels: 1x2").status == 422
    assert decode_error_status("not a recognised image format").status == 422


# -- metrics -----------------------------------------------------------------------------


def test_metrics_render_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServiceMetrics()
    metrics.observe_request("classify", 200, 0.02)
    metrics.observe_request("classify", 422, 0.001)
    metrics.verdicts.labels(verdict="accepted").inc()
    text = metrics.render(blacklist_size=3, sources=5).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["twostream_blacklist_size"].samples[0].value == 3
    requests = {s.labels["status"]: s.value for s in families["twostream_requests"].samples
                if s.name == "twostream_requests_total"}
    assert requests == {"200": 1.0, "422": 1.0}
    assert "twostream_request_latency_seconds_bucket" in text
    # Registries are per instance: a second one starts from zero.
    assert "twostream_requests_total{" not in ServiceMetrics().render().decode()


# -- reputation store --------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_store_timestamps_strictly_increase_and_match_replay():
    clock = FakeClock()
    store = ReputationStore(ReputationConfig(), clock=clock)
    rng = random.Random(0)

    async def go():
        uploads, responses = [], []
        for k in range(60):
            ticket = store.reserve("s")
            image_id = f"img{k:03d}"
            rejected = rng.random() < 0.6
            verdict = "adversarial" if rejected else "cat"
            response, used = await store.commit(ticket, image_id, rejected, verdict)
            uploads.append(Upload("s", used.timestamp, image_id, rejected, verdict))
            responses.append(response)
        return uploads, responses

    uploads, responses = run(go())
    stamps = [u.timestamp for u in uploads]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))  # frozen clock, still increasing
    expected, ledger = replay(uploads)
    assert responses == expected
    assert store.ledger.get("s") == ledger.get("s")


def test_store_applies_in_arrival_order_whatever_the_completion_order():
    store = ReputationStore(ReputationConfig())
    rng = random.Random(1)

    async def one(ticket, k, rejected):
        await asyncio.sleep(rng.random() * 0.02)  # scoring finishes in random order
        image_id = f"i{k:03d}"
        response, used = await store.commit(ticket, image_id, rejected, "adversarial" if rejected else "dog")
        return Upload(used.source, used.timestamp, image_id, rejected, "adversarial" if rejected else "dog"), response

    async def go():
        tasks = []
        for k in range(80):
            source = f"src{k % 3}"
            tasks.append(one(store.reserve(source), k, rng.random() < 0.55))
        return await asyncio.gather(*tasks)

    pairs = run(go())
    uploads = [u for u, _ in pairs]
    expected, ledger = replay(uploads)
    assert [r for _, r in pairs] == expected  # no lost or reordered increments
    for source in ("src0", "src1", "src2"):
        assert store.ledger.get(source) == ledger.get(source)
    assert store.ledger.get("src0").images == 27


def test_store_cancel_and_timeout_do_not_stall_a_source():
    store = ReputationStore(ReputationConfig(), order_timeout_s=0.2)

    async def go():
        first = store.reserve("s")
        second = store.reserve("s")
        third = store.reserve("s")
        lost = store.reserve("s")  # never committed nor cancelled (its request died)
        fourth = store.reserve("s")
        await store.cancel(first)  # e.g. an undecodable image
        r2, _ = await store.commit(second, "b", True, "adversarial")
        r3, _ = await store.commit(third, "c", True, "adversarial")
        r4, _ = await asyncio.wait_for(store.commit(fourth, "e", True, "adversarial"), 5)
        del lost
        return r2, r3, r4

    r2, r3, r4 = run(go())
    assert (r2.cc, r3.cc, r4.cc) == (1, 2, 3) and r4.response == "blocked"
    assert store.ledger.get("s").images == 3


def test_store_reissues_tickets_of_a_previous_instance():
    old = ReputationStore(ReputationConfig())
    new = ReputationStore(ReputationConfig())
    ticket = old.reserve("s")
    response, used = run(new.commit(ticket, "a", True, "adversarial"))
    assert used.epoch == new.epoch and response.cc == 1


def test_store_reset_and_listing():
    store = ReputationStore(ReputationConfig(threshold=2))

    async def go():
        for source, flags in (("a", [1, 1]), ("b", [0]), ("c", [1, 1, 1])):
            for k, flag in enumerate(flags):
                await store.commit(store.reserve(source), f"{source}{k}", bool(flag), "x")

    run(go())
    assert store.counts() == (3, 2)
    total, rows = store.list(blacklisted=True)
    assert total == 2 and [s for s, _ in rows] == ["a", "c"]
    assert store.list(blacklisted=False)[0] == 1
    assert store.list(limit=1)[0] == 3 and len(store.list(limit=1)[1]) == 1
    previous = store.reset("a")
    assert previous.blacklisted and store.get("a") is None and store.reset("zzz") is None
    assert store.dirty


def test_store_snapshots_periodically_and_on_close_and_restores(tmp_path):
    uri = str(tmp_path / "state" / "reputation.snap")
    store = ReputationStore(ReputationConfig(), snapshot_uri=uri, period_s=0.05)

    async def go():
        store.start()
        for k in range(4):
            await store.commit(store.reserve("s"), f"i{k}", True, "adversarial")
        await asyncio.sleep(0.3)
        assert not store.dirty and store.last_snapshot_at is not None
        periodic = ReputationLedger.restore(open(uri, "rb").read())
        assert periodic.get("s").cc == 4 and periodic.get("s").blacklisted
        await store.commit(store.reserve("s"), "i9", False, "cat")  # after the last period
        store.period_s = 3600
        await store.close()

    run(go())
    restored = ReputationStore(ReputationConfig(), snapshot_uri=uri)
    assert restored.restored_from == uri
    assert restored.ledger.get("s") == store.ledger.get("s") and restored.ledger.get("s").cc == 3
    # New timestamps continue after the restored ones even with a clock that went backwards.
    restored.clock = FakeClock(1.0)
    assert restored.reserve("s").timestamp > store.ledger.get("s").last_seen


def test_store_snapshot_to_s3(moto_s3):
    uri = f"s3://{moto_s3}/serve/reputation.snap"
    store = ReputationStore(ReputationConfig(), snapshot_uri=uri)
    run(store.commit(store.reserve("s3src"), "a", True, "adversarial"))
    assert store.snapshot_sync()
    again = ReputationStore(ReputationConfig(), snapshot_uri=uri)
    assert again.ledger.get("s3src").cc == 1


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on loopback with a fresh bucket."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="snaps")
        yield "snaps"
    finally:
        server.stop()
