"""The audit run (docs/audit.md): which sources sent adversarial images, and when.

Plain Python + pyarrow, no Ray (``jobs/audit.py`` only adds Ray for scoring). The stages, each
a short function here over the modules that own the work:

1. **Catalogue** of known images (:mod:`twostream.audit.catalogue`).
2. **Log pass** (streaming, :mod:`twostream.audit.logread`, about two blocks of text held
   whatever the lines): records checked, bad lines written, good records spilled,
   hash-partitioned by source (:class:`twostream.audit.replay.Spill`); nothing kept per source.
3. **Scoring** of the referenced images that no ``--scores`` row covers (a ``score_fn``).
   Then, with ``--images``, the **query detector** over the log's images in first-upload order
   (:mod:`twostream.audit.clusters`): the images it flags become ``query_attack`` (rejections)
   and its matches, grouped, are the clusters of near-identical uploads and their sources.
4. **Replay** of Algorithm 2 per source (:func:`twostream.audit.replay.replay`), a partition at
   a time: the timeline streamed to Parquet, each partition's per-source rows ranked to a file
   and merged into ``sources.parquet`` (:class:`twostream.audit.outputs.SourceRuns`), the rate
   bins and the top sources' CC series. Memory: about one partition, whatever the log's size.
5. **What-if** (:func:`twostream.audit.replay.what_if`), then ``summary.json`` and the report.

Settings come from the config's ``audit`` section (:class:`twostream.core.config.AuditSettings`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.audit.catalogue import Catalogue, ScoreFn, build_catalogue, rejected_for, score_missing, scorer_score_fn
from twostream.audit.clusters import Clusters, detect_clusters
from twostream.audit.logread import AuditError, ColumnMapping, check_chunk, detect_format, read_log
from twostream.audit.outputs import (
    SOURCES_KEPT,
    TIMELINE_SCHEMA,
    AuditResult,
    BadLines,
    ParquetSink,
    SourceRuns,
    scored_images_table,
)
from twostream.audit.report import render_report
from twostream.audit.replay import Spill, WhatIf, replay, what_if
from twostream.core.config import TwoStreamConfig
from twostream.core.labels import Verdict
from twostream.reporting import RateBins, SourceSeries

log = logging.getLogger(__name__)

OUTPUT_FILES = ("sources.parquet", "timeline.parquet", "bad_lines.parquet", "summary.json", "report.html")


@dataclass
class _LogPass:
    """What the log pass leaves for the later stages."""

    spill: Spill
    referenced: np.ndarray  # bool per catalogue row: named by a good record
    lines: int = 0
    good: int = 0
    invalid_utf8: int = 0  # lines (rows) whose invalid UTF-8 was replaced
    tmin: float = math.inf
    tmax: float = -math.inf


@dataclass
class _Replayed:
    sources: pa.Table  # SOURCES_SCHEMA: the first SOURCES_KEPT ranks
    counts: dict[str, int]  # sources, ever_blacklisted, blacklisted_at_end
    runs: SourceRuns  # each partition's ranked sources (the what-if reads the clean-looking ones)
    top_series: list[SourceSeries]
    rates: RateBins


class _Clock:
    """Seconds per stage, and since the start."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def run_audit(
    log_uri: str,
    output_uri: str,
    *,
    images_uri: str | None = None,
    scores_uri: str | None = None,
    config: TwoStreamConfig | None = None,
    score_fn: ScoreFn | None = None,
) -> AuditResult:
    """Run the whole audit and write its outputs under ``output_uri`` (see the module docstring).

    The settings are ``config.audit``. ``score_fn(uris, ids) -> ScoredBatch`` scores the
    referenced images that no ``--scores`` row covers; when None, an in-process
    :class:`twostream.core.scoring.Scorer` is built from ``config`` (only if something needs it).
    """
    clock = _Clock()
    config = config or TwoStreamConfig()
    settings = config.audit
    mapping = ColumnMapping.from_columns(settings.columns)
    alternatives = [WhatIf.parse(w) for w in settings.what_if]
    if not scores_uri and not images_uri:
        raise AuditError("give --scores and/or --images: the audit needs to know the images")
    cat = build_catalogue(scores_uri, images_uri, config.high.top_k, config.low.top_k)
    clock.lap("catalogue")
    files = {name: storage.join(output_uri, name) for name in OUTPUT_FILES}
    tmp = tempfile.mkdtemp(prefix="twostream-audit-", dir=settings.spill_dir)
    try:
        fmt = detect_format(log_uri) if settings.format == "auto" else settings.format
        bad = BadLines(files["bad_lines.parquet"])
        spill = Spill(tmp, settings.partitions, config.reputation.group_by_prefix)
        logged = _log_pass(log_uri, fmt, mapping, cat, spill, bad, settings.block_bytes)
        clock.lap("log")
        newly_scored = _score_unscored(cat, logged.referenced, score_fn, config, files, output_uri)
        clock.lap("score")
        clusters = _detect(logged, cat, images_uri, config, files, output_uri)
        clock.lap("detector")
        replayed = _replay(logged, cat, config, files, settings.top, SourceRuns(tmp, settings.partitions))
        clock.lap("replay")
        what_if_table = None
        if alternatives:
            what_if_table = what_if(logged.spill, cat, config, [WhatIf(), *alternatives], replayed.runs,
                                    settings.clean_rate)
            files["what_if.parquet"] = storage.join(output_uri, "what_if.parquet")
            storage.write_parquet(what_if_table, files["what_if.parquet"], compression="zstd")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = _summary(log_uri, fmt, images_uri, scores_uri, config, cat, logged, bad, replayed, newly_scored,
                       clock)
    summary["query_detector"] = clusters.summary()
    result = AuditResult(output_uri, summary, replayed.sources, replayed.top_series, replayed.rates,
                         dict(bad.counts), bad.sample, what_if_table, files,
                         clusters.table if clusters.available else None)
    _write_report_and_summary(result, settings.report)
    return result


def _log_pass(log_uri: str, fmt: str, mapping: ColumnMapping, cat: Catalogue, spill: Spill, bad: BadLines,
              block_bytes: int) -> _LogPass:
    """Stream the log: bad lines to ``bad``, good records to ``spill`` (then both closed)."""
    out = _LogPass(spill, np.zeros(len(cat), dtype=bool))
    for chunk in read_log(log_uri, fmt, mapping, block_bytes):  # a line longer than a block: a bad line
        out.lines += len(chunk.line) + len(chunk.bad)
        out.invalid_utf8 += chunk.invalid_utf8
        records = check_chunk(chunk, cat.lookup, mapping.timestamp_unit)
        bad.add(records.bad)
        if not len(records.line):
            continue
        out.good += len(records.line)
        out.referenced[records.image] = True
        out.tmin = min(out.tmin, float(records.timestamp.min()))
        out.tmax = max(out.tmax, float(records.timestamp.max()))
        spill.append(records.source, records.image, records.timestamp, records.line, records.user_agent)
    spill.close()
    bad.close()
    if out.invalid_utf8:
        log.warning("%s: %d lines with invalid UTF-8, read with the bad bytes replaced by U+FFFD",
                    log_uri, out.invalid_utf8)
    return out


def _score_unscored(cat: Catalogue, referenced: np.ndarray, score_fn: ScoreFn | None, config: TwoStreamConfig,
                    files: dict[str, str], output_uri: str) -> int:
    """Score what the log needs and nobody has scored (written to ``scored_images.parquet``)."""
    need = np.flatnonzero(referenced & ~cat.scored)
    if not len(need):
        return 0
    if score_fn is None:
        from twostream.core.scoring import Scorer  # torch: only when something needs scoring

        score_fn = scorer_score_fn(Scorer(config), max_bytes=config.limits.max_bytes)
    uris, batch = score_missing(cat, need, score_fn)
    files["scored_images.parquet"] = storage.join(output_uri, "scored_images.parquet")
    storage.write_parquet(scored_images_table(batch, uris), files["scored_images.parquet"], compression="zstd")
    return len(need)


def _detect(logged: _LogPass, cat: Catalogue, images_uri: str | None, config: TwoStreamConfig,
            files: dict[str, str], output_uri: str) -> Clusters:
    """The query detector over the log's images (:mod:`twostream.audit.clusters`): the images it
    flags become ``query_attack`` (rejections for the replay); ``clusters.parquet`` written."""
    def streams() -> tuple:
        from twostream.core.scoring import stream_specs  # torch: only when there are images to decode

        return stream_specs(config)

    clusters = detect_clusters(logged.spill, cat, images_uri, config.detector.enabled,
                               config.detector.query_config(), config.limits, streams)
    if clusters.available:
        cat.verdict[clusters.flagged] = Verdict.QUERY_ATTACK
        cat.label[clusters.flagged] = None
        files["clusters.parquet"] = storage.join(output_uri, "clusters.parquet")
        storage.write_parquet(clusters.table, files["clusters.parquet"], compression="zstd")
    else:
        log.info("query detector: %s", clusters.reason)
    return clusters


def _replay(logged: _LogPass, cat: Catalogue, config: TwoStreamConfig, files: dict[str, str], top: int,
            runs: SourceRuns) -> _Replayed:
    """Algorithm 2 under the audit's own settings, a partition at a time: the timeline, the
    sources (ranked per partition, then merged), the rates, the top sources' CC series."""
    rejected, verdicts = rejected_for(cat, None)
    rates = RateBins.over(logged.tmin, logged.tmax)
    timeline = ParquetSink(files["timeline.parquet"], TIMELINE_SCHEMA)
    candidates: dict[str, SourceSeries] = {}
    for part in replay(logged.spill, cat, rejected, config.reputation):
        timeline.write(part.timeline(verdicts, cat.ids))
        rates.add(part.ts, ~part.error, part.rejected, part.response)
        sources = part.sources()
        order = pc.sort_indices(sources, [("key", "ascending")])
        runs.write(part.index, sources.take(order))
        # each partition's most suspicious sources keep their CC series (the top ones overall are among them)
        for k in order.to_numpy()[:top].tolist():
            candidates[part.names[k]] = part.series(k, config.reputation.threshold)
    timeline.close()
    head, counts = runs.merge(files["sources.parquet"], max(SOURCES_KEPT, top))
    top_series = [candidates[n] for n in head.column("source").to_pylist()[:top] if n in candidates]
    return _Replayed(head, counts, runs, top_series, rates)


def _summary(log_uri: str, fmt: str, images_uri: str | None, scores_uri: str | None, config: TwoStreamConfig,
             cat: Catalogue, logged: _LogPass, bad: BadLines, replayed: _Replayed, newly_scored: int,
             clock: _Clock) -> dict:
    """``summary.json`` (its ``files`` filled in when written)."""
    elapsed = clock.total()
    counts = replayed.counts
    finite = math.isfinite(logged.tmin)
    return {
        "log": log_uri, "format": fmt, "images": images_uri, "scores": scores_uri,
        "lines": logged.lines, "good_lines": logged.good, "bad_lines": int(sum(bad.counts.values())),
        "bad_by_reason": dict(sorted(bad.counts.items())),
        "warnings": {"lines_with_invalid_utf8": logged.invalid_utf8},
        "sources": counts["sources"],
        "sources_ever_blacklisted": counts["ever_blacklisted"],
        "sources_blacklisted_at_end": counts["blacklisted_at_end"],
        "uploads_rejected": int(replayed.rates.rejected.sum()), "uploads_blocked": int(replayed.rates.blocked.sum()),
        "images_known": len(cat), "images_scored_from_scores": int((logged.referenced & cat.from_scores).sum()),
        "images_scored_now": newly_scored,
        "first_seen": logged.tmin if finite else None, "last_seen": logged.tmax if finite else None,
        "thresholds": config.thresholds.model_dump(), "reputation": config.reputation.model_dump(),
        "clean_rate": config.audit.clean_rate,
        "seconds": {**{k: round(v, 3) for k, v in clock.stages.items()}, "total": round(elapsed, 3)},
        "lines_per_second": round(logged.lines / elapsed, 1) if elapsed > 0 else None,
        "files": {},
    }


def _write_report_and_summary(result: AuditResult, report: bool) -> None:
    """``summary.json`` listing the files written, then ``report.html`` (unless ``report`` is
    False): the summary is on disk whatever the report meets. Values that JSON cannot hold (NaN,
    infinities) are written as null."""
    files = result.files
    report_uri = files.pop("report.html")
    result.summary["files"] = dict(files)
    storage.write_bytes(files["summary.json"], _json(result.summary))
    if report:
        storage.write_bytes(report_uri, render_report(result).encode())
        files["report.html"] = report_uri
        result.summary["files"] = dict(files)
        storage.write_bytes(files["summary.json"], _json(result.summary))


def _json(value: Any) -> bytes:
    """``value`` as indented, strict JSON: NaN and infinities (not JSON) become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False, default=str).encode()
