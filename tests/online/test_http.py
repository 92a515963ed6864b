"""The online service's Ray-free parts: config, request checks and limits (the streaming
multipart reader, the body deadline), metrics. The Redis store: tests/online/test_redis_store.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from twostream.core.config import ConfigError, ServeSettings, TwoStreamConfig, load_config
from twostream.online.http import (
    ApiError,
    check_bearer,
    check_content_length,
    check_source_id,
    decode_error_status,
    media_kind,
    parse_multipart,
    read_limited,
    read_upload,
    resolve_source,
)
from twostream.online.metrics import ServiceMetrics


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

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / "serve.yaml").read_text())
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


SETTINGS = ServeSettings()


def parse(body: bytes, ctype: str, settings: ServeSettings = SETTINGS):
    return run(parse_multipart(body, ctype, settings))


def test_multipart_parsing_keeps_binary_bytes():
    payload = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n"
    body, ctype = _form({"source": (None, b"cam-7"), "image": ("x.png", payload)})
    image, fields = parse(body, ctype)
    assert image == payload and fields == {"source": "cam-7"}
    body, ctype = _form({"file": ("x.bin", b"abc")})
    assert parse(body, ctype)[0] == b"abc"
    body, ctype = _form({"other": ("o.bin", b"skipped"), "image": ("x.png", b"kept")})
    assert parse(body, ctype) == (b"kept", {})
    body, ctype = _form({"source": (None, b"s")})
    with pytest.raises(ApiError) as err:
        parse(body, ctype)
    assert err.value.status == 400 and "image" in err.value.detail
    with pytest.raises(ApiError):
        parse(b"junk", "multipart/form-data")
    with pytest.raises(ApiError) as err:  # cut off before the closing boundary
        parse(body[:-10], ctype)
    assert err.value.status == 400 and "closing boundary" in err.value.detail


@pytest.mark.timing
def test_multipart_limits_refuse_early():
    many = {f"f{k}": (None, b"x") for k in range(300_000)}
    body, ctype = _form({"image": ("x.png", b"img"), **many})
    started = time.perf_counter()
    with pytest.raises(ApiError) as err:
        parse(body, ctype)
    assert err.value.error == "too_many_parts" and time.perf_counter() - started < 0.5
    body, ctype = _form({"image": ("x.png", b"img"), "source": (None, b"s" * 5000)})
    with pytest.raises(ApiError) as err:
        parse(body, ctype)
    assert err.value.error == "field_too_large"
    long_name = "n" * 5000
    body, ctype = _form({long_name: ("x.png", b"img")})
    with pytest.raises(ApiError) as err:  # python-multipart's header-line limit
        parse(body, ctype)
    assert err.value.status == 400 and "header" in err.value.detail.lower()
    with pytest.raises(ApiError) as err:  # within a larger limit it parses: no 'image' part then
        parse(body, ctype, ServeSettings(max_part_header_bytes=8192))
    assert err.value.error == "missing_image"


@pytest.mark.timing
def test_read_upload_deadline_and_streamed_limits():
    settings = ServeSettings(body_timeout_s=0.3, max_body_bytes=1000)

    async def slow():
        while True:
            await asyncio.sleep(0.05)
            yield b"x"

    async def chunks(parts):
        for part in parts:
            yield part

    started = time.perf_counter()
    with pytest.raises(ApiError) as err:
        run(read_upload({"content-type": "image/png"}, slow(), "1.2.3.4", settings))
    assert err.value.status == 408 and time.perf_counter() - started < 1.0
    with pytest.raises(ApiError) as err:
        run(read_upload({"content-type": "image/png"}, chunks([b"x" * 600] * 2), "1.2.3.4", settings))
    assert err.value.status == 413
    body, ctype = _form({"source": (None, b"cam"), "image": ("x.png", b"abc")})
    halves = [body[:7], body[7:]]
    assert run(read_upload({"content-type": ctype}, chunks(halves), "1.2.3.4", settings)) == (b"abc", "cam")


def test_lookup_source_ids_take_any_text():
    for ok in ("a/b", "100%", "has space", "caf\u00e9 \u2603", "x" * 256):
        assert check_source_id(ok) == ok
    for bad in ("", "x" * 257):
        with pytest.raises(ApiError) as err:
            check_source_id(bad)
        assert err.value.status == 400


def test_source_resolution():
    assert resolve_source("h", "h", "1.2.3.4") == "h"  # header and field disagreeing: a 400 (issue 29)
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
    metrics.inc("twostream_verdicts", verdict="accepted")
    text = metrics.render(blacklist_size=3, sources=5).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["twostream_blacklist_size"].samples[0].value == 3
    requests = {s.labels["status"]: s.value for s in families["twostream_requests"].samples
                if s.name == "twostream_requests_total"}
    assert requests == {"200": 1.0, "422": 1.0}
    assert "twostream_request_latency_seconds_bucket" in text
    # Registries are per instance: a second one starts from zero.
    assert "twostream_requests_total{" not in ServiceMetrics().render().decode()




# -- fused models ----------------------------------------------------------------------------


def test_fused_models_run_both_streams_at_once_and_equal_the_scorer():
    """The fused replica's model work (low stream in its own thread) gives the rows the
    library's sequential Scorer gives, an undecodable upload keeping its row and reason."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from twostream.core.scoring import Scorer
    from twostream.online.models import FusedModels

    torch.manual_seed(0)
    cfg = load_config(None, ["high.model=mobilenetv3_small_050", "high.weights=random",
                             "low.model=cifar_resnet20", "low.weights=random",
                             "thresholds.p1=0.0", "thresholds.p2=0.0"])
    models = FusedModels(cfg)
    rng = np.random.default_rng(3)
    uploads = []
    for k in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + k, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        uploads.append(buf.getvalue())
    uploads.insert(2, b"not an image")
    ids = [f"u{k}" for k in range(len(uploads))]
    got = models.score(list(zip(uploads, ids)))
    reference = Scorer(cfg, high=models.high.stream, low=models.low.stream).score(uploads, ids)
    assert [s.row for s in got] == list(range(len(uploads)))
    batch = got[0].batch
    assert list(batch.image_id) == ids and batch.error[2] is not None and batch.error[2] == reference.error[2]
    np.testing.assert_array_equal(batch.high_idx, reference.high_idx)
    np.testing.assert_array_equal(batch.low_idx, reference.low_idx)
    np.testing.assert_allclose(batch.low_prob, reference.low_prob, rtol=1e-6)
    assert list(batch.verdict) == list(reference.verdict) and list(batch.label) == list(reference.label)
    assert {"decode", "high_model", "low_model", "compare"} <= set(got[0].timings_ms)
