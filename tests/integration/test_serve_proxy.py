"""``serve.http_proxy=ray``: Serve's Python proxy in front of the replicas (the default, HAProxy,
is what tests/integration/test_serve_app.py drives). The proxy hands the replica the client's address, so a
request without a source id is that address's; an X-Forwarded-For header the client sends names
nothing (``serve_cluster_env`` trusts it from no peer, where uvicorn would trust loopback)."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.integration.test_serve_app import classify, start_app, stop_app

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    app = start_app(tmp_path_factory.mktemp("serve-proxy"), ["serve.http_proxy=ray"])
    yield app
    stop_app(app)


def test_without_a_source_id_the_client_address_is_the_source(setup):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    base = setup["base"]
    answer = classify(base, buf.getvalue())
    assert answer.status_code == 200 and answer.json()["source"] == "127.0.0.1", answer.text
    answer = requests.post(base + "/v1/classify", data=buf.getvalue(), timeout=60,
                           headers={"Content-Type": "image/png", "X-Forwarded-For": "203.0.113.9"})
    assert answer.status_code == 200 and answer.json()["source"] == "127.0.0.1", answer.text
    assert classify(base, buf.getvalue(), "named").json()["source"] == "named"


def test_an_idle_keep_alive_connection_is_closed(setup):
    """``serve.keep_alive_s`` (5) reaches uvicorn (Serve's ``http_options.keep_alive_timeout_s``, its
    default 90): after an answer, an idle connection is closed by the server, well before 90 s."""
    import socket

    host, port = setup["base"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        sock.settimeout(60)
        rest = b""
        while chunk := sock.recv(65536):  # the rest of the answer, then the server's close
            rest += chunk
        assert b"HTTP/1.1" not in rest
