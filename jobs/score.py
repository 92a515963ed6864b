"""Batch scoring on Ray: ``python -m jobs.score --input URI --manifest URI --output URI [--config FILE]``.

Run it with ``ray job submit --working-dir . -- python -m jobs.score ...`` on a cluster, or
through ``twostream score`` (which starts a local Ray when none is running). Design, output
schema and resume rules: docs/batch.md. This module is only the Ray wiring of the Ray-free
parts in :mod:`twostream.batch` (planning, stages, reputation, outputs). In short:

Planning, before Ray starts: the manifest read and checked, every input object listed and
  matched (``plan_input``; each shard's entries spooled to ``_progress/entries/``, so the driver
  holds counts, not entries), the run's fingerprint recorded or a changed rerun refused (``resume``).
Phase 1, scoring (Ray Data's public interfaces, streaming, memory bounded by Ray Data's
  backpressure and by bytes per block): work units (:class:`WorkUnits`, a Datasource: one read
  task per unit: read+decode+prepare, taking the streams' input geometry from one Ray task and
  never building a model; only each stream's prepared input travels) -> high-resolution stream
  (actor pool) -> low-resolution stream (actor pool) -> :class:`ShardDatasink`, whose write
  tasks run the comparator and write the rows by shard, committing each shard (staging Parquet
  file, then its ``_progress/<shard>.done`` marker) once all its rows are written.
  Each row carries its image id and its own columns through both pools, so nothing is
  matched by position: pools may return rows in any order (the tests inject stream actors
  that do so on purpose, :class:`Phase1`).
Between them, image ids: every id unique over the input (``twostream.batch.ids``): keys and the
  ids claimed by sidecars or the manifest joined by text (partitioned by crc32, Ray tasks); a
  claim of another input's key, or of an id claimed earlier in (timestamp, key) order, becomes
  an error row in its staging file.
Between them, the query detector (``twostream.batch.detector``): every scored row's fingerprint
  (computed where it was decoded) matched in (timestamp, image_id) order in one task, from the
  window the ``--state`` run carried (``detector/window.parquet``); detections become verdict
  ``query_attack``, a rejection for Algorithm 2, and the window is written for the next run.
Phase 2, reputation: a map/reduce of Ray tasks over columnar events (source, timestamp,
  image_id, rejected, shard, row): map tasks read the staging files and partition the events,
  and the starting state (``--state``: a previous run's ``sources/``), by crc32(source); one
  reduce task per partition runs Algorithm 2 for all its sources at once
  (``twostream.batch.reputation.reduce_partition``, equal to a sequential replay in
  (timestamp, image_id) order) and writes ``sources/part-*.parquet``. Intermediate tables live
  in Ray's object store, which spills to disk; partitions are added to keep one reduce task
  within ``job.reputation_memory_mb``.
Phase 3, final: each shard's staging rows get their Algorithm-2 standing by (shard, row)
  from the reduce tasks' outputs and are written to ``images/<shard>.parquet``; then
  ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import WriteResult

from jobs.ray_cluster import connect
from twostream import storage
from twostream.batch import detector, ids, outputs, reputation, resume, stages
from twostream.batch.manifest import ManifestError, read_manifest
from twostream.batch.planning import InputError, Shard, plan_input, work_units
from twostream.batch.report import write_batch_report
from twostream.core.config import ConfigError, ReputationConfig, TwoStreamConfig, add_config_args, config_from_args

if TYPE_CHECKING:
    from twostream.core.models import InputSpec

log = logging.getLogger("twostream.jobs.score")

# What a user can fix (input, manifest, config, a refused resume): one line, no traceback.
USER_ERRORS = (InputError, ManifestError, ConfigError, resume.ResumeRefused, reputation.StateError,
               detector.WindowError)
EVENTS_PER_MAP_TASK = 100_000  # staging rows one reputation map task reads (about 5 MB of events)
QUERIES_PER_TASK = 50_000  # staging rows per sorted part of the detector's queries (about 170 MB of fingerprints)
QUERY_ROW_GROUP = 256  # rows per row group of those parts: the detector holds one per part (about 0.9 MB)
REDUCE_BYTES_FACTOR = 8  # a reduce task's peak memory / its events' Arrow bytes (benchmarks/scale.py)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20  # decode tasks: larger allocations are mmapped (_return_large_frees_to_the_os)
# The stream actors' OpenMP threads sleep between parallel regions instead of spinning (libgomp's
# default spins): their node's cores are shared with the decode and write tasks and the other
# pool. MobileNetV3 at 224, batches of 16, 2 threads on this loaded 2-core machine: 36 ms of CPU
# per image spinning against 4.0 passive (3.0-3.5 with one thread); see docs/batch.md.
STREAM_ENV = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}

def _return_large_frees_to_the_os() -> None:
    """In this worker process (glibc only): serve allocations over 4 MiB with mmap, so that their
    memory goes back to the OS when freed. glibc raises that threshold after the first such free,
    and a decode task that prepares a large image a strip at a time then keeps freed strips in its
    heap (one 6000x6000 PNG: a peak of +194 MB against up to +281 MB, and 20 MB kept against
    181-229 MB; ``python benchmarks/memory_scaling.py --one-image``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@ray.remote(num_cpus=0, max_calls=1)
def _input_specs(config: TwoStreamConfig) -> dict[str, InputSpec]:
    """Ray task: each stream's input geometry, in a worker process that exits after it. Reading
    the H-Net's geometry builds it through timm (about 190 MB in a process); the decode tasks
    take the geometry from here, so they never import timm."""
    from twostream.core.scoring import input_spec

    return {kind: input_spec(config, kind) for kind in stages.KINDS}


@ray.remote(num_cpus=0, max_calls=1)
def _stream_problem(config: TwoStreamConfig) -> str | None:
    """Ray task, run once the pipeline has failed: the first error of building each stream as its
    actors do (an unknown model name, weights missing or made for another model), as
    ``<kind>.model: ...`` or ``<kind>.weights: ...``; None when both build. Workers report such
    an error as a Ray traceback (an actor's only as text); this names it in one line."""
    from twostream.core.models import UnknownModelError, WeightsError, build_stream

    for kind in stages.KINDS:
        try:
            build_stream(getattr(config, kind), kind)
        except UnknownModelError as exc:
            return f"{kind}.model: {exc}"
        except WeightsError as exc:
            return f"{kind}.weights: {exc}"
    return None


def _fit_resources(cfg: TwoStreamConfig, total_cpus: float) -> dict[str, float]:
    """Per-actor/task CPU requests that fit the cluster (so that decode tasks can still run)."""
    high = cfg.high.num_cpus
    low = cfg.low.num_cpus
    decode = min(cfg.job.decode_num_cpus, max(total_cpus / 2, 0.1))
    compare = cfg.job.compare_num_cpus
    need = cfg.high.pool_size * high + cfg.low.pool_size * low
    room = total_cpus - decode - compare
    if cfg.job.fit_cpus and need > room > 0:
        scale = room / need
        high, low = high * scale, low * scale
        log.warning("scaled stream actor CPU requests by %.2f to fit %s CPUs", scale, total_cpus)
    return {"high": high, "low": low, "decode": decode, "compare": compare}


class WorkUnits(Datasource):
    """Phase 1's input: one read task per work unit (at most ``job.rows_per_task`` entries of one
    shard), each yielding :func:`twostream.batch.stages.read_decode`'s blocks, a row per entry;
    ``specs``: :func:`_input_specs`' result, which the read tasks wait for."""

    def __init__(self, units: Sequence[Shard], config: TwoStreamConfig, specs: ray.ObjectRef) -> None:
        super().__init__()
        self.units, self.config, self.specs = [u.to_json() for u in units], config, specs

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # prepared inputs depend on the models; blocks are bounded by job.decode_bytes_per_batch

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: ray.data.DataContext | None = None) -> list[ReadTask]:
        """One task per work unit, whatever ``parallelism`` Ray Data asks for."""
        return [ReadTask(functools.partial(_read_unit, unit, self.config, self.specs),
                         BlockMetadata(num_rows=Shard.from_json(unit).rows, size_bytes=None,
                                       exec_stats=None, input_files=None))
                for unit in self.units]


def _read_unit(unit: str, config: TwoStreamConfig, specs: ray.ObjectRef) -> Iterator[pa.Table]:
    """A read task: a work unit's blocks (:func:`twostream.batch.stages.read_decode`)."""
    _return_large_frees_to_the_os()
    yield from stages.read_decode(Shard.from_json(unit), config, ray.get(specs))


class ShardDatasink(Datasink):
    """Phase 1's output: each write task runs Algorithm 1 on its rows (:func:`stages.compare`) and
    writes them by shard, committing every shard whose rows are then all written
    (:func:`twostream.batch.outputs.write_rows`: staging rows, then the progress marker);
    completion checks that every shard was committed, commits the shards without rows and sums
    the write tasks' counts (:attr:`rows`, :attr:`stage_ms`)."""

    def __init__(self, config: TwoStreamConfig, output: str, shards: Sequence[Shard]) -> None:
        self.config, self.output = config, output
        self.shards = list(shards)
        self.rows = 0
        self.stage_ms: Counter = Counter()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "shards": []}  # what a write task gets: it needs no plan

    def write(self, blocks: Iterable[Block], ctx: object) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "committed": [], "stage_ms": {}}
        return outputs.write_rows(self.output, stages.compare(pa.concat_tables(tables), self.config),
                                  on_commit=self.committed)

    def committed(self, shard_id: str) -> None:
        """In a write task, after each shard it commits (nothing here; tests inject a sink that
        fails there, as a job killed after K commits)."""

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        self.close(write_result.write_returns)

    def close(self, written: Sequence[dict]) -> None:
        """Commit the shards without rows, fail on any other shard not committed; sum the counts."""
        for r in written:
            self.rows += r["rows"]
            self.stage_ms.update(r["stage_ms"])
        outputs.close_shards(self.output, self.shards)


@dataclass(frozen=True)
class Phase1:
    """What phase 1 runs, as objects: the stream actors' class, the sink's class, and the order the
    shards are scored and reduced in. The job uses the defaults; tests inject subclasses (rows
    permuted, an actor that crashes, a sink that stops after K commits) and a shuffled order."""

    stream: type[stages.StreamStage] = stages.StreamStage
    sink: type[ShardDatasink] = ShardDatasink
    order: Callable[[list], list] = list


def _score(cfg: TwoStreamConfig, todo: Sequence[Shard], output: str, res: dict[str, float],
           parts: Phase1) -> ShardDatasink:
    """Phase 1: the Ray Data pipeline over the shards to do, committed shard by shard."""
    outputs.clear_parts(output)
    sink = parts.sink(cfg, output, todo)
    units = work_units(todo, cfg.job.rows_per_task)
    if not units:
        sink.close([])
        return sink
    # resolved while the actor pools start; the read tasks wait for it
    # as many blocks asked for as there are units: else Ray Data splits each unit's output into
    # more, smaller blocks to reach its default parallelism ("ReadWorkUnits->SplitBlocks(29)")
    ds = ray.data.read_datasource(WorkUnits(units, cfg, _input_specs.remote(cfg)), override_num_blocks=len(units),
                                  num_cpus=res["decode"])
    for kind in stages.KINDS:
        scfg = getattr(cfg, kind)
        ds = ds.map_batches(
            # high: a read task's block per call, as it is (its prepared inputs or pixels are not
            # copied into batches of another size; the actor scores them high.batch_size rows at
            # a time); low: the high pool's blocks, a few kB a row, joined into calls of its own
            # batch size, so it and the sink see fewer, larger blocks. Both at most a work unit,
            # so a shard commits at most that many rows after its last row.
            parts.stream, batch_size=None if kind == "high" else min(scfg.batch_size, cfg.job.rows_per_task),
            batch_format="pyarrow",
            fn_constructor_kwargs={"config": cfg, "kind": kind},
            compute=ray.data.ActorPoolStrategy(size=scfg.pool_size),
            num_cpus=res[kind], num_gpus=scfg.num_gpus or None, runtime_env=STREAM_ENV,
        )
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": res["compare"]})
    except ray.exceptions.RayError:
        problem = ray.get(_stream_problem.remote(cfg))
        if problem:
            raise ConfigError(problem) from None
        raise
    return sink


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


def _detect(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str) -> tuple[ray.ObjectRef, dict]:
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
    per_task = max(1, QUERIES_PER_TASK // max(cfg.job.files_per_shard, 1))
    chunks = [list(range(i, min(i + per_task, len(shards)))) for i in range(0, len(shards), per_task)]
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


def _id_claims(staging: Sequence[str], indices: Sequence[int], parts: int) -> list[pa.Table]:
    """Ray task: some shards' staging rows -> their keys and image-id claims, each split into
    ``parts`` partitions by text (:mod:`twostream.batch.ids`): 2 x ``parts`` tables."""
    pairs = [ids.claims_of(storage.read_parquet(uri).select(["key", "image_id", "timestamp", "row"]), k)
             for uri, k in zip(staging, indices)]
    keys = pa.concat_tables([p[0] for p in pairs] or [ids.KEYS_SCHEMA.empty_table()])
    claims = pa.concat_tables([p[1] for p in pairs] or [ids.CLAIMS_SCHEMA.empty_table()])
    return ids.split(keys, "name", parts) + ids.split(claims, "image_id", parts)


def _id_conflicts(*tables: pa.Table) -> tuple[list[int], pa.Table]:
    """Ray task: one partition's key tables then as many claim tables -> (the shards it refuses
    claims in, those refused claims)."""
    half = len(tables) // 2
    losers = ids.conflicts(pa.concat_tables(tables[:half]), pa.concat_tables(tables[half:]))
    return sorted(set(losers.column("shard").to_pylist())), losers


def _rewrite_losers(output: str, shard_id: str, shard: int, *losers: pa.Table) -> int:
    """Ray task: a shard's staging rows with its refused claims made error rows; returns how many."""
    table = pa.concat_tables(losers)
    table = table.filter(pc.equal(table.column("shard"), shard))
    if table.num_rows:
        uri = outputs.staging_uri(output, shard_id)
        storage.write_parquet(ids.as_error_rows(storage.read_parquet(uri), table), uri)
    return table.num_rows


def _unique_ids(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str) -> int:
    """Between phases 1 and 2: every image id unique over the input (:mod:`twostream.batch.ids`),
    a partitioned join of keys and claims by text in Ray tasks; the refused claimants' staging
    rows rewritten as error rows. Returns how many."""
    parts = max(1, cfg.job.reputation_shards)
    per_task = max(1, EVENTS_PER_MAP_TASK // max(cfg.job.files_per_shard, 1))
    chunks = [list(range(i, min(i + per_task, len(shards)))) for i in range(0, len(shards), per_task)]
    claims = ray.remote(num_cpus=0.25, num_returns=2 * parts)(_id_claims)
    made = [claims.remote([outputs.staging_uri(output, shards[k].shard_id) for k in c], c, parts) for c in chunks]
    conflicts = ray.remote(num_cpus=0.25, num_returns=2)(_id_conflicts)
    decided = [conflicts.remote(*[m[p] for m in made], *[m[parts + p] for m in made]) for p in range(parts)]
    hit = sorted({k for shards_hit in ray.get([d[0] for d in decided]) for k in shards_hit})
    losers = [d[1] for d in decided]
    rewrite = ray.remote(num_cpus=0.25)(_rewrite_losers)
    done = ray.get([rewrite.remote(output, shards[k].shard_id, k, *losers) for k in hit])
    if hit:
        log.info("image ids: %d claims refused (a duplicate or another input's key) in %d shards", sum(done), len(hit))
    return sum(done)


def _state_files(state: str | None, output: str) -> list[str]:
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


def _reputation(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str, state: Sequence[str],
                detections: ray.ObjectRef, order: Callable[[list], list] = list) -> tuple[list, list[dict]]:
    """Phase 2: every shard's events (read in ``order``), and the starting state, are partitioned
    by source; each partition is reduced (Algorithm 2) and writes ``sources/part-N``. Returns, per
    partition, the responses of each shard group (object refs, for phase 3) and the partitions'
    stats."""
    order = order(list(range(len(shards))))
    per_task = max(1, EVENTS_PER_MAP_TASK // max(cfg.job.files_per_shard, 1))
    chunks = [order[i:i + per_task] for i in range(0, len(order), per_task)]
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


def _final(shards: Sequence[Shard], output: str, reduced: list, detections: ray.ObjectRef) -> list[dict]:
    """Phase 3: each shard group's images tables, from the responses of every partition."""
    groups = len(reduced)
    final = ray.remote(num_cpus=0.25)(_finalize)
    tasks = [final.remote(output, [(k, s.shard_id) for k, s in enumerate(shards) if k % groups == g],
                          detections, *[r[g] for r in reduced]) for g in range(groups)]
    by_shard = {k: res for group in ray.get(tasks) for k, res in group}
    return [by_shard[k] for k in range(len(shards))]  # in the order of ``shards``


def run_job(cfg: TwoStreamConfig, input_uri: str, output: str, manifest_uri: str | None = None,
            progress: bool = True, parts: Phase1 = Phase1()) -> dict:
    """Run the three phases against the current Ray cluster; returns the summary dict. ``parts``:
    what phase 1 runs (:class:`Phase1`; tests inject their own)."""
    started = time.perf_counter()
    # Planning first: a bad input, manifest or refused resume fails before Ray is touched.
    manifest_table, manifest_sha256 = read_manifest(manifest_uri) if manifest_uri else (None, None)
    plan = plan_input(input_uri, cfg.job.files_per_shard, manifest_table, spool=outputs.entries_folder(output))
    del manifest_table  # matched: each entry carries its identity
    resume.check_or_record(output, resume.fingerprint(plan, input_uri, manifest_sha256, cfg), plan)
    shards = plan.shards
    state = _state_files(cfg.job.state, output)

    connect(log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Ray Data's default (0) fails the job on the first actor that dies before its constructor
    # ran, which a crash elsewhere in the pool can cause; a replacement is started instead.
    ctx.max_consecutive_actor_init_deaths = cfg.job.actor_init_deaths
    # Ray Data merges a task's small outputs up to this size (128 MiB by default) before storing
    # them: the decode tasks' bound on bytes per block is the one that applies.
    ctx.target_max_block_size = cfg.job.decode_bytes_per_batch
    # Ray Data's default polls each map task's USS (/proc/<pid>/smaps, every second) for its
    # stats: CPU in every stream actor and decode task that no figure of the job uses.
    ctx.memory_usage_poll_interval_s = None
    done = outputs.done_shards(output, shards) if cfg.job.resume else set()
    todo = [s for s in shards if s.shard_id not in done]
    todo = parts.order(todo)
    log.info("%d objects in %d shards, %d shards already done, %d to score",
             plan.rows, len(shards), len(done), len(todo))
    res = _fit_resources(cfg, float(ray.cluster_resources().get("CPU", 1)))

    t0 = time.perf_counter()
    sink = _score(cfg, todo, output, res, parts)
    _unique_ids(cfg, shards, output)
    t1 = time.perf_counter()
    detections, detected = _detect(cfg, shards, output)
    t_detect = time.perf_counter()
    reduced, rep_stats = _reputation(cfg, shards, output, state, detections, parts.order)
    t2 = time.perf_counter()
    finals = _final(shards, output, reduced, detections)
    t3 = time.perf_counter()

    accounting = outputs.account(plan, {s.shard_id: f["rows"] for s, f in zip(shards, finals)})
    summary = outputs.build_summary(
        input_uri=input_uri, manifest_uri=manifest_uri, output=output,
        shards={"total": len(shards), "resumed_done": len(done), "scored_now": len(todo)},
        finals=finals, sources=rep_stats, scored_now=sink.rows, stage_ms=sink.stage_ms,
        wall_s={"total": t3 - started, "scoring": t1 - t0, "detector": t_detect - t1, "reputation": t2 - t_detect,
                "final": t3 - t2},
        detector=detected,
        resources=res, config=cfg.model_dump(mode="json"),
        accounting=accounting, manifest=plan.match.summary() if plan.match is not None else None,
    )
    storage.write_bytes(outputs.summary_uri(output), json.dumps(summary, indent=2).encode())
    write_batch_report(output)  # report.html, from the files just written
    return summary


def with_state(cfg: TwoStreamConfig, state: str | None) -> TwoStreamConfig:
    """``cfg`` with ``job.state`` set to ``state`` (a ``--state`` flag), when given."""
    return cfg.model_copy(update={"job": cfg.job.model_copy(update={"state": state})}) if state else cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="s3:// prefix or local folder of images/tars")
    parser.add_argument("--manifest", help="CSV, JSON Lines or Parquet upload manifest")
    parser.add_argument("--output", required=True, help="s3:// prefix or local folder for results")
    parser.add_argument("--state", help="start reputation from a previous run's output (its sources/) "
                                        "or a sources table (default: job.state, else from zero)")
    add_config_args(parser, "job.files_per_shard=64")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = with_state(config_from_args(args), args.state)
        summary = run_job(cfg, args.input, args.output, args.manifest, progress=not args.no_progress)
    except USER_ERRORS as exc:
        print(f"python -m jobs.score: {exc}", file=sys.stderr)
        return 2
    print(outputs.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
