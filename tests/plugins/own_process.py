"""The suite's run order, on pytest's public hooks: modules marked ``own_process`` run in child
pytests beside this process's other tests, and tests marked ``timing`` run last.

A Ray Data job driven from a process that has already connected to (and left) another Ray cluster
gets its actors cancelled before they start ("The actor never ran"): Ray's process state does not
reset. So each ``own_process`` module (its selected tests) runs in a pytest process of its own; the
children run one after another in a background thread from the end of collection, beside this
process's other tests: most of the suite leaves one of two cores idle (single-threaded tests,
waits on servers), and these modules keep both busy. In this process each such test is replaced
by an :class:`OwnProcessItem` of the same node id, run after all the others, that reports its
child's outcome (waiting for it where needed). Tests marked ``timing`` (they assert a latency or a
rate) run last, once no child runs beside them.

pytest-xdist does not serve here: its workers are reused across modules (a Ray-connected worker
would take the next ``own_process`` module), and it cannot hold the ``timing`` tests until every
other process is idle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import pytest

CHILD_ENV = "TWOSTREAM_PYTEST_CHILD"  # set in a child: the file its test reports are written to


class ChildResult(NamedTuple):
    """One test's outcome in a child pytest: ``passed``, ``failed`` or ``skipped``, the failure
    text (a skip's: JSON ``[path, line, reason]``), and the seconds its phases took."""

    outcome: str
    text: str
    seconds: float


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("own_process"):
        return 1
    return 2 if item.get_closest_marker("timing") else 0


def _read_results(path: Path) -> dict[str, ChildResult]:
    """A child's report lines (one per test phase) -> one result per node id: failed if any phase
    failed, skipped if one was skipped, passed otherwise."""
    results: dict[str, ChildResult] = {}
    if not path.exists():
        return results
    for line in path.read_text(encoding="utf-8").splitlines():
        phase = json.loads(line)
        before = results.get(phase["nodeid"], ChildResult("passed", "", 0.0))
        outcome, text = before.outcome, before.text
        if phase["outcome"] == "failed":
            outcome, text = "failed", "\n".join(t for t in (text, f"[{phase['when']}] {phase['text']}") if t)
        elif phase["outcome"] == "skipped" and outcome == "passed":  # text: JSON [path, line, reason]
            outcome, text = "skipped", phase["text"]
        results[phase["nodeid"]] = ChildResult(outcome, text, before.seconds + phase["duration"])
    return results


class Children(threading.Thread):
    """Runs each own-process module's child pytest in turn (modules in run order, with the node ids
    selected in each); ``result(path, nodeid)`` waits for that module's."""

    def __init__(self, root: Path, modules: dict[Path, list[str]]) -> None:
        super().__init__(name="own-process modules", daemon=True)
        self.root = root
        self.modules = modules
        self._results: dict[Path, tuple[dict[str, ChildResult], str]] = {}
        self._done = {path: threading.Event() for path in modules}
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        # The environment as collection ends: a test of this process that starts Ray changes its
        # os.environ for good (ray.init sets RAY_AUTH_MODE=token, among others), and a child
        # started later must not inherit that.
        self.env = dict(os.environ)

    def run(self) -> None:
        for path, nodeids in self.modules.items():
            if not self._stopping:
                self._results[path] = self._run(nodeids)
            self._done[path].set()

    def _run(self, nodeids: list[str]) -> tuple[dict[str, ChildResult], str]:
        with tempfile.TemporaryDirectory() as tmp:
            reports = Path(tmp) / "reports.jsonl"
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(self.root),
                 *nodeids],
                cwd=self.root, env={**self.env, CHILD_ENV: str(reports)}, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
            output, _ = self._proc.communicate()
            return _read_results(reports), output[-9000:]

    def result(self, path: Path, nodeid: str) -> ChildResult:
        self._done[path].wait()
        results, output = self._results.get(path, ({}, "not run: the session ended first"))
        return results.get(nodeid, ChildResult("failed", "no result from the child pytest:\n" + output, 0.0))

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


class ChildFailed(Exception):
    """A test failed in its child pytest; the message is the child's report."""


class OwnProcessItem(pytest.Item):
    """Stands, in this process, for a test that a child pytest runs: no fixtures, the child's outcome."""

    def __init__(self, *, info: tuple, **kwargs) -> None:
        super().__init__(**kwargs)
        self._info = info
        self.result = ChildResult("failed", "not run", 0.0)

    def runtest(self) -> None:
        self.result = self.config.stash[CHILDREN].result(self.path, self.nodeid)
        if self.result.outcome == "skipped":
            pytest.skip(json.loads(self.result.text)[2])
        if self.result.outcome == "failed":
            raise ChildFailed(self.result.text)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):
        if isinstance(excinfo.value, ChildFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple:
        return self._info


CHILDREN = pytest.StashKey[Children]()


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have chosen the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(CHILD_ENV):
        return
    items.sort(key=_rank)  # stable: modules stay whole and in their order
    if config.getoption("collectonly"):
        return
    modules: dict[Path, list[str]] = {}
    for i, item in enumerate(items):
        if item.get_closest_marker("own_process"):
            modules.setdefault(item.path, []).append(item.nodeid)
            items[i] = OwnProcessItem.from_parent(item.parent, name=item.name, info=item.reportinfo())
    if modules:
        config.stash[CHILDREN] = Children(config.rootpath, modules)


def pytest_collection_finish(session: pytest.Session) -> None:
    children = session.config.stash.get(CHILDREN, None)
    if children is not None:
        children.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if isinstance(item, OwnProcessItem) and report.when == "call":
        report.duration = item.result.seconds  # the child's time for --durations, not the wait
        if report.skipped:  # where the child skipped, not this file
            report.longrepr = tuple(json.loads(item.result.text))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In a child: each phase's report, one JSON line, for the parent to read."""
    path = os.environ.get(CHILD_ENV)
    if not path:
        return
    if report.skipped:  # (path, line, reason); an expected failure (xfail) reports as a skip
        where = report.longrepr if isinstance(report.longrepr, tuple) else (
            report.location[0], report.location[1] or 0, f"xfail: {getattr(report, 'wasxfail', '')}")
        text = json.dumps(list(where))
    else:
        text = report.longreprtext
    record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "text": text,
              "duration": report.duration}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def pytest_sessionfinish(session: pytest.Session) -> None:
    children = session.config.stash.get(CHILDREN, None)
    if children is not None:
        children.stop()
