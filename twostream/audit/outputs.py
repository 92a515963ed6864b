"""The audit's outputs: the Parquet schemas, the sinks that stream them, and the result types.

Files under the output folder: ``sources.parquet`` (:data:`SOURCES_SCHEMA`, ranked most
suspicious first), ``timeline.parquet`` (:data:`TIMELINE_SCHEMA`), ``bad_lines.parquet``
(:class:`BadLines`), ``scored_images.parquet`` (:func:`scored_images_table`),
``what_if.parquet`` (:data:`WHAT_IF_SCHEMA`), ``summary.json`` and ``report.html``.
:class:`AuditResult` is what :func:`twostream.audit.run.run_audit` returns and the report draws.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from twostream import storage
from twostream.audit.logread import BadLine
from twostream.core.results import ScoredBatch
from twostream.reporting import RateBins, SourceSeries

BAD_SAMPLE = 200  # bad lines kept for the report (all are in bad_lines.parquet)

TIMELINE_SCHEMA = pa.schema([
    ("line", pa.int64()),  # line (row for Parquet logs) of the upload in the log
    ("source", pa.string()),
    ("timestamp", pa.float64()),  # UTC epoch seconds
    ("image_id", pa.string()),
    ("verdict", pa.string()),  # accepted | adversarial | error
    ("label", pa.string()),  # CIFAR-10 label when accepted
    ("cc", pa.int32()),  # the source's counter after this upload (null for error images)
    ("blacklisted", pa.bool_()),  # the source's standing after this upload (null for errors)
    ("response", pa.string()),  # a label, adversarial, blocked, or error
])
INTERVAL = pa.struct([("start", pa.float64()), ("end", pa.float64())])
SOURCES_SCHEMA = pa.schema([
    ("rank", pa.int32()),  # 1 = most suspicious
    ("source", pa.string()),
    ("uploads", pa.int64()),  # log lines of this source that resolved to an image
    ("scored", pa.int64()),  # Algorithm-2 events (uploads minus error images)
    ("rejected", pa.int64()),
    ("errors", pa.int64()),  # undecodable images (not Algorithm-2 events)
    ("blocked", pa.int64()),  # uploads answered "blocked"
    ("rejection_rate", pa.float64()),  # rejected / scored
    ("first_seen", pa.float64()),
    ("last_seen", pa.float64()),
    ("blacklist_intervals", pa.list_(INTERVAL)),  # end null: still listed at the end of the log
    ("times_blacklisted", pa.int32()),
    ("blacklisted_seconds", pa.float64()),  # open intervals counted up to last_seen
    ("cc", pa.int32()),  # final counter
    ("blacklisted", pa.bool_()),  # final standing
    ("final_standing", pa.string()),  # blacklisted | released | clean
    ("user_agents", pa.list_(pa.string())),  # up to 5 distinct user agents seen
])
BAD_LINES_SCHEMA = pa.schema([("line", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
                              ("text", pa.string())])
WHAT_IF_SCHEMA = pa.schema([
    ("setting", pa.string()), ("p1", pa.float64()), ("p2", pa.float64()), ("threshold", pa.int32()),
    ("cap", pa.int32()), ("rejected_uploads", pa.int64()), ("blocked_uploads", pa.int64()),
    ("sources_blocked", pa.int64()), ("blacklisted_at_end", pa.int64()),
    ("clean_sources_hit", pa.int64()), ("clean_sources", pa.int64()),
])
SCORED_IMAGES_COLUMNS = ("image_id", "verdict", "label", "high_idx", "high_prob", "low_idx", "low_prob", "error")


class ParquetSink:
    """A Parquet file written a table at a time (local or s3://)."""

    def __init__(self, uri: str, schema: pa.Schema) -> None:
        fs, path = storage.filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.writer = pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd")
        self.schema = schema
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table, row_group_size=1 << 20)
            self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()


class BadLines:
    """``bad_lines.parquet`` written as the lines come, with counts by reason and the first few kept."""

    def __init__(self, uri: str) -> None:
        self.sink = ParquetSink(uri, BAD_LINES_SCHEMA)
        self.counts: Counter[str] = Counter()
        self.sample: list[BadLine] = []

    def add(self, rows: list[BadLine]) -> None:
        if not rows:
            return
        self.counts.update(b.reason for b in rows)
        room = BAD_SAMPLE - len(self.sample)
        if room > 0:
            self.sample.extend(rows[:room])
        self.sink.write({"line": [b.line for b in rows], "reason": [b.reason for b in rows],
                         "detail": [b.detail for b in rows], "text": [b.text for b in rows]})

    def close(self) -> None:
        self.sink.close()


def scored_images_table(batch: ScoredBatch, uris: Sequence[str]) -> pa.Table:
    """``scored_images.parquet``: the images this audit scored (error rows: empty top-k lists)."""
    table = batch.to_arrow().select(list(SCORED_IMAGES_COLUMNS))
    table = table.add_column(1, "uri", pa.array(list(uris), pa.string()))
    for name in ("high_idx", "high_prob", "low_idx", "low_prob"):
        col = table.column(name)
        table = table.set_column(table.column_names.index(name), name, pc.fill_null(col, pa.scalar([], col.type)))
    return table


def suspicion_key(row: dict[str, Any]) -> tuple:
    """Most suspicious first: ever blacklisted, then rejected uploads, rejection rate, blocked uploads."""
    return (-int(row["times_blacklisted"] > 0), -int(row["rejected"]), -float(row["rejection_rate"]),
            -int(row["blocked"]), row["source"])


def sources_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``sources.parquet``: one row per source, ranked by :func:`suspicion_key`."""
    ranked = [{"rank": k, **row} for k, row in enumerate(sorted(rows, key=suspicion_key), start=1)]
    return pa.Table.from_pylist(ranked, schema=SOURCES_SCHEMA)


@dataclass
class AuditResult:
    """Everything the audit found; ``summary`` is ``summary.json``, ``files`` the outputs' URIs."""

    output: str
    summary: dict[str, Any]
    sources: pa.Table  # SOURCES_SCHEMA, sorted by rank
    top_series: list[SourceSeries]
    rates: RateBins  # uploads scored, rejected and blocked over time
    bad_counts: dict[str, int]
    bad_sample: list[BadLine]
    what_if: pa.Table | None
    files: dict[str, str]
