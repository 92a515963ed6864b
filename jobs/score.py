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
Between them, image ids (:mod:`jobs.score_ids`): every id unique over the input; a claim of
  another input's key, or of an id claimed earlier, becomes an error row in its staging file.
Between them, the query detector (:mod:`jobs.score_detector`): every scored row's fingerprint
  matched in (timestamp, image_id) order from the window the ``--state`` run carried; detections
  become verdict ``query_attack``, a rejection for Algorithm 2.
Phase 2, reputation, and phase 3, final (:mod:`jobs.score_reputation`): Algorithm 2 as a
  map/reduce of Ray tasks partitioned by source, from the ``--state`` run's ``sources/``; then
  each shard's rows with their standing in ``images/<shard>.parquet``; then ``summary.json``.
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

import pyarrow as pa
import ray
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import WriteResult

from jobs import score_detector, score_ids, score_reputation
from jobs.ray_cluster import connect
from twostream import storage
from twostream.batch import detector, outputs, reputation, resume, stages
from twostream.batch.manifest import ManifestError, read_manifest
from twostream.batch.planning import InputError, Shard, plan_input, work_units
from twostream.batch.report import write_batch_report
from twostream.core.config import ConfigError, TwoStreamConfig, add_config_args, config_from_args

if TYPE_CHECKING:
    from twostream.core.models import InputSpec

log = logging.getLogger("twostream.jobs.score")

# What a user can fix (input, manifest, config, a refused resume): one line, no traceback.
USER_ERRORS = (InputError, ManifestError, ConfigError, resume.ResumeRefused, reputation.StateError,
               detector.WindowError)
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
    state = score_reputation.state_files(cfg.job.state, output)

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
    score_ids.unique_ids(cfg, shards, output)
    t1 = time.perf_counter()
    detections, detected = score_detector.detect(cfg, shards, output)
    t_detect = time.perf_counter()
    reduced, rep_stats = score_reputation.reputation_phase(cfg, shards, output, state, detections, parts.order)
    t2 = time.perf_counter()
    finals = score_reputation.final_phase(shards, output, reduced, detections)
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
