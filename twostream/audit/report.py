"""The audit's self-contained HTML report (``report.html``), drawn with :mod:`twostream.reporting`
(tables, headline counts and matplotlib PNG plots embedded as ``data:`` URIs, so the one file
opens anywhere with no network).

Every string that comes from the log (source names, user agents, raw bad lines) is escaped.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from twostream.audit.outputs import AuditResult
from twostream.reporting import bar_plot, cc_plot, esc, fmt_time, img, kpis, page, rate_plot, table


def _intervals_text(intervals: list[dict]) -> str:
    parts = []
    for iv in intervals:
        parts.append(f"{fmt_time(iv['start'])} \u2192 {fmt_time(iv['end']) if iv['end'] is not None else 'end of log'}")
    return "; ".join(parts)


def render_report(result: AuditResult, top: int | None = None) -> str:
    """The whole report as one HTML string."""
    cap = int(result.summary["reputation"]["cap"])
    n_top = top if top is not None else len(result.top_series) or 10
    parts = [*_header(result.summary, cap), *_sources_section(result.sources, max(n_top, 10))]
    parts += _clusters_section(result.clusters, result.summary.get("query_detector") or {})
    parts.append("<h2>CC over time of the top sources</h2>")
    if result.top_series:
        parts.append('<div class=grid id="cc-plots">')
        for series in result.top_series:
            parts.append(f"<figure>{img(cc_plot(series, cap), f'CC of {series.source}')}</figure>")
        parts.append("</div>")
    else:
        parts.append("<p>No uploads.</p>")
    parts.append("<h2>Rejection rate over time</h2>")
    parts.append(img(rate_plot(result.rates), "rejection rate over time", "rate-plot"))
    if result.what_if is not None:
        parts += _what_if_section(result.what_if, result.summary["clean_rate"])
    parts += _bad_lines_section(result)
    s = result.summary
    parts.append(f"<p class=muted>twostream audit &middot; {esc(s['lines'])} lines in "
                 f"{esc(s['seconds']['total'])} s</p>")
    return page("twostream upload-log audit", parts)


def _header(s: dict[str, Any], cap: int) -> list[str]:
    """The title, the inputs and settings line, the headline counts and any warning."""
    parts = [
        "<h1>Upload-log audit</h1>",
        f'<p class=muted>log <code>{esc(s["log"])}</code> ({esc(s["format"])}) &middot; scores '
        f'<code>{esc(s["scores"] or "-")}</code> &middot; images <code>{esc(s["images"] or "-")}</code><br>'
        f'p1={esc(s["thresholds"]["p1"])}, p2={esc(s["thresholds"]["p2"])}, blacklist threshold '
        f'{esc(s["reputation"]["threshold"])}, cap {esc(cap)} &middot; {fmt_time(s["first_seen"])} '
        f'\u2192 {fmt_time(s["last_seen"])}</p>',
        kpis([
            ("log lines", s["lines"]), ("bad lines", s["bad_lines"]), ("sources", s["sources"]),
            ("ever blacklisted", s["sources_ever_blacklisted"]),
            ("blacklisted at end", s["sources_blacklisted_at_end"]),
            ("uploads rejected", s["uploads_rejected"]), ("uploads blocked", s["uploads_blocked"]),
            ("images scored now", s["images_scored_now"]), ("scores reused", s["images_scored_from_scores"]),
        ]),
    ]
    invalid = s["warnings"]["lines_with_invalid_utf8"]
    if invalid:
        parts.append(f'<p class=warn id="warnings">{invalid:,} log lines held invalid UTF-8: they were read '
                     f"with each bad byte sequence replaced by \ufffd (U+FFFD), and kept.</p>")
    return parts


def _sources_section(sources: pa.Table, rows_shown: int) -> list[str]:
    """The top suspicious sources table (the first ``rows_shown`` ranks)."""
    rows, classes = [], []
    for r in sources.slice(0, rows_shown).to_pylist():
        rows.append([
            r["rank"], r["source"], r["uploads"], r["scored"], r["rejected"], f"{r['rejection_rate']:.1%}",
            r["blocked"], r["errors"], fmt_time(r["first_seen"]), fmt_time(r["last_seen"]),
            r["times_blacklisted"], _intervals_text(r["blacklist_intervals"]), r["final_standing"],
            r["cc"], ", ".join(r["user_agents"]),
        ])
        classes.append({"blacklisted": "bl", "released": "rel"}.get(r["final_standing"], ""))
    return [
        "<h2>Top suspicious sources</h2>",
        "<p class=muted>Ranked by: ever blacklisted, then rejected uploads, then rejection rate. "
        "Red: still blacklisted at the end of the log; yellow: blacklisted and released. "
        "Every source is in <code>sources.parquet</code>.</p>",
        table(["#", "source", "uploads", "scored", "rejected", "rejection rate", "blocked", "errors",
               "first seen", "last seen", "times blacklisted", "blacklist intervals", "final standing",
               "final CC", "user agents"],
              rows, numeric={0, 2, 3, 4, 5, 6, 7, 10, 13}, row_class=classes, table_id="sources"),
    ]


CLUSTERS_SHOWN = 100  # clusters listed (all are in clusters.parquet)


def _clusters_section(clusters: pa.Table | None, detector: dict[str, Any]) -> list[str]:
    """The query detector's clusters of near-identical uploads and who sent them, or why there are none."""
    parts = ["<h2>Clusters of near-identical uploads (query detector)</h2>"]
    if clusters is None:
        reason = detector.get("reason") or "the query detector did not run"
        return parts + [f"<p class=warn id=clusters-unavailable>Unavailable: {esc(reason)}.</p>"]
    parts.append(
        f"<p class=muted id=clusters-count>{clusters.num_rows:,} clusters: {detector.get('flagged', 0):,} images "
        f"flagged as query attacks (<code>verdict = query_attack</code>, counted as rejections) among "
        f"{detector.get('queries', 0):,} images compared in first-upload order ({detector.get('exact_reuploads', 0):,} "
        f"exact re-uploads, {detector.get('unreadable', 0):,} unreadable). A cluster is a flagged image with the "
        "earlier images it matched, joined where they share images; its sources are every source that uploaded "
        "one of them. All are in <code>clusters.parquet</code>.</p>")
    if not clusters.num_rows:
        return parts
    rows = []
    for r in clusters.slice(0, CLUSTERS_SHOWN).to_pylist():
        senders = ", ".join(f"{s} ({n})" for s, n in zip(r["sources"][:10], r["source_uploads"][:10]))
        rows.append([r["cluster"], len(r["images"]), len(r["flagged"]), r["uploads"], len(r["sources"]),
                     senders + (", ..." if len(r["sources"]) > 10 else ""), fmt_time(r["first_seen"]),
                     fmt_time(r["last_seen"]), ", ".join(r["images"][:6]) + (", ..." if len(r["images"]) > 6 else "")])
    return parts + [table(["#", "images", "flagged", "uploads", "sources", "sent by (uploads)", "first seen",
                           "last seen", "images (first uploaded first)"], rows, numeric={0, 1, 2, 3, 4},
                          table_id="clusters")]


def _what_if_section(wt: pa.Table, clean_rate: float) -> list[str]:
    """The what-if table and chart."""
    rate = f"{clean_rate:.0%}"
    wrows = [[r["setting"], r["p1"], r["p2"], r["threshold"], r["cap"], r["rejected_uploads"],
              r["blocked_uploads"], r["sources_blocked"], r["blacklisted_at_end"],
              f"{r['clean_sources_hit']} / {r['clean_sources']}"] for r in wt.to_pylist()]
    return [
        "<h2>What-if: other thresholds</h2>",
        f"<p class=muted>The same log replayed under each setting. A clean-looking source has a "
        f"rejection rate of at most {esc(rate)} under the audit's own thresholds; "
        f"<i>clean hit</i> counts those the setting would have blacklisted at least once.</p>",
        table(["setting", "p1", "p2", "threshold", "cap", "rejected uploads", "blocked uploads",
               "sources blocked", "blacklisted at end", "clean hit"], wrows,
              numeric=set(range(1, 10)), table_id="what-if"),
        img(bar_plot(wt.column("setting").to_pylist(),
                     {"sources blocked": wt.column("sources_blocked").to_pylist(),
                      "clean-looking sources hit": wt.column("clean_sources_hit").to_pylist()},
                     "What-if: sources each setting would have blocked"), "what-if", "what-if-plot"),
    ]


def _bad_lines_section(result: AuditResult) -> list[str]:
    """Bad lines by reason, and the first of them."""
    if not result.bad_counts:
        return ["<h2>Bad log lines</h2>", "<p>None: every line was read.</p>"]
    return [
        "<h2>Bad log lines</h2>",
        table(["reason", "lines"], sorted(result.bad_counts.items()), numeric={1}, table_id="bad-reasons"),
        f"<p class=muted>{len(result.bad_sample)} of {result.summary['bad_lines']:,} listed here; all are in "
        f"<code>bad_lines.parquet</code>.</p>",
        table(["line", "reason", "detail", "text"], [[b.line, b.reason, b.detail, b.text] for b in result.bad_sample],
              numeric={0}, table_id="bad-lines"),
    ]
