"""The batch job's phases 2 and 3 on Ray. Phase 2, reputation: a map/reduce of Ray tasks over
columnar events (source, timestamp, image_id, rejected, shard, row): map tasks read the staging
files (with the query detector's verdicts applied) and partition the events, and the starting
state (``--state``: a previous run's ``sources/``), by crc32(source); one reduce task per
partition runs Algorithm 2 for all its sources at once
(:func:`twostream.batch.reputation.reduce_partition`, equal to a sequential replay in
(timestamp, image_id) order) and writes ``sources/part-*.parquet``. Intermediate tables live in
Ray's object store, which spills to disk; partitions are added to keep one reduce task within
``job.reputation_memory_mb``. Phase 3, final: each shard's staging rows get their Algorithm-2
standing by (shard, row) from the reduce tasks' outputs and are written to
``images/<shard>.parquet``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from twostream import storage
from twostream.batch import detector, outputs, reputation
from twostream.batch.planning import Shard, shard_chunks
from twostream.core.config import ReputationConfig, TwoStreamConfig

log = logging.getLogger("twostream.jobs.score")

EVENTS_PER_MAP_TASK = 100_000  # staging rows one reputation map task reads (about 5 MB of events)
REDUCE_BYTES_FACTOR = 8  # a reduce task's peak memory / its events' Arrow bytes (benchmarks/scale.py)


def _staged(uri: str, k: int, detections: pa.Table) -> pa.Table:
    """Shard ``k``'s staging rows with the query detector's verdicts applied."""
    found = detections.filter(pc.equal(detections.column("shard"), k))
    return detector.apply_detections(storage.read_parquet(uri), found)


def _events(staging: Sequence[str], indices: Sequence[int], detections: pa.Table, rules: ReputationConfig
            ) -> tuple[tuple[int, int], pa.Table]:
    """Ray task: some shards' staging rows -> one events table; returns ((rows, bytes), table)."""
    table = pa.concat_tables([reputation.staging_events(_staged(uri, k, detections), k, rules)
                              for uri, k in zip(staging, indices)])
    return (table.num_rows, table.nbytes), table


def _split(table: pa.Table | str, parts: int) -> list[pa.Table]:
    """Ray task: an events table, or a state file (by URI), split into the reputation partitions."""
    if isinstance(table, str):
        table = storage.read_parquet(table)
    tables = reputation.partition(table, parts)
    return tables if parts > 1 else tables[0]


def _reduce(part: int, n_state: int, groups: int, cfg: TwoStreamConfig, output: str, *tables: pa.Table) -> list:
    """Ray task: one partition (its state tables, then its events tables) -> ``sources/part-N``;
    returns each shard group's responses (shard i is in group i % groups), then the stats."""
    state = pa.concat_tables(tables[:n_state]) if n_state else None
    events = pa.concat_tables(tables[n_state:]) if len(tables) > n_state else reputation.EVENTS_SCHEMA.empty_table()
    sources, responses = reputation.reduce_partition(events, state, cfg.reputation, cfg.job.late_events)
    storage.write_parquet(sources, outputs.sources_uri(output, part))
    group = responses.column("shard").to_numpy() % groups
    stats = {"sources": sources.num_rows, "events": responses.num_rows,
             "blacklisted": pc.sum(sources.column("blacklisted")).as_py() or 0}
    return [responses.filter(group == g) for g in range(groups)] + [stats]


def _finalize(output: str, shards: Sequence[tuple[int, str]], detections: pa.Table,
              *responses: pa.Table) -> list[tuple[int, dict]]:
    """Ray task: a shard group's responses -> the images table of each of its shards; returns
    (shard index, counts) per shard."""
    table = pa.concat_tables(responses)
    table = table.take(pc.sort_indices(table.column("shard")))
    index = table.column("shard").to_numpy()
    results = []
    for k, shard_id in shards:
        lo, hi = np.searchsorted(index, [k, k + 1])
        staging = _staged(outputs.staging_uri(output, shard_id), k, detections)
        results.append((k, reputation.respond(staging, table.slice(lo, hi - lo), output, shard_id)))
    return results


def state_files(state: str | None, output: str) -> list[str]:
    """The Parquet files of the starting state: ``STATE/sources/`` when it is a run's output,
    else ``STATE`` itself (a folder or file of sources tables)."""
    if not state:
        return []
    if storage.is_s3(state) == storage.is_s3(output) and storage.filesystem(state)[1] == storage.filesystem(output)[1]:
        raise reputation.StateError("--state must not be the run's own --output (its sources/ are rewritten)")
    folder = storage.join(state, "sources")
    try:
        files = storage.list_files(folder if storage.exists(folder) else state, (".parquet",))
    except FileNotFoundError:
        files = []
    if not files:
        raise reputation.StateError(f"--state {state}: no sources Parquet files there")
    return files


def _partitions(cfg: TwoStreamConfig, nbytes: int) -> int:
    """Reputation partitions: at least ``job.reputation_shards``, more when one partition's working
    memory (:data:`REDUCE_BYTES_FACTOR` x its events' bytes) would exceed the budget."""
    budget = cfg.job.reputation_memory_mb << 20
    return max(cfg.job.reputation_shards, -(-nbytes * REDUCE_BYTES_FACTOR // budget))


def reputation_phase(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str, state: Sequence[str],
                detections: ray.ObjectRef, order: Callable[[list], list] = list) -> tuple[list, list[dict]]:
    """Phase 2: every shard's events (read in ``order``), and the starting state, are partitioned
    by source; each partition is reduced (Algorithm 2) and writes ``sources/part-N``. Returns, per
    partition, the responses of each shard group (object refs, for phase 3) and the partitions'
    stats."""
    order = order(list(range(len(shards))))
    chunks = shard_chunks(shards, EVENTS_PER_MAP_TASK, order)
    events = ray.remote(num_cpus=0.25, num_returns=2)(_events)
    made = [events.remote([outputs.staging_uri(output, shards[k].shard_id) for k in c], c, detections,
                          cfg.reputation) for c in chunks]
    sizes = ray.get([m[0] for m in made])
    parts = _partitions(cfg, sum(b for _, b in sizes))
    log.info("reputation: %d events in %d partitions, state from %d file(s)", sum(r for r, _ in sizes),
             parts, len(state))
    split = ray.remote(num_cpus=0.25, num_returns=parts)(_split)
    state_parts = [split.remote(uri, parts) for uri in state]
    event_parts = [split.remote(m[1], parts) for m in made]
    if parts == 1:
        state_parts, event_parts = [[r] for r in state_parts], [[r] for r in event_parts]
    reduce = ray.remote(num_cpus=1, num_returns=parts + 1)(_reduce)
    reduced = [reduce.remote(p, len(state), parts, cfg, output,
                             *[s[p] for s in state_parts], *[e[p] for e in event_parts]) for p in range(parts)]
    try:
        stats = ray.get([r[-1] for r in reduced])
    except ray.exceptions.RayTaskError as exc:  # a refused state: the user's error, in one line
        if isinstance(exc.cause, reputation.StateError):
            raise exc.cause from None
        raise
    # by file name: list_files gives absolute paths where a relative --output was given (make demo)
    written = {outputs.sources_uri(output, p).rsplit("/", 1)[-1] for p in range(parts)}
    for uri in storage.list_files(storage.join(output, "sources"), (".parquet",)):
        if uri.rsplit("/", 1)[-1] not in written:  # an earlier run's part (that run had more partitions)
            storage.remove(uri)
    return [r[:-1] for r in reduced], stats


def final_phase(shards: Sequence[Shard], output: str, reduced: list, detections: ray.ObjectRef) -> list[dict]:
    """Phase 3: each shard group's images tables, from the responses of every partition."""
    groups = len(reduced)
    final = ray.remote(num_cpus=0.25)(_finalize)
    tasks = [final.remote(output, [(k, s.shard_id) for k, s in enumerate(shards) if k % groups == g],
                          detections, *[r[g] for r in reduced]) for g in range(groups)]
    by_shard = {k: res for group in ray.get(tasks) for k, res in group}
    return [by_shard[k] for k in range(len(shards))]  # in the order of ``shards``
