"""The audit over a log file with ``reputation.group_by_prefix``: the replay and ``sources.parquet``
per network, the timeline with the ids as logged. Expectations worked out by hand (SPEC 3:
+1 rejected, -1 accepted, listed at CC >= 3, released at CC 0)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostream.audit.run import run_audit
from twostream.core.config import load_config

T = 1_700_000_000
R, A = "adversarial", "accepted"
# (seconds after T, source as logged, image id, verdict)
LOG = [
    (0, "10.0.0.1", "g-0", R),
    (1, "10.0.0.2", "g-1", R),
    (2, "::ffff:10.0.0.3", "g-2", R),  # IPv4-mapped: the same /24
    (3, "10.0.0.9", "g-3", A),
    (4, "alice", "g-4", R),
    (5, "2001:db8:0:7::1", "g-5", R),
    (6, "2001:db8:0:7:ffff::2", "g-6", R),  # same /64
    (7, "2001:db8:0:8::1", "g-7", R),  # next /64
]


@pytest.fixture()
def log_and_scores(tmp_path: Path) -> tuple[Path, Path]:
    pq.write_table(pa.table({"image_id": [i for _, _, i, _ in LOG], "verdict": [v for *_, v in LOG],
                             "label": ["cat" if v == A else None for *_, v in LOG]}), tmp_path / "scores.parquet")
    lines = ["time,client_ip,request_uri,user_agent"]
    lines += [f"{T + t},{s},/uploads/{i}.png,ua" for t, s, i, _ in reversed(LOG)]  # the audit must sort
    (tmp_path / "uploads.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "uploads.csv", tmp_path / "scores.parquet"


def _run(tmp_path: Path, log: Path, scores: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    out = tmp_path / f"out{len(overrides)}"
    result = run_audit(str(log), str(out), scores_uri=str(scores),
                       config=load_config(None, ["audit.report=false", *overrides]))
    timeline = sorted(pq.read_table(out / "timeline.parquet").to_pylist(), key=lambda r: r["timestamp"])
    return {r["source"]: r for r in result.sources.to_pylist()}, timeline


def test_grouped_by_network(tmp_path: Path, log_and_scores) -> None:
    sources, timeline = _run(tmp_path, *log_and_scores, ["reputation.group_by_prefix={ipv4: 24, ipv6: 64}"])
    assert [r["source"] for r in timeline] == [s for _, s, _, _ in LOG]  # as logged
    # 10.0.0.0/24: CC 1 2 3 (listed at T+2) 2 (still listed); alice: 1; 2001:db8:0:7::/64: 1 2; :8::/64: 1
    assert [r["cc"] for r in timeline] == [1, 2, 3, 2, 1, 1, 2, 1]
    assert [r["response"] for r in timeline] == [R, R, "blocked", "blocked", R, R, R, R]
    assert set(sources) == {"10.0.0.0/24", "alice", "2001:db8:0:7::/64", "2001:db8:0:8::/64"}
    net = sources["10.0.0.0/24"]
    assert (net["uploads"], net["rejected"], net["blocked"], net["cc"], net["blacklisted"]) == (4, 3, 2, 2, True)
    assert [(iv["start"], iv["end"]) for iv in net["blacklist_intervals"]] == [(T + 2, None)]
    assert sources["2001:db8:0:7::/64"]["uploads"] == 2 and sources["2001:db8:0:7::/64"]["cc"] == 2


def test_off_by_default_every_id_its_own(tmp_path: Path, log_and_scores) -> None:
    sources, timeline = _run(tmp_path, *log_and_scores, [])
    assert set(sources) == {s for _, s, _, _ in LOG}
    assert [r["cc"] for r in timeline] == [1, 1, 1, 0, 1, 1, 1, 1]
    assert "blocked" not in [r["response"] for r in timeline]
