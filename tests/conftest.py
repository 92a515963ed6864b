"""Shared fixtures: where the offline assets are, and skipping cleanly without them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TWOSTREAM_ASSETS", REPO.parent / "shared" / "assets"))


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


# ---------------------------------------------------------------------------------------------
# Modules marked ``own_process`` run in a pytest process of their own. A Ray Data job driven from
# a process that has already connected to (and left) another Ray cluster gets its actors
# cancelled before they start ("The actor never ran"): Ray's process state does not reset. Each
# such module is run once, whole, in a child pytest; its results are reported here, test by test.
# ---------------------------------------------------------------------------------------------
CHILD_ENV = "TWOSTREAM_PYTEST_CHILD"
_CHILD_RESULTS: dict[str, dict[str, tuple[str, str, float]]] = {}


def _run_module_in_child(item: pytest.Item) -> dict[str, tuple[str, str, float]]:
    import subprocess
    import sys
    import tempfile
    import xml.etree.ElementTree as ET

    path = str(item.path)
    if path not in _CHILD_RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                 "--rootdir", str(REPO), path],
                cwd=REPO, env={**os.environ, CHILD_ENV: "1"}, capture_output=True, text=True,
            )
            results: dict[str, tuple[str, str, float]] = {}
            if junit.exists():
                for case in ET.parse(junit).getroot().iter("testcase"):
                    name = f"{item.path.relative_to(REPO).as_posix()}::{case.get('name')}"
                    outcome, text = "passed", ""
                    for tag in ("failure", "error", "skipped"):
                        node = case.find(tag)
                        if node is not None:
                            outcome = "skipped" if tag == "skipped" else "failed"
                            text = (node.get("message") or "") if tag == "skipped" else (node.text or node.get("message") or "")
                    results[name] = (outcome, text, float(case.get("time") or 0.0))
            results["__output__"] = ("failed", done.stdout[-6000:] + done.stderr[-3000:], 0.0)
            _CHILD_RESULTS[path] = results
    return _CHILD_RESULTS[path]


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if os.environ.get(CHILD_ENV) or item.get_closest_marker("own_process") is None:
        return None
    from _pytest.reports import TestReport

    results = _run_module_in_child(item)
    outcome, text, duration = results.get(
        item.nodeid, ("failed", "no result from the child pytest:\n" + results["__output__"][1], 0.0))
    keywords = {k: 1 for k in item.keywords}
    if outcome == "skipped":  # pytest reports a skip at setup, with (path, line, reason)
        phases = [("setup", "skipped", (str(item.path), 0, text.strip()), 0.0)]
    else:
        phases = [("setup", "passed", None, 0.0), ("call", outcome, text or None, duration)]
    phases.append(("teardown", "passed", None, 0.0))
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for when, result, longrepr, seconds in phases:
        report = TestReport(item.nodeid, item.location, keywords, result, longrepr, when, duration=seconds)
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
