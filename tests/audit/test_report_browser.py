"""The audit's report.html renders in headless Chromium: a screenshot that is not blank, and a
DOM with the sources table rows, the bad-lines table and the embedded PNG plots.

Chromium comes from Debian's packages (``apt-get install -y chromium``, done by .ci/run);
the test skips with a reason when it is absent.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.audit.test_run import EXPECTED, _cfg, _write_csv_log, _write_scores
from twostream.audit.run import run_audit

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
SCREENSHOT_COPY = os.environ.get("TWOSTREAM_AUDIT_SCREENSHOT")  # also save the screenshot here


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("audit_report")
    _write_scores(tmp / "scores.parquet")
    _write_csv_log(tmp / "uploads.csv")
    run_audit(str(tmp / "uploads.csv"), str(tmp / "out"), scores_uri=str(tmp / "scores.parquet"),
              config=_cfg(what_if=["threshold=1", "threshold=5", "threshold=4,cap=4"], clean_rate=0.3))
    return tmp / "out" / "report.html"


def test_report_dom_has_tables_and_png_plots(report: Path) -> None:
    proc = _chromium(report.parent, "--dump-dom", report.as_uri())
    dom = proc.stdout
    assert "<table" in dom, proc.stderr[-2000:]
    # every source is a row of the suspicious-sources table
    table = re.search(r'<table id="sources">(.*?)</table>', dom, re.S).group(1)
    assert len(re.findall(r"<tr", table)) == 1 + len(EXPECTED)
    for source in EXPECTED:
        assert f"<td>{source}</td>" in table
    assert 'class="bl"' in table and 'class="rel"' in table
    assert re.search(r'<table id="bad-lines">.*unparseable timestamp.*</table>', dom, re.S)
    assert re.search(r'<table id="what-if">.*threshold=4,cap=4.*</table>', dom, re.S)
    # the plots are PNGs inside the page: one CC plot per source, the rate plot, the what-if plot
    pngs = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(pngs) == len(EXPECTED) + 2
    for data in pngs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'id="rate-plot"' in dom and 'id="cc-plots"' in dom


def screenshot(report: Path, height: int, keep: str | None) -> tuple[np.ndarray, int, int]:
    """Chromium's 1280 x ``height`` screenshot of ``report`` (copied to ``keep`` when set), checked
    not blank: many distinct colours, 3-70% non-white. Returns its pixels (N x 3) and how many are
    the plots' blue (CC lines, bars) and red (thresholds, rejection rates)."""
    shot = report.parent / "report.png"
    proc = _chromium(report.parent, f"--screenshot={shot}", f"--window-size=1280,{height}", report.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert image.shape[:2] == (height, 1280)
    if keep:
        shutil.copyfile(shot, keep)
    flat = image.reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 200
    assert 0.3 < (flat > 245).all(axis=1).mean() < 0.97
    blue = ((flat[:, 2] > 120) & (flat[:, 0] < 80) & (flat[:, 1] < 120)).sum()
    red = ((flat[:, 0] > 200) & (flat[:, 1] < 110) & (flat[:, 2] < 110)).sum()
    return flat, int(blue), int(red)


def test_report_screenshot_is_not_blank(report: Path) -> None:
    _, blue, red = screenshot(report, 2000, SCREENSHOT_COPY)
    assert blue > 500 and red > 200
