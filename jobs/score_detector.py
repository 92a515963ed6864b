"""The batch job's query-detector phase on Ray, between the image ids and Algorithm 2: every
scored row's fingerprint (computed where it was decoded) matched in (timestamp, image_id) order
(:mod:`twostream.batch.detector`), from the window the ``--state`` run carried
(``detector/window.parquet``). Tasks write the queries as sorted parts; one task (the matching is
sequential) merges them a row group at a time, so its memory does not grow with the run. A
detection becomes verdict ``query_attack``, a rejection for Algorithm 2; the window is written
for the next run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa
import ray

from twostream import storage
from twostream.batch import detector, outputs
from twostream.batch.planning import Shard, shard_chunks
from twostream.core.config import TwoStreamConfig

log = logging.getLogger("twostream.jobs.score")

QUERIES_PER_TASK = 50_000  # staging rows per sorted part of the detector's queries (about 170 MB of fingerprints)
QUERY_ROW_GROUP = 256  # rows per row group of those parts: the detector holds one per part (about 0.9 MB)


def _queries(staging: Sequence[str], indices: Sequence[int], uri: str) -> str:
    """Ray task: some shards' staging rows -> their query detector queries, in the detector's
    order, written to ``uri`` in small row groups (read back one at a time); returns ``uri``."""
    table = pa.concat_tables([detector.query_rows(storage.read_parquet(u), k) for u, k in zip(staging, indices)]
                             or [detector.QUERIES_SCHEMA.empty_table()])
    storage.write_parquet(detector.in_order(table), uri, row_group_size=QUERY_ROW_GROUP)
    return uri


def _detect_task(cfg: TwoStreamConfig, output: str, window: str | None, *parts: str) -> tuple[pa.Table, dict]:
    """Ray task: the query detector over the run (:func:`twostream.batch.detector.detect_run`,
    the parts merged), from the carried window; writes this run's window and removes the parts;
    returns the detections and counts."""
    carried = storage.read_parquet(window) if window else None
    detections, kept, counts = detector.detect_run([storage.iter_parquet(uri, QUERY_ROW_GROUP) for uri in parts], carried,
                                                   cfg.detector.query_config(), cfg.reputation.group_by_prefix)
    storage.write_parquet(kept, detector.window_uri(output))
    for uri in parts:
        storage.remove(uri)
    return detections, counts


def detect(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str) -> tuple[ray.ObjectRef, dict]:
    """Between the image ids and Algorithm 2: the query detector over every shard's queries in
    (timestamp, image_id) order, from the window the ``--state`` run carried: tasks write the
    queries as sorted parts, one task (it is sequential) merges them. Returns the detections
    (an object ref) and the counts."""
    if not cfg.detector.enabled:
        return ray.put(detector.DETECTIONS_SCHEMA.empty_table()), {"enabled": False}
    window = detector.window_uri(cfg.job.state) if cfg.job.state else None
    if window and not storage.exists(window):
        log.info("query detector: --state %s carries no detector window; starting from an empty one", cfg.job.state)
        window = None
    chunks = shard_chunks(shards, QUERIES_PER_TASK)
    queries = ray.remote(num_cpus=0.25)(_queries)
    made = [queries.remote([outputs.staging_uri(output, shards[k].shard_id) for k in c], c,
                           storage.join(output, "detector", "queries", f"part-{n:05d}.parquet"))
            for n, c in enumerate(chunks)]
    detections, counts = ray.remote(num_cpus=1, num_returns=2)(_detect_task).remote(cfg, output, window, *made)
    try:
        return detections, {"enabled": True, **ray.get(counts)}
    except ray.exceptions.RayTaskError as exc:  # a carried window that does not fit: one line
        if isinstance(exc.cause, detector.WindowError):
            raise exc.cause from None
        raise
