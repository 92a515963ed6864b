"""The audit's self-contained HTML report (``report.html``): tables plus matplotlib PNG plots
embedded as base64 ``data:`` URIs, so the one file opens anywhere with no network.

Every string that comes from the log (source names, user agents, raw bad lines) goes through
:func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from twostream.audit.outputs import AuditResult, SourceSeries

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ccd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef1f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bl td{background:#fde8e8} tr.rel td{background:#fff6dd}
.kpi{display:inline-block;border:1px solid #ccd;border-radius:6px;padding:8px 14px;margin:4px 8px 4px 0}
.kpi b{display:block;font-size:20px} .muted{color:#667} code,pre{font-size:12px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:10px} .grid img{width:100%}
img.plot{border:1px solid #dde;max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_time(ts: float | None) -> str:
    if ts is None or (isinstance(ts, float) and not np.isfinite(ts)):
        return ""
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _date_axis(ax) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def cc_plot(series: SourceSeries, cap: int) -> str:
    """CC over time for one source, blacklist intervals shaded, threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.4))
    t = series.timestamp * 1000.0
    if len(t):
        x = t.astype("datetime64[ms]")
        ax.step(x, series.cc, where="post", color="#1f4e9c", lw=1.4, label="CC")
        ax.plot(x, series.cc, ".", ms=3, color="#1f4e9c")
        end = x[-1]
        for start, stop in series.intervals:
            a = np.datetime64(int(start * 1000), "ms")
            b = np.datetime64(int(stop * 1000), "ms") if stop is not None else end
            ax.axvspan(a, b if b > a else a + np.timedelta64(1, "s"), color="#e03c31", alpha=0.18, lw=0)
    ax.axhline(series.threshold, color="#e03c31", ls="--", lw=1, label=f"threshold {series.threshold}")
    ax.set_ylim(-0.5, cap + 0.5)
    ax.set_ylabel("CC")
    ax.set_title(series.source, fontsize=10)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    _date_axis(ax)
    return _png(fig)


def rate_plot(edges: np.ndarray, scored: np.ndarray, rejected: np.ndarray, blocked: np.ndarray) -> str:
    """Overall rejection rate (and blocked share) per time bin, with upload volume bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    mids = ((edges[:-1] + edges[1:]) / 2 * 1000).astype("datetime64[ms]")
    width = (edges[1] - edges[0]) / 86400.0 * 0.9 if len(edges) > 1 else 0.01
    ax2 = ax.twinx()
    ax2.bar(mids, scored, width=width, color="#c9d3e6", label="uploads scored")
    ax2.set_ylabel("uploads per bin", color="#667")
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(scored > 0, rejected / np.maximum(scored, 1), np.nan)
        brate = np.where(scored > 0, blocked / np.maximum(scored, 1), np.nan)
    ax.plot(mids, rate, color="#e03c31", lw=1.6, marker=".", label="rejection rate")
    ax.plot(mids, brate, color="#7a3db8", lw=1.0, ls="--", label="blocked share")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of uploads")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="upper left", fontsize=8, frameon=False)
    ax.set_title("Overall rejection rate over time (UTC)", fontsize=10)
    _date_axis(ax)
    return _png(fig)


def what_if_plot(table: pa.Table) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = table.column("setting").to_pylist()
    blocked = table.column("sources_blocked").to_pylist()
    clean = table.column("clean_sources_hit").to_pylist()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 3))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, blocked, 0.4, label="sources blocked", color="#1f4e9c")
    ax.bar(x + 0.2, clean, 0.4, label="clean-looking sources hit", color="#e0a031")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("What-if: sources each setting would have blocked", fontsize=10)
    return _png(fig)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(),
           row_class: list[str] | None = None, table_id: str = "") -> str:
    out = [f'<table id="{_e(table_id)}">' if table_id else "<table>", "<thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        cls = f' class="{_e(row_class[k])}"' if row_class and row_class[k] else ""
        cells = "".join(f'<td class="num">{_e(v)}</td>' if j in numeric else f"<td>{_e(v)}</td>"
                        for j, v in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


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
    parts.append("<h2>CC over time of the top sources</h2>")
    if result.top_series:
        parts.append('<div class=grid id="cc-plots">')
        for series in result.top_series:
            parts.append(f'<figure><img class=plot alt="CC of {_e(series.source)}" '
                         f'src="{cc_plot(series, cap)}"></figure>')
        parts.append("</div>")
    else:
        parts.append("<p>No uploads.</p>")
    parts.append("<h2>Rejection rate over time</h2>")
    parts.append(f'<img class=plot id="rate-plot" alt="rejection rate over time" '
                 f'src="{rate_plot(result.rate_bins, result.rate_scored, result.rate_rejected, result.rate_blocked)}">')
    if result.what_if is not None:
        parts += _what_if_section(result.what_if, result.summary["clean_rate"])
    parts += _bad_lines_section(result)
    s = result.summary
    parts.append(f"<p class=muted>twostream audit &middot; {_e(s['lines']):s} lines in "
                 f"{_e(s['seconds']['total'])} s</p></body></html>")
    return "\n".join(parts)


def _header(s: dict[str, Any], cap: int) -> list[str]:
    """Page head, the inputs and settings line, and the headline counts."""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>twostream upload-log audit</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Upload-log audit</h1>",
        f'<p class=muted>log <code>{_e(s["log"])}</code> ({_e(s["format"])}) &middot; scores '
        f'<code>{_e(s["scores"] or "-")}</code> &middot; images <code>{_e(s["images"] or "-")}</code><br>'
        f'p1={_e(s["thresholds"]["p1"])}, p2={_e(s["thresholds"]["p2"])}, blacklist threshold '
        f'{_e(s["reputation"]["threshold"])}, cap {_e(cap)} &middot; {fmt_time(s["first_seen"])} '
        f'\u2192 {fmt_time(s["last_seen"])}</p>',
        "<div>",
    ]
    for label, value in (
        ("log lines", s["lines"]), ("bad lines", s["bad_lines"]), ("sources", s["sources"]),
        ("ever blacklisted", s["sources_ever_blacklisted"]), ("blacklisted at end", s["sources_blacklisted_at_end"]),
        ("uploads rejected", s["uploads_rejected"]), ("uploads blocked", s["uploads_blocked"]),
        ("images scored now", s["images_scored_now"]), ("scores reused", s["images_scored_from_scores"]),
    ):
        parts.append(f'<span class=kpi><b>{_e(f"{value:,}")}</b>{_e(label)}</span>')
    parts.append("</div>")
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
        _table(["#", "source", "uploads", "scored", "rejected", "rejection rate", "blocked", "errors",
                "first seen", "last seen", "times blacklisted", "blacklist intervals", "final standing",
                "final CC", "user agents"],
               rows, numeric={0, 2, 3, 4, 5, 6, 7, 10, 13}, row_class=classes, table_id="sources"),
    ]


def _what_if_section(wt: pa.Table, clean_rate: float) -> list[str]:
    """The what-if table and chart."""
    rate = f"{clean_rate:.0%}"
    wrows = [[r["setting"], r["p1"], r["p2"], r["threshold"], r["cap"], r["rejected_uploads"],
              r["blocked_uploads"], r["sources_blocked"], r["blacklisted_at_end"],
              f"{r['clean_sources_hit']} / {r['clean_sources']}"] for r in wt.to_pylist()]
    return [
        "<h2>What-if: other thresholds</h2>",
        f"<p class=muted>The same log replayed under each setting. A clean-looking source has a "
        f"rejection rate of at most {_e(rate)} under the audit's own thresholds; "
        f"<i>clean hit</i> counts those the setting would have blacklisted at least once.</p>",
        _table(["setting", "p1", "p2", "threshold", "cap", "rejected uploads", "blocked uploads",
                "sources blocked", "blacklisted at end", "clean hit"], wrows,
               numeric=set(range(1, 10)), table_id="what-if"),
        f'<img class=plot id="what-if-plot" alt="what-if" src="{what_if_plot(wt)}">',
    ]


def _bad_lines_section(result: AuditResult) -> list[str]:
    """Bad lines by reason, and the first of them."""
    if not result.bad_counts:
        return ["<h2>Bad log lines</h2>", "<p>None: every line was read.</p>"]
    return [
        "<h2>Bad log lines</h2>",
        _table(["reason", "lines"], sorted(result.bad_counts.items()), numeric={1}, table_id="bad-reasons"),
        f"<p class=muted>{len(result.bad_sample)} of {result.summary['bad_lines']:,} listed here; all are in "
        f"<code>bad_lines.parquet</code>.</p>",
        _table(["line", "reason", "detail", "text"], [[b.line, b.reason, b.detail, b.text] for b in result.bad_sample],
               numeric={0}, table_id="bad-lines"),
    ]
