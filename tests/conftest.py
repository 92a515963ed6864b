"""Shared fixtures and helpers (the offline assets, the local S3 server, Ray nodes). The run order (the
``own_process`` modules in child pytests beside the other tests, the ``timing`` tests last) is the
plugin ``plugins/own_process.py``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["plugins.own_process"]

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TWOSTREAM_ASSETS", REPO.parent / "shared" / "assets"))
DEMO_PHOTOS = sorted((REPO / "twostream" / "demo" / "data").glob("*.jpg"))  # shipped with the package
# The Ray batch-job tests' tiny random-weight streams (config overrides); each module adds its own
# p2 threshold, reputation and sharding settings where it defines its list.
SMALL_JOB = [
    "high.model=mobilenetv3_small_050", "high.weights=random", "high.batch_size=8",
    "low.model=cifar_resnet20", "low.weights=random", "low.batch_size=16", "thresholds.p1=0.0",
]


def demo_photo(k: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """Shipped demo photograph ``k`` as RGB ``uint8``, resized to ``size`` (width, height)."""
    from PIL import Image

    with Image.open(DEMO_PHOTOS[k]) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))


def texture_run(n: int) -> list[np.ndarray]:
    """A query run that only the query detector's rule 3 catches (tests/core/test_query_detector.py):
    an attacker who shapes its changes so that no pair rule calls them a match: fresh noise of
    +-8 on the textured third of a 96x96 image only, which is not noise-like (the flat half of
    the windows does not change, ratio 0.05 / (mean + 0.05) < 0.85, and a third of the values
    change, > 20%). Every query is within 16 of every earlier one: query k has k near-duplicates
    and no match."""
    rng = np.random.default_rng(5)
    x0 = np.full((96, 96, 3), 128, np.int16)
    x0[:, 64:] = rng.integers(40, 216, size=(96, 32, 3))
    run = []
    for _ in range(n):
        x = x0.copy()
        x[:, 64:] += rng.integers(-8, 9, size=(96, 32, 3))
        run.append(x.astype(np.uint8))
    return run


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` (RGB ``uint8``) as a lossless PNG file's bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def embedded_redis(tmp_path_factory):
    """A real redis-server of this module (``appendfsync always``, so a restart keeps every write)."""
    from twostream.online.redis_server import EmbeddedRedis

    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="always")
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """``../shared/assets`` (or $TWOSTREAM_ASSETS); tests using it skip when it is absent."""
    if not ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {ASSETS} (set TWOSTREAM_ASSETS)")
    return ASSETS



@contextmanager
def local_s3_env(bucket: str) -> Iterator:
    """The local S3 server, this process's environment pointed at it (and restored after), and one
    bucket: ``with local_s3_env("b") as store: ...``."""
    from twostream import storage
    from twostream.storage.local_s3 import LocalStore, create_bucket

    def forget_clients() -> None:
        storage._s3_filesystem.cache_clear()
        storage._s3_client.cache_clear()

    with LocalStore() as store:
        old = {k: os.environ.get(k) for k in store.env}
        os.environ.update(store.env)
        forget_clients()
        try:
            create_bucket(bucket, store.endpoint)
            yield store
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            forget_clients()

@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a small shared CI box, 2+ OpenMP threads competing with other processes make each forward
    pass 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Wait until ``base``/healthz answers 200; raise with the end of ``log`` when ``proc`` exits
    or ``timeout_s`` passes first."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"twostream serve did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def ray_start_node(args: list[str], temp_dir: str, env: dict, ip: str = "127.0.0.1") -> None:
    """``ray start`` with its own free port for every service (nothing left by another test can
    hold a default port: the dashboard agent then never registers and ``ray job submit`` answers
    "No available agent"), and wait until that node's dashboard agent listens."""
    from twostream.storage.local_s3 import free_port

    agent = free_port()
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": agent, "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", *args, "--node-ip-address", ip,
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection((ip, agent), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the dashboard agent of the node at {ip} never listened on {agent}")
            time.sleep(0.5)


def kill_ray_node(temp_dir: str) -> int:
    """SIGKILL every process of the Ray node started with ``--temp-dir temp_dir`` (it is in all their
    command lines, as a whole path or a path's folder); returns how many. Never ``ray stop``: it
    stops every Ray on the machine, other tests' too."""
    pattern = re.compile(re.escape(os.fsencode(temp_dir)) + rb"(/|\0|$)")  # not /tmp/ray1 for /tmp/ray10
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if pattern.search((entry / "cmdline").read_bytes()):
                    pids.append(int(entry.name))
            except OSError:
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)
