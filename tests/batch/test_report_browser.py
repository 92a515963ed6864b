"""The batch run's report.html renders in headless Chromium: the DOM Chromium builds holds the
tables with the values computed from the output's Parquet files and the embedded PNG plots, and a
screenshot that is not blank.

Chromium comes from Debian's packages (``apt-get install -y chromium``); the test skips with a
reason when it is absent. ``TWOSTREAM_BATCH_SCREENSHOT=docs/img/batch-report.png`` keeps the
screenshot (the README shows it).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.audit.test_report_browser import CHROMIUM, _chromium, screenshot
from tests.batch.test_report import check_tables, expected, write_run
from twostream.batch.report import write_batch_report

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
SCREENSHOT_COPY = os.environ.get("TWOSTREAM_BATCH_SCREENSHOT")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = write_run(tmp_path_factory.mktemp("batch_report_browser") / "run")
    return Path(write_batch_report(str(out)))


def test_dom_has_the_tables_and_png_plots(report: Path) -> None:
    proc = _chromium(report.parent, "--dump-dom", report.as_uri())
    dom = proc.stdout
    assert "<table" in dom, proc.stderr[-2000:]
    exp = expected(report.parent)
    check_tables(dom, exp)
    # one CC plot per source ever blacklisted, then the rate, responses and throughput plots
    cc = re.search(r'<div class="grid" id="cc-plots">(.*?)</div>', dom, re.S).group(1)
    assert len(re.findall(r"<img", cc)) == len(exp["ever"])
    for name in ("rate-plot", "responses-plot", "throughput-plot"):
        assert f'id="{name}"' in dom
    pngs = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(pngs) == len(exp["ever"]) + 3
    for data in pngs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_screenshot_is_not_blank(report: Path) -> None:
    flat, blue, red = screenshot(report, 2200, SCREENSHOT_COPY)
    # the red table rows' pink, besides the plots' blue and red
    pink = ((flat[:, 0] > 245) & (np.abs(flat[:, 1].astype(int) - 232) < 4) & (np.abs(flat[:, 2].astype(int) - 232) < 4)).sum()
    assert blue > 500 and red > 200 and pink > 500
