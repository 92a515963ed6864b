"""The batch job's query-detector phase (between phase 1 and Algorithm 2), without Ray.

Phase 1 stores each decoded image's fingerprint in its staging row
(:data:`~twostream.batch.outputs.FINGERPRINT_FIELDS`, computed where the image is decoded,
:func:`twostream.batch.stages.fingerprint_columns`). Here the stateful matching runs once over
the whole run, in the order Algorithm 2 uses, (timestamp, image_id) (ties by shard and row):

- :func:`query_rows` takes a shard's scored rows with a fingerprint (error rows are no query);
- :func:`detect_run` replays them through one :class:`~twostream.core.query_detector.QueryDetector`
  (a :class:`~twostream.core.query_detector.MemoryStore`; rule 3 per Algorithm-2 key, the
  ``reputation.group_by_prefix`` the job passes), starting from the window a previous
  run carried (:data:`WINDOW_SCHEMA`, ``detector/window.parquet`` of its output), and returns the
  detections (:data:`DETECTIONS_SCHEMA`: shard, row, the image ids it matched, closest first)
  and the window to carry on (bounded by ``max_entries`` and ``max_age_s``);
- :func:`apply_detections` turns a shard's detected rows into ``verdict = query_attack`` (label
  and ImageNet index cleared, the streams' evidence kept) with their ``query_matches``, before
  its events go to Algorithm 2 (which counts them as rejections: ``rejected`` is "not
  accepted") and before its images table is written (answer ``query_attack`` unless blocked).

Staging rows keep Algorithm 1's verdict, so a rerun on the same output detects the same rows.
The query id of an image is its image id; one a carried window already holds (an id reused by
an earlier run's upload) is remembered as ``<id>#2`` (``#3``, ...), so a match names the upload.
Events older than the carried window's newest are judged after it (as the endpoint would have).
"""

from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.core.config import PrefixGrouping
from twostream.core.labels import Verdict
from twostream.core.query_detector import Entry, Fingerprint, MemoryStore, QueryDetector, QueryDetectorConfig
from twostream.core.reputation import identity_key

log = logging.getLogger(__name__)

# A shard's queries: its scored rows with a fingerprint.
QUERIES_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("row", pa.int32()), ("image_id", pa.string()), ("source", pa.string()),
    ("timestamp", pa.float64()), ("height", pa.int32()), ("width", pa.int32()),
    ("fp_digest", pa.binary()), ("fp_sample", pa.binary()), ("fp_hashes", pa.binary()),
])
# The order the detector sees queries in (Algorithm 2's, ties by shard and row).
ORDER = [("timestamp", "ascending"), ("image_id", "ascending"), ("shard", "ascending"), ("row", "ascending")]
# The flagged rows: the earlier images each matched (image ids, closest first).
DETECTIONS_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int32()), ("query_matches", pa.list_(pa.string()))])
# The detector's window, oldest first: what the next run starts from.
WINDOW_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("source", pa.string()), ("time", pa.float64()), ("height", pa.int32()),
    ("width", pa.int32()), ("fp_digest", pa.binary()), ("fp_sample", pa.binary()), ("fp_hashes", pa.binary()),
])


class WindowError(ValueError):
    """A carried detector window that cannot be used (not this schema, or another detector config)."""


def window_uri(output: str) -> str:
    """Where a run's output keeps the detector's window."""
    return storage.join(output, "detector", "window.parquet")


def query_rows(staging: pa.Table, shard_index: int) -> pa.Table:
    """A shard's staging rows that are queries (scored, with a fingerprint) as :data:`QUERIES_SCHEMA`."""
    keep = pc.and_(pc.not_equal(staging.column("verdict"), str(Verdict.ERROR)),
                   pc.is_valid(staging.column("fp_digest")))
    rows = staging.filter(keep)
    shard = pa.array(np.full(rows.num_rows, shard_index, np.int32))
    return pa.table([shard, *(rows.column(n) for n in QUERIES_SCHEMA.names[1:])], schema=QUERIES_SCHEMA)


def in_order(queries: pa.Table) -> pa.Table:
    """``queries`` as :data:`QUERIES_SCHEMA` in the detector's :data:`ORDER` (one sorted run of :func:`detect_run`)."""
    table = queries.select(QUERIES_SCHEMA.names).cast(QUERIES_SCHEMA)
    return table.take(pc.sort_indices(table, sort_keys=ORDER))


def _merged(runs: Iterable[pa.Table | Iterable[pa.RecordBatch | pa.Table]]) -> Iterator[dict]:
    """The rows of every run, merged in :data:`ORDER`, one batch of each run held at a time."""
    def rows(run: pa.Table | Iterable[pa.RecordBatch | pa.Table]) -> Iterator[dict]:
        for batch in ([in_order(run)] if isinstance(run, pa.Table) else run):
            yield from batch.to_pylist()

    return heapq.merge(*(rows(run) for run in runs), key=operator.itemgetter(*(name for name, _ in ORDER)))


def _fingerprint(height: int, width: int, digest: bytes, sample: bytes, hashes: bytes) -> Fingerprint:
    return Fingerprint((height, width), digest, np.frombuffer(sample, np.uint8),
                       tuple(int(h) for h in np.frombuffer(hashes, "<i8")))


def _restore(window: pa.Table | None, config: QueryDetectorConfig) -> MemoryStore:
    """A store holding a carried window's entries, oldest first; WindowError when they do not fit
    ``config`` (another sample size or fingerprint length)."""
    store = MemoryStore()
    if window is None:
        return store
    missing = [n for n in WINDOW_SCHEMA.names if n not in window.column_names]
    if missing:
        raise WindowError(f"detector window: missing column(s) {', '.join(missing)}")
    window = window.select(WINDOW_SCHEMA.names).cast(WINDOW_SCHEMA)
    sample_bytes, hash_bytes = config.windows * 6, config.index_windows * 8
    for row in window.to_pylist():
        if len(row["fp_sample"]) != sample_bytes or len(row["fp_hashes"]) != hash_bytes:
            raise WindowError(f"detector window: entry {row['query_id']!r} was made with another detector "
                              f"config ({len(row['fp_sample'])} sample bytes, {len(row['fp_hashes'])} hash bytes; "
                              f"this one: {sample_bytes}, {hash_bytes}); start without --state")
        fp = _fingerprint(row["height"], row["width"], row["fp_digest"], row["fp_sample"], row["fp_hashes"])
        store.add(Entry(row["query_id"], row["source"], row["time"], fp))
    return store


def _window_table(store: MemoryStore) -> pa.Table:
    cols: dict[str, list] = {n: [] for n in WINDOW_SCHEMA.names}
    for e in store:
        fp = e.fingerprint
        for name, value in zip(WINDOW_SCHEMA.names, (e.query_id, e.source, e.time, fp.geometry[0], fp.geometry[1],
                                                     fp.digest, fp.sample.tobytes(),
                                                     np.asarray(fp.hashes, "<i8").tobytes())):
            cols[name].append(value)
    return pa.table(cols, schema=WINDOW_SCHEMA)


def detect_run(runs: Iterable[pa.Table | Iterable[pa.RecordBatch | pa.Table]], window: pa.Table | None,
               config: QueryDetectorConfig, grouping: PrefixGrouping | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """The query detector over a whole run: every query in :data:`ORDER` (timestamp, image_id,
    shard, row), from the carried ``window``, rule 3 counting per Algorithm-2 key under ``grouping``
    (``reputation.group_by_prefix``; the window keeps the raw source ids). ``runs``: each a table
    of queries (sorted here) or batches of :data:`QUERIES_SCHEMA` already in :data:`ORDER` (the
    job's parts, read back a row group at a time); they are merged row by row, so that memory is
    one batch per run and the window, not the run's fingerprints (3.3 kB each). Returns the
    detections (:data:`DETECTIONS_SCHEMA`), the window to carry (:data:`WINDOW_SCHEMA`) and counts
    (queries, exact re-uploads, flagged, carried in and out)."""
    store = _restore(window, config)
    carried = {e.query_id for e in store}
    detector = QueryDetector(config, store, identity_key(grouping))
    out: dict[str, list] = {n: [] for n in DETECTIONS_SCHEMA.names}
    duplicates = queries = 0
    for row in _merged(runs):
        queries += 1
        query_id, k = row["image_id"], 1
        while query_id in carried:  # an id an earlier run's upload had
            k += 1
            query_id = f"{row['image_id']}#{k}"
        fp = _fingerprint(row["height"], row["width"], row["fp_digest"], row["fp_sample"], row["fp_hashes"])
        report, flagged = detector.judge(fp, source=row["source"], query_id=query_id,
                                                      now=row["timestamp"])
        duplicates += report.duplicate_of is not None
        if flagged:
            out["shard"].append(row["shard"])
            out["row"].append(row["row"])
            out["query_matches"].append(list(report.evidence))
    detections = pa.table(out, schema=DETECTIONS_SCHEMA)
    counts = {"queries": queries, "exact_reuploads": duplicates, "query_attacks": detections.num_rows,
              "window_carried_in": len(carried), "window_carried_out": len(store), "min_matches": config.min_matches}
    log.info("query detector: %d queries, %d exact re-uploads, %d flagged; window %d -> %d entries",
             queries, duplicates, detections.num_rows, len(carried), len(store))
    return detections, _window_table(store), counts


def apply_detections(staging: pa.Table, detections: pa.Table) -> pa.Table:
    """A shard's staging rows with its ``detections`` (rows of this shard) made ``query_attack``
    (label and ImageNet index null) and the ``query_matches`` column added (null elsewhere)."""
    matches: dict[int, list[str]] = dict(zip(detections.column("row").to_pylist(),
                                             detections.column("query_matches").to_pylist()))
    rows = staging.column("row").to_pylist()
    hit = pa.array([r in matches for r in rows], pa.bool_())
    if matches:
        for name in ("verdict", "label", "imagenet_index"):
            column = staging.column(name)
            value = pa.scalar(str(Verdict.QUERY_ATTACK) if name == "verdict" else None, column.type)
            staging = staging.set_column(staging.schema.get_field_index(name), name, pc.if_else(hit, value, column))
    return staging.append_column("query_matches", pa.array([matches.get(r) for r in rows], pa.list_(pa.string())))
