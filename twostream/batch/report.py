"""The batch run's report: ``report.html`` in the job's output, one self-contained file drawn with
:mod:`twostream.reporting` (the audit's report machinery).

:func:`write_batch_report` builds it from the output folder alone (``images/``, ``sources/``,
``summary.json``), so it can be rebuilt for any finished run. Sections: headline counts; counts
by verdict and by response; errors by reason (the ``error`` column); the sources ever
blacklisted, each with its CC over time; the rejection rate over time; per-stage throughput;
the ground truth when the summary has a ``ground_truth`` section (the manifest named roles); the
config. ``images/`` is read a file at a time (counts, time bins and the plotted sources' rows
only), so memory does not grow with the run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.core.labels import Refusal, Verdict
from twostream.reporting import (
    RateBins,
    SourceSeries,
    bar_plot,
    cc_plot,
    esc,
    fmt_time,
    img,
    kpis,
    page,
    rate_plot,
    table,
)

REPORT = "report.html"
IMAGE_COLUMNS = ["image_id", "source", "timestamp", "verdict", "response", "error", "cc", "query_matches"]
QUERY_ATTACKS_SHOWN = 200  # query attacks listed (the earliest; all are in images/)
ERROR_REASONS_SHOWN = 30  # distinct error texts listed (the rest summed in one row)
LISTED_ROWS = 500  # sources ever blacklisted listed in the report's table (all are in sources/)


@dataclass
class _Tally:
    """What one pass over ``images/`` collects."""

    rates: RateBins
    plotted: set[str]
    verdicts: Counter = field(default_factory=Counter)
    responses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    rows: list[pa.Table] = field(default_factory=list)  # the plotted sources' scored rows
    query_attacks: pa.Table | None = None  # the earliest QUERY_ATTACKS_SHOWN detections

    def add(self, part: pa.Table) -> None:
        self.verdicts.update(_counts(part.column("verdict")))
        self.responses.update(_counts(part.column("response")))
        self.errors.update(_counts(part.column("error")))
        verdict = part.column("verdict").to_numpy(zero_copy_only=False).astype(str)
        scored = verdict != str(Verdict.ERROR)
        self.rates.add(part.column("timestamp").to_numpy(zero_copy_only=False), scored,
                       (verdict == str(Verdict.ADVERSARIAL)) | (verdict == str(Verdict.QUERY_ATTACK)),
                       part.column("response").to_numpy(zero_copy_only=False).astype(str))
        mine = part.filter(pc.and_(pc.is_in(part.column("source"), pa.array(sorted(self.plotted), pa.string())),
                                   pc.is_valid(part.column("cc"))))
        if mine.num_rows:
            self.rows.append(mine.select(["source", "timestamp", "image_id", "cc"]))
        found = part.filter(pc.equal(part.column("verdict"), str(Verdict.QUERY_ATTACK)))
        if found.num_rows and "query_matches" in found.column_names:
            found = found.select(["timestamp", "image_id", "source", "response", "query_matches"])
            merged = found if self.query_attacks is None else pa.concat_tables([self.query_attacks, found])
            self.query_attacks = merged.sort_by([("timestamp", "ascending"), ("image_id", "ascending")]).slice(
                0, QUERY_ATTACKS_SHOWN)


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Non-null value -> count."""
    return {v["values"]: v["counts"] for v in pc.value_counts(column.drop_null()).to_pylist()}


def report_uri(output: str) -> str:
    return storage.join(output, REPORT)


def write_batch_report(output_uri: str, top: int = 12, listed_rows: int = LISTED_ROWS) -> str:
    """Build ``report.html`` from a finished run's output folder; returns its URI.

    ``top``: how many of the sources ever blacklisted get a CC plot; ``listed_rows``: how many
    of them the table lists (all are in ``sources/``). Memory follows one output file at a time
    and ``listed_rows``, not the number of images or sources.
    """
    summary = json.loads(storage.read_bytes(storage.join(output_uri, "summary.json")))
    ever = _EverBlacklisted(listed_rows)
    for uri in storage.list_files(storage.join(output_uri, "sources"), (".parquet",)):
        ever.add(storage.read_parquet(uri))
    listed = ever.rows()
    tally = _Tally(RateBins.over(ever.first, ever.last), {r["source"] for r in listed[:top]})
    for uri in storage.list_files(storage.join(output_uri, "images"), (".parquet",)):
        part = storage.read_parquet(uri)  # an older run's images/ has no query_matches
        tally.add(part.select([c for c in IMAGE_COLUMNS if c in part.column_names]))
    html = render(summary, tally, listed, ever.count, top)
    uri = report_uri(output_uri)
    storage.write_bytes(uri, html.encode())
    return uri


class _EverBlacklisted:
    """One pass over ``sources/``: the run's first and last scored image, how many sources were
    blacklisted at some point, and the first ``limit`` of them: listed at the end first, then by
    rejected images, then by source id."""

    ORDER = [("blacklisted", "descending"), ("rejected", "descending"), ("source", "ascending")]

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.first, self.last = np.inf, -np.inf
        self.best: pa.Table | None = None

    def add(self, sources: pa.Table) -> None:
        first, last = pc.min(sources.column("first_seen")).as_py(), pc.max(sources.column("last_seen")).as_py()
        if first is not None:
            self.first, self.last = min(self.first, first), max(self.last, last)
        ever = sources.filter(pc.greater(sources.column("times_blacklisted"), 0))
        self.count += ever.num_rows
        merged = ever if self.best is None else pa.concat_tables([self.best, ever])
        self.best = merged.sort_by(self.ORDER).slice(0, self.limit)

    def rows(self) -> list[dict[str, Any]]:
        return [] if self.best is None else self.best.to_pylist()


def _series(tally: _Tally, listed: list[dict[str, Any]], top: int, threshold: int) -> list[SourceSeries]:
    """Each plotted source's CC after each of its scored images, in (timestamp, image_id) order."""
    rows = pa.concat_tables(tally.rows).sort_by([("source", "ascending"), ("timestamp", "ascending"),
                                                   ("image_id", "ascending")]) if tally.rows else None
    out = []
    for r in listed[:top]:
        mine = rows.filter(pc.equal(rows.column("source"), r["source"])) if rows is not None else None
        ts = mine.column("timestamp").to_numpy() if mine is not None else np.zeros(0)
        cc = mine.column("cc").to_numpy() if mine is not None else np.zeros(0)
        intervals = [[iv["joined"], iv["left"]] for iv in r["blacklist_intervals"]]
        out.append(SourceSeries(r["source"], ts, cc, intervals, threshold))
    return out


def render(summary: dict[str, Any], tally: _Tally, listed: list[dict[str, Any]], ever: int, top: int) -> str:
    """The whole report as one HTML string."""
    config = summary.get("config", {})
    rep = config.get("reputation", {})
    cap = int(rep.get("cap", 15))
    parts = _header(summary, tally, ever)
    if summary.get("ground_truth"):
        parts += _ground_truth_section(summary["ground_truth"])
    parts += _counts_section(tally)
    parts += _errors_section(tally.errors)
    parts += _query_attacks_section(tally, summary.get("detector") or {})
    parts += _blacklisted_section(listed, ever, _series(tally, listed, top, int(rep.get("threshold", 3))), cap)
    parts += ["<h2>Rejection rate over time</h2>", img(rate_plot(tally.rates, "images"), "rejection rate over time",
                                                       "rate-plot")]
    parts += _throughput_section(summary)
    parts += _config_section(config)
    versions = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
    parts.append(f"<p class=muted>twostream batch scoring &middot; {esc(versions)}</p>")
    return page("twostream batch run", parts)


def _header(s: dict[str, Any], tally: _Tally, ever: int) -> list[str]:
    t = s.get("config", {}).get("thresholds", {})
    r = s.get("config", {}).get("reputation", {})
    v = tally.verdicts
    return [
        "<h1>Batch scoring run</h1>",
        f'<p class=muted>input <code>{esc(s.get("input"))}</code> &middot; manifest '
        f'<code>{esc(s.get("manifest") or "-")}</code> &middot; output <code>{esc(s.get("output"))}</code><br>'
        f'p1={esc(t.get("p1"))}, p2={esc(t.get("p2"))}, blacklist threshold {esc(r.get("threshold"))}, '
        f'cap {esc(r.get("cap"))} &middot; {fmt_time(tally.rates.edges[0])} \u2192 {fmt_time(tally.rates.edges[-1])}'
        "</p>",
        kpis([("images", sum(v.values())), ("accepted", v[str(Verdict.ACCEPTED)]),
              ("adversarial", v[str(Verdict.ADVERSARIAL)]), ("query attacks", v[str(Verdict.QUERY_ATTACK)]),
              ("errors", v[str(Verdict.ERROR)]),
              ("blocked", tally.responses[str(Refusal.BLOCKED)]), ("sources", s.get("sources", 0)),
              ("ever blacklisted", ever), ("blacklisted at the end", s.get("blacklisted_sources", 0))]),
    ]


def _counts_section(tally: _Tally) -> list[str]:
    total = sum(tally.verdicts.values()) or 1
    verdicts = [[str(v), tally.verdicts[str(v)], f"{tally.verdicts[str(v)] / total:.1%}"] for v in Verdict]
    responses = sorted(tally.responses.items(), key=lambda kv: (-kv[1], kv[0]))
    return [
        "<h2>Counts by verdict and response</h2>",
        "<p class=muted>Verdict: Algorithm 1 on the image alone. Refusal: what the source was answered "
        "(Algorithm 2): a label, <code>adversarial</code>, <code>query_attack</code> (the query detector matched "
        "it to earlier near-identical uploads), <code>blocked</code> (the source was blacklisted) "
        "or <code>error</code>.</p>",
        '<div class=grid><div>',
        table(["verdict", "images", "share"], verdicts, numeric={1, 2}, table_id="verdicts"),
        table(["response", "images"], [list(kv) for kv in responses], numeric={1}, table_id="responses"),
        "</div><div>",
        img(bar_plot([k for k, _ in responses], {"images": [n for _, n in responses]}, "Images by response"),
            "images by response", "responses-plot"),
        "</div></div>",
    ]


def _errors_section(errors: Counter) -> list[str]:
    if not errors:
        return ["<h2>Errors by reason</h2>", "<p id=no-errors>None: every input was scored.</p>"]
    ranked = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [list(kv) for kv in ranked[:ERROR_REASONS_SHOWN]]
    if len(ranked) > ERROR_REASONS_SHOWN:
        rest = ranked[ERROR_REASONS_SHOWN:]
        rows.append([f"({len(rest)} other reasons)", sum(n for _, n in rest)])
    return ["<h2>Errors by reason</h2>",
            "<p class=muted>Inputs that could not be scored (<code>verdict = error</code>), by the text of their "
            "<code>error</code> column; they are not Algorithm-2 events.</p>",
            table(["reason", "images"], rows, numeric={1}, table_id="errors")]


def _query_attacks_section(tally: _Tally, detector: dict[str, Any]) -> list[str]:
    """The query detector's detections: counts, then the earliest detections with what they matched."""
    parts = ["<h2>Query attacks</h2>"]
    if not detector.get("enabled"):
        return parts + ["<p id=no-detector>The query detector was off (<code>detector.enabled</code>).</p>"]
    count = tally.verdicts[str(Verdict.QUERY_ATTACK)]
    parts.append(
        f"<p id=query-attack-count>{count:,} uploads were near-identical to at least "
        f"{esc(detector.get('min_matches', ''))} earlier ones (verdict <code>query_attack</code>), out of "
        f"{detector.get('queries', 0):,} scored uploads ({detector.get('exact_reuploads', 0):,} exact re-uploads, "
        f"never flagged); the window carried {detector.get('window_carried_in', 0):,} entries in and "
        f"{detector.get('window_carried_out', 0):,} out.</p>")
    if tally.query_attacks is None:
        return parts
    rows = [[fmt_time(r["timestamp"]), r["image_id"], r["source"], r["response"], len(r["query_matches"] or []),
             ", ".join((r["query_matches"] or [])[:8]) + (", ..." if len(r["query_matches"] or []) > 8 else "")]
            for r in tally.query_attacks.to_pylist()]
    if count > len(rows):
        parts.append(f"<p class=muted>The first {len(rows)} of {count:,}; every one is in <code>images/</code> "
                     "(<code>verdict = query_attack</code>, <code>query_matches</code>).</p>")
    return parts + [table(["time", "image", "source", "response", "matches", "matched images (closest first)"],
                          rows, numeric={4}, table_id="query-attacks")]


def _intervals(intervals: list[dict]) -> str:
    return "; ".join(f"{fmt_time(iv['joined'])} \u2192 {fmt_time(iv['left']) if iv['left'] is not None else 'end'}"
                     for iv in intervals)


def _blacklisted_section(listed: list[dict[str, Any]], ever: int, series: list[SourceSeries], cap: int) -> list[str]:
    parts = ["<h2>Blacklisted sources</h2>"]
    if not listed:
        return parts + ["<p id=no-blacklisted>No source was blacklisted.</p>"]
    rows = [[r["source"], r["images"], r["rejected"], r["blocked"], r["errors"], r["cc"],
             "yes" if r["blacklisted"] else "released", r["times_blacklisted"], _intervals(r["blacklist_intervals"]),
             fmt_time(r["first_seen"]), fmt_time(r["last_seen"])] for r in listed]
    parts += [
        "<p class=muted>Every source blacklisted at some point of the run. Red: still blacklisted at the end; "
        "yellow: released. Below, the CC of each (blacklist intervals shaded, threshold dashed).</p>",
        table(["source", "images", "rejected", "blocked", "errors", "final CC", "blacklisted at the end",
               "times blacklisted", "blacklist intervals", "first seen", "last seen"], rows,
              numeric={1, 2, 3, 4, 5, 7}, row_class=["bl" if r["blacklisted"] else "rel" for r in listed],
              table_id="blacklisted"),
        '<div class=grid id="cc-plots">',
        *(f"<figure>{img(cc_plot(s, cap), f'CC of {s.source}')}</figure>" for s in series),
        "</div>",
    ]
    if len(listed) < ever:
        parts.append(f"<p class=muted id=listed-first>Listed: the first {len(listed)} of {ever}; every one is in "
                     "<code>sources/</code> (<code>times_blacklisted &gt; 0</code>).</p>")
    if ever > len(series):
        parts.append(f"<p class=muted>CC plotted for the first {len(series)} of {ever}.</p>")
    return parts


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def _throughput_section(s: dict[str, Any]) -> list[str]:
    t = s.get("throughput", {})
    per_stage = t.get("per_stage_images_per_worker_s", {})
    wall = s.get("wall_s", {})
    parts = [
        "<h2>Throughput</h2>",
        f"<p class=muted>{esc(t.get('images_scored_this_run', 0))} images scored this run: "
        f"{esc(_rate(t.get('scoring_images_per_s')))} images/s scoring, "
        f"{esc(_rate(t.get('end_to_end_images_per_s')))} end to end. Per stage: images per second of one "
        "busy worker.</p>",
        '<div class=grid><div>',
        table(["stage", "images / worker-s"], [[k, _rate(v)] for k, v in per_stage.items()], numeric={1},
              table_id="throughput"),
        table(["phase", "wall s"], [[k, f"{v:.1f}"] for k, v in wall.items()], numeric={1}, table_id="wall"),
        "</div><div>",
    ]
    stages = [k for k, v in per_stage.items() if v]
    if stages:
        parts.append(img(bar_plot(stages, {"images / worker-s": [per_stage[k] for k in stages]},
                                  "Per-stage throughput", "images per worker-second", log=True),
                         "per-stage throughput", "throughput-plot"))
    return parts + ["</div></div>"]


def _config_section(config: dict[str, Any]) -> list[str]:
    """The decision settings in a table, the whole config as JSON (folded)."""
    rows = [[f"{section}.{key}", value] for section in ("thresholds", "reputation")
            for key, value in config.get(section, {}).items()]
    rows += [[f"{stream}.{key}", config[stream].get(key)] for stream in ("high", "low") if stream in config
             for key in ("model", "weights", "batch_size", "pool_size", "num_gpus")]
    return ["<h2>Config</h2>", table(["setting", "value"], rows, table_id="settings"),
            "<details><summary>The whole config (JSON)</summary>",
            f'<pre id="config">{esc(json.dumps(config, indent=2))}</pre></details>']


def _ground_truth_section(gt: dict[str, Any]) -> list[str]:
    rows, classes = [], []
    for s in gt.get("sources", []):
        joined = s.get("joined_at") or []
        if s.get("blacklisted"):
            listed = f"yes, since image {s.get('since_image')}"
        else:
            listed = "no" + (f" (listed at image {', '.join(map(str, joined))}, released)" if joined else "")
        rows.append([s.get("source"), s.get("role"), s.get("images"), s.get("accepted"), s.get("rejected"),
                     s.get("blocked"), listed])
        classes.append("bl" if s.get("blacklisted") else "rel" if joined else "")
    roles = [[role, a.get("sources"), a.get("ever_blacklisted"), a.get("blacklisted"), a.get("images"),
              a.get("accepted"), a.get("rejected"), a.get("blocked")] for role, a in gt.get("roles", {}).items()]
    return [
        "<h2>Ground truth</h2>",
        "<p class=muted>The manifest named each source's role: what happened to each.</p>",
        '<ul id="ground-truth-lines">', *(f"<li>{esc(line)}</li>" for line in gt.get("lines", [])), "</ul>",
        table(["source", "role", "images", "accepted", "rejected", "blocked", "blacklisted"], rows,
              numeric={2, 3, 4, 5}, row_class=classes, table_id="ground-truth"),
        table(["role", "sources", "ever blacklisted", "blacklisted at the end", "images", "accepted", "rejected",
               "blocked"], roles, numeric=set(range(1, 8)), table_id="roles"),
    ]
