"""The audit's outputs: the Parquet schemas, the sinks that stream them, and the result types.

Files under the output folder: ``sources.parquet`` (:data:`SOURCES_SCHEMA`, ranked most
suspicious first), ``timeline.parquet`` (:data:`TIMELINE_SCHEMA`), ``bad_lines.parquet``
(:class:`BadLines`), ``scored_images.parquet`` (:func:`scored_images_table`),
``what_if.parquet`` (:data:`WHAT_IF_SCHEMA`), ``clusters.parquet`` (with ``--images``: the query
detector's clusters of near-identical uploads, :data:`twostream.audit.clusters.CLUSTERS_SCHEMA`),
``summary.json`` and ``report.html``.
``sources.parquet`` is merged from each partition's ranked rows (:class:`SourceRuns`, ordered by
:func:`rank_key`), so that no step holds every source.
:class:`AuditResult` is what :func:`twostream.audit.run.run_audit` returns and the report draws.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from twostream import storage
from twostream.audit.logread import BadLine
from twostream.core.results import ScoredBatch
from twostream.reporting import RateBins, SourceSeries

BAD_SAMPLE = 200  # bad lines kept for the report (all are in bad_lines.parquet)
SOURCES_KEPT = 1000  # top-ranked source rows kept in AuditResult.sources (all are in sources.parquet)
MERGE_ROWS = 1 << 17  # source rows the merge of the partitions' ranked sources holds (a batch of each partition)

TIMELINE_SCHEMA = pa.schema([
    ("line", pa.int64()),  # line (row for Parquet logs) of the upload in the log
    ("source", pa.string()),
    ("timestamp", pa.float64()),  # UTC epoch seconds
    ("image_id", pa.string()),
    ("verdict", pa.string()),  # accepted | adversarial | query_attack | error
    ("label", pa.string()),  # CIFAR-10 label when accepted
    ("cc", pa.int32()),  # the source's counter after this upload (null for error images)
    ("blacklisted", pa.bool_()),  # the source's standing after this upload (null for errors)
    ("response", pa.string()),  # a label, adversarial, query_attack, blocked, or error
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
        self.write_table(pa.Table.from_pydict(columns, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
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


def rank_key(sources: pa.Table) -> pa.Array:
    """Each source row's rank key, most suspicious first: ever blacklisted, then rejected
    uploads, rejection rate, blocked uploads (each descending), then the source name. One binary
    value per row whose byte order is that order (a fixed 25-byte prefix of big-endian fields,
    then the name's UTF-8 bytes), so that sorted runs can be merged by one column."""
    n = sources.num_rows
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    prefix = np.empty(n, np.dtype([("listed", "u1"), ("rejected", ">u8"), ("rate", ">u8"), ("blocked", ">u8")]))
    prefix["listed"] = np.where(sources.column("times_blacklisted").to_numpy() > 0, 0, 1)
    prefix["rejected"] = top - sources.column("rejected").to_numpy().astype(np.uint64)
    rate = -sources.column("rejection_rate").to_numpy().astype(np.float64) + 0.0  # + 0.0: -0.0 -> 0.0
    bits = rate.view(np.uint64)
    prefix["rate"] = np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))
    prefix["blocked"] = top - sources.column("blocked").to_numpy().astype(np.uint64)
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(prefix.itemsize), n, [None, pa.py_buffer(prefix.tobytes())])
    return pc.binary_join_element_wise(fixed.cast(pa.binary()), pc.cast(sources.column("source"), pa.binary()), b"")


class SourceRuns:
    """The per-source rows of each partition, ranked within it (an Arrow file per partition, with
    the :func:`rank_key` column ``key``), merged into the one ranked ``sources.parquet``."""

    def __init__(self, directory: str, partitions: int) -> None:
        self.dir = directory
        self.batch_rows = max(1, MERGE_ROWS // partitions)
        self.paths: dict[int, str] = {}

    def write(self, partition: int, ranked: pa.Table) -> None:
        """Store ``partition``'s rows, sorted by ``key``."""
        path = self.paths[partition] = os.path.join(self.dir, f"sources-{partition:04d}.arrow")
        with pa.OSFile(path, "wb") as handle, pa.ipc.new_file(handle, ranked.schema) as writer:
            writer.write_table(ranked, max_chunksize=self.batch_rows)

    def clean(self, partition: int, clean_rate: float) -> set[str]:
        """The partition's sources with a scored upload and a rejection rate at most ``clean_rate``."""
        if partition not in self.paths:
            return set()
        with pa.OSFile(self.paths[partition]) as handle:
            t = pa.ipc.open_file(handle).read_all().select(["source", "scored", "rejection_rate"])
        ok = pc.and_(pc.greater(t.column("scored"), 0), pc.less_equal(t.column("rejection_rate"), clean_rate))
        return set(t.column("source").filter(ok).to_pylist())

    def merge(self, uri: str, keep: int) -> tuple[pa.Table, dict[str, int]]:
        """Write ``sources.parquet`` (ranked, ``rank`` from 1) by merging the sorted runs a few
        thousand rows of each at a time; the first ``keep`` rows and the counts (``sources``,
        ``ever_blacklisted``, ``blacklisted_at_end``)."""
        sink = ParquetSink(uri, SOURCES_SCHEMA)
        head: list[pa.Table] = []
        counts = {"sources": 0, "ever_blacklisted": 0, "blacklisted_at_end": 0}
        for table in _merge_sorted([self.paths[p] for p in sorted(self.paths)], "key"):
            start = counts["sources"]
            table = table.drop_columns(["key"]).add_column(
                0, "rank", pa.array(np.arange(start + 1, start + 1 + table.num_rows), pa.int32()))
            sink.write_table(table)
            counts["sources"] += table.num_rows
            counts["ever_blacklisted"] += pc.sum(pc.greater(table.column("times_blacklisted"), 0)).as_py() or 0
            counts["blacklisted_at_end"] += pc.sum(pc.cast(table.column("blacklisted"), pa.int64())).as_py() or 0
            if start < keep:
                head.append(table.slice(0, keep - start))
        sink.close()
        return pa.concat_tables(head) if head else SOURCES_SCHEMA.empty_table(), counts


def _merge_sorted(paths: Sequence[str], key: str) -> Iterator[pa.Table]:
    """The rows of Arrow files each sorted by the unique binary ``key``, in ``key`` order, a
    piece at a time: at most one record batch of each file is held. Each round
    emits every held row up to the smallest last key among the files that have more batches."""
    handles = [pa.OSFile(p) for p in paths]
    try:
        readers = [pa.ipc.open_file(h) for h in handles]
        taken = [0] * len(readers)
        held: list[pa.Table | None] = [None] * len(readers)

        def load(r: int) -> None:
            held[r] = None
            while held[r] is None and taken[r] < readers[r].num_record_batches:
                batch = readers[r].get_batch(taken[r])
                taken[r] += 1
                if batch.num_rows:
                    held[r] = pa.Table.from_batches([batch])

        for r in range(len(readers)):
            load(r)
        while True:
            live = [r for r in range(len(readers)) if held[r] is not None]
            if not live:
                return
            more = [r for r in live if taken[r] < readers[r].num_record_batches]
            frontier = min((held[r].column(key)[-1].as_py() for r in more), default=None)
            pieces = []
            for r in live:
                t = held[r]
                n = t.num_rows if frontier is None else \
                    int(pc.sum(pc.less_equal(t.column(key), pa.scalar(frontier, pa.binary()))).as_py() or 0)
                if n:
                    pieces.append(t.slice(0, n))
                if n == t.num_rows:
                    load(r)
                else:
                    held[r] = t.slice(n)
            yield pa.concat_tables(pieces).sort_by(key)
    finally:
        for h in handles:
            h.close()


@dataclass
class AuditResult:
    """Everything the audit found; ``summary`` is ``summary.json``, ``files`` the outputs' URIs."""

    output: str
    summary: dict[str, Any]
    sources: pa.Table  # SOURCES_SCHEMA: the first SOURCES_KEPT ranks (every source is in sources.parquet)
    top_series: list[SourceSeries]
    rates: RateBins  # uploads scored, rejected and blocked over time
    bad_counts: dict[str, int]
    bad_sample: list[BadLine]
    what_if: pa.Table | None
    files: dict[str, str]
    clusters: pa.Table | None = None  # CLUSTERS_SCHEMA (twostream.audit.clusters); None: unavailable
