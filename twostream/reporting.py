"""Self-contained HTML reports (the audit's and the batch job's ``report.html``): one page, no
external resources, plots as matplotlib PNGs embedded as base64 ``data:`` URIs.

The pieces: :func:`page` (head, style, body), :func:`table`, :func:`kpis` (headline counts),
:func:`esc` (every string from an input goes through it), :func:`fmt_time`, and the plots shared
by both reports: :func:`cc_plot` (one source's CC over time, blacklist intervals shaded),
:func:`rate_plot` (rejection rate over time, from :class:`RateBins`) and :func:`bar_plot`.
matplotlib is imported when a plot is drawn, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from twostream.core.labels import Refusal
from twostream.core.timestamps import FIRST, LAST, format_utc

RATE_BINS = 60  # time bins of the rejection-rate plot

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ccd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef1f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bl td{background:#fde8e8} tr.rel td{background:#fff6dd}
.kpi{display:inline-block;border:1px solid #ccd;border-radius:6px;padding:8px 14px;margin:4px 8px 4px 0}
.kpi b{display:block;font-size:20px} .muted{color:#667} code,pre{font-size:12px}
.warn{background:#fff6dd;border:1px solid #e0c060;border-radius:6px;padding:6px 10px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:10px} .grid img{width:100%}
img.plot{border:1px solid #dde;max-width:100%}
"""


def esc(value: Any) -> str:
    """``value`` as HTML text (None -> empty)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_time(ts: float | None) -> str:
    """Epoch seconds -> ``YYYY-MM-DD HH:MM:SS UTC``, total over any stored value
    (:func:`twostream.core.timestamps.format_utc`: empty for None/NaN, the number when no date)."""
    return format_utc(ts)


def page(title: str, parts: Iterable[str]) -> str:
    """The whole HTML document: ``title`` in the head, ``parts`` as the body."""
    head = f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>" \
           f"<style>{CSS}</style></head><body>"
    return "\n".join([head, *parts, "</body></html>"])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Iterable[int] = (),
          row_class: Sequence[str] | None = None, table_id: str = "") -> str:
    """An HTML table; columns ``numeric`` right-aligned, ``row_class`` a CSS class per row."""
    numeric = set(numeric)
    out = [f'<table id="{esc(table_id)}">' if table_id else "<table>", "<thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        cls = f' class="{esc(row_class[k])}"' if row_class and row_class[k] else ""
        cells = "".join(f'<td class="num">{esc(v)}</td>' if j in numeric else f"<td>{esc(v)}</td>"
                        for j, v in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kpis(items: Iterable[tuple[str, int]], div_id: str = "kpis") -> str:
    """Headline counts, each a big number over its label."""
    spans = "".join(f'<span class=kpi><b>{esc(f"{value:,}")}</b>{esc(label)}</span>' for label, value in items)
    return f'<div id="{esc(div_id)}">{spans}</div>'


def img(src: str, alt: str, img_id: str = "") -> str:
    """An ``<img class=plot>`` of a ``data:`` URI."""
    ident = f' id="{esc(img_id)}"' if img_id else ""
    return f'<img class=plot{ident} alt="{esc(alt)}" src="{src}">'


# ---------------------------------------------------------------------------------------------
# Plot data
# ---------------------------------------------------------------------------------------------
@dataclass
class RateBins:
    """Uploads scored, rejected and blocked per time bin (the rejection-rate plot)."""

    edges: np.ndarray  # bin edges (epoch seconds)
    scored: np.ndarray
    rejected: np.ndarray
    blocked: np.ndarray

    @classmethod
    def over(cls, tmin: float, tmax: float, bins: int = RATE_BINS) -> "RateBins":
        """Equal bins from ``tmin`` to ``tmax`` (0..1 when there was no upload, or when stored
        values give no finite span: times outside it fall in the first or last bin)."""
        tmin, tmax = float(tmin), float(tmax)
        if not np.isfinite(tmax) or tmax <= tmin:
            tmax = tmin + 1.0
        if np.isfinite(tmin) and np.isfinite(tmax - tmin) and tmax > tmin:
            edges = np.linspace(tmin, tmax, bins + 1)
        else:
            edges = np.linspace(0.0, 1.0, bins + 1)
        return cls(edges, np.zeros(bins, np.int64), np.zeros(bins, np.int64), np.zeros(bins, np.int64))

    def add(self, ts: np.ndarray, scored: np.ndarray, rejected: np.ndarray, response: np.ndarray) -> None:
        """Count uploads at ``ts``: ``scored`` (bool), ``rejected`` (bool, of the scored), responses."""
        b = np.clip(np.searchsorted(self.edges, ts, side="right") - 1, 0, len(self.scored) - 1)
        np.add.at(self.scored, b[scored], 1)
        np.add.at(self.rejected, b[scored & rejected], 1)
        np.add.at(self.blocked, b[response == Refusal.BLOCKED], 1)


@dataclass
class SourceSeries:
    """One source's CC after each of its scored uploads, and its blacklist intervals."""

    source: str
    timestamp: np.ndarray
    cc: np.ndarray
    intervals: list[list[float | None]]  # [start, end]; end None while still listed
    threshold: int


# ---------------------------------------------------------------------------------------------
# Plots (PNG data: URIs)
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# matplotlib dates end with year 9999 and its locators look a little beyond the data: a plot
# whose times leave 1970 .. 9999-12-31 minus a year is drawn over seconds since the epoch instead.
_DATE_MARGIN = 366 * 86400.0
_AXIS_LIMIT = 1e300


def _as_dates(*times: np.ndarray) -> bool:
    """Whether every finite time of ``times`` can be drawn on a date axis."""
    values = np.concatenate([np.asarray(t, np.float64).ravel() for t in times] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return bool(len(values) == 0 or (values.min() >= FIRST and values.max() <= LAST - _DATE_MARGIN))


def _x(seconds: np.ndarray, dates: bool) -> np.ndarray:
    """Times as the x values of a plot: ``datetime64[ms]`` or plain seconds."""
    seconds = np.asarray(seconds, np.float64)
    if dates:
        return (seconds * 1000.0).astype("int64").astype("datetime64[ms]")
    return np.clip(seconds, -_AXIS_LIMIT, _AXIS_LIMIT)  # a finite span for matplotlib's transforms


def _time_axis(ax, dates: bool) -> None:
    if not dates:
        ax.set_xlabel("seconds since 1970-01-01T00:00:00Z (times outside the calendar range)")
        return
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _unplotted(title: str, exc: Exception) -> str:
    """A small figure saying that a plot could not be drawn, and why (stored values it cannot place)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 1.2))
    ax.axis("off")
    ax.text(0.01, 0.5, f"{title}: not drawn ({type(exc).__name__}: {str(exc)[:120]})", fontsize=8, va="center")
    return png(fig)


def cc_plot(series: SourceSeries, cap: int) -> str:
    """:func:`_cc_plot`, or a figure saying why it could not be drawn: never raises."""
    try:
        return _cc_plot(series, cap)
    except Exception as exc:  # noqa: BLE001 - the report is written whatever the stored values
        _pyplot().close("all")
        return _unplotted(f"CC of {series.source}", exc)


def rate_plot(rates: RateBins, what: str = "uploads") -> str:
    """:func:`_rate_plot`, or a figure saying why it could not be drawn: never raises."""
    try:
        return _rate_plot(rates, what)
    except Exception as exc:  # noqa: BLE001 - the report is written whatever the stored values
        _pyplot().close("all")
        return _unplotted("rejection rate over time", exc)


def _cc_plot(series: SourceSeries, cap: int) -> str:
    """CC over time for one source, blacklist intervals shaded, threshold dashed; times that are
    not finite are left out (their number in the title)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 2.4))
    ts = np.asarray(series.timestamp, np.float64)
    keep = np.isfinite(ts)
    ts, cc = ts[keep], np.asarray(series.cc)[keep]
    spans = [(a, b) for a, b in series.intervals if a is not None and np.isfinite(a)
             and (b is None or np.isfinite(b))]
    dates = _as_dates(ts, np.array([v for span in spans for v in span if v is not None], np.float64))
    if len(ts):
        x = _x(ts, dates)
        ax.step(x, cc, where="post", color="#1f4e9c", lw=1.4, label="CC")
        ax.plot(x, cc, ".", ms=3, color="#1f4e9c")
        end = ts[-1]
        for start, stop in spans:
            a, b = float(start), float(stop) if stop is not None else end
            b = b if b > a else a + 1.0
            ax.axvspan(*_x(np.array([a, b]), dates), color="#e03c31", alpha=0.18, lw=0)
    ax.axhline(series.threshold, color="#e03c31", ls="--", lw=1, label=f"threshold {series.threshold}")
    ax.set_ylim(-0.5, cap + 0.5)
    ax.set_ylabel("CC")
    dropped = int((~keep).sum())
    ax.set_title(series.source + (f" ({dropped} uploads at no finite time not drawn)" if dropped else ""),
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    _time_axis(ax, dates)
    return png(fig)


def _rate_plot(rates: RateBins, what: str = "uploads") -> str:
    """Overall rejection rate (and blocked share) per time bin, with the volume as bars."""
    fig, ax = _pyplot().subplots(figsize=(11, 3.2))
    edges, scored = np.asarray(rates.edges, np.float64), rates.scored
    dates = _as_dates(edges)
    mids = _x((edges[:-1] + edges[1:]) / 2, dates)
    width = (edges[1] - edges[0]) * 0.9 if len(edges) > 1 else 0.01
    width = width / 86400.0 if dates else width
    ax2 = ax.twinx()
    ax2.bar(mids, scored, width=width, color="#c9d3e6", label=f"{what} scored")
    ax2.set_ylabel(f"{what} per bin", color="#667")
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(scored > 0, rates.rejected / np.maximum(scored, 1), np.nan)
        brate = np.where(scored > 0, rates.blocked / np.maximum(scored, 1), np.nan)
    ax.plot(mids, rate, color="#e03c31", lw=1.6, marker=".", label="rejection rate")
    ax.plot(mids, brate, color="#7a3db8", lw=1.0, ls="--", label="blocked share")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"share of {what}")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="upper left", fontsize=8, frameon=False)
    ax.set_title("Overall rejection rate over time (UTC)", fontsize=10)
    _time_axis(ax, dates)
    return png(fig)


def bar_plot(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str = "",
             log: bool = False) -> str:
    """Grouped bars: one group per label, one bar per entry of ``series`` (name -> values);
    ``log``: a logarithmic value axis."""
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.1 * len(labels) + 2), 3))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    colours = ("#1f4e9c", "#e0a031", "#e03c31", "#7a3db8")
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name, color=colours[k % len(colours)])
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    if ylabel:
        ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    return png(fig)
