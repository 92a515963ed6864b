"""Shared fixtures and helpers (the offline assets, the local S3 server, Ray nodes), and the run order:
the ``own_process`` modules in child pytests beside the other tests, the ``timing`` tests last."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


# ---------------------------------------------------------------------------------------------
# Modules marked ``own_process`` run in a pytest process of their own. A Ray Data job driven from
# a process that has already connected to (and left) another Ray cluster gets its actors
# cancelled before they start ("The actor never ran"): Ray's process state does not reset.
#
# Their child pytests (one per module, its selected tests) run one after another in a background
# thread from the end of collection, beside this process's other tests: most of the suite leaves
# one of two cores idle (single-threaded tests, waits on servers), and these modules keep both busy.
# This process runs their tests after all others and reports each child's results test by test,
# waiting for them where needed. Tests marked ``timing`` (they assert a latency or a rate) run last,
# once no child runs beside them.
# ---------------------------------------------------------------------------------------------
CHILD_ENV = "TWOSTREAM_PYTEST_CHILD"
Results = dict[str, tuple[str, str, float]]


def _child_results(path: Path, junit: Path, output: str) -> Results:
    """A child's junit XML -> (outcome, text, seconds) by node id, and its output under ``__output__``."""
    import xml.etree.ElementTree as ET

    results: Results = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{path.relative_to(REPO).as_posix()}::{case.get('name')}"
            outcome, text = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    text = (node.get("message") or "") if tag == "skipped" else (node.text or node.get("message") or "")
            results[name] = (outcome, text, float(case.get("time") or 0.0))
    results["__output__"] = ("failed", output, 0.0)
    return results


class _Children(threading.Thread):
    """Runs each own-process module's child pytest in turn (modules in run order, with the node
    ids selected in each); ``results(path)`` waits for that module's."""

    def __init__(self, modules: dict[Path, list[str]]) -> None:
        super().__init__(name="own-process modules", daemon=True)
        self.modules = modules
        self._results: dict[Path, Results] = {}
        self._done = {path: threading.Event() for path in modules}
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        # The environment as collection ends: a test of this process that starts Ray changes its
        # os.environ for good (ray.init sets RAY_AUTH_MODE=token, among others), and a child
        # started later must not inherit that.
        self.env = {**os.environ, CHILD_ENV: "1"}

    def run(self) -> None:
        for path, nodeids in self.modules.items():
            if not self._stopping:
                self._results[path] = self._run(path, nodeids)
            self._done[path].set()

    def _run(self, path: Path, nodeids: list[str]) -> Results:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                 "--rootdir", str(REPO), *nodeids],
                cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )
            output, _ = self._proc.communicate()
            return _child_results(path, junit, output[-9000:])

    def results(self, path: Path) -> Results:
        self._done[path].wait()
        return self._results.get(path, {"__output__": ("failed", "not run: the session ended first", 0.0)})

    def stop(self) -> None:
        """At the session's end: interrupt a child still running (pytest tears its fixtures down)."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


_CHILDREN: _Children | None = None


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("own_process"):
        return 1
    return 2 if item.get_closest_marker("timing") else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(CHILD_ENV):
        items.sort(key=_rank)  # stable: modules stay whole and in their order


def pytest_collection_finish(session: pytest.Session) -> None:
    global _CHILDREN
    if os.environ.get(CHILD_ENV) or session.config.option.collectonly:
        return
    modules: dict[Path, list[str]] = {}
    for item in session.items:
        if item.get_closest_marker("own_process"):
            modules.setdefault(item.path, []).append(item.nodeid)
    if modules:
        _CHILDREN = _Children(modules)
        _CHILDREN.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _CHILDREN is not None:
        _CHILDREN.stop()


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if os.environ.get(CHILD_ENV) or item.get_closest_marker("own_process") is None or _CHILDREN is None:
        return None
    from _pytest.reports import TestReport

    results = _CHILDREN.results(item.path)
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
