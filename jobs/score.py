"""Batch scoring on Ray: ``python -m jobs.score --input URI --manifest URI --output URI [--config FILE]``.

Run it with ``ray job submit --working-dir . -- python -m jobs.score ...`` on a cluster, or
through ``twostream score`` (which starts a local Ray when none is running). Design, output
schema and resume rules: docs/batch.md. This module is only the Ray wiring of the Ray-free
parts in :mod:`twostream.batch` (planning, stages, reputation, outputs). In short:

Phase 1, scoring (Ray Data, streaming, memory bounded by Ray Data's backpressure):
  shards -> read+decode (CPU tasks) -> high-resolution stream (actor pool) -> low-resolution
  stream (actor pool) -> comparator (CPU tasks) -> driver sink that writes one staging
  Parquet file per completed input shard, then its ``_progress/<shard>.done`` marker.
  Each row carries its image id and its own columns through both pools, so nothing is
  matched by position: pools may return rows in any order (``job.shuffle_stream_output``
  makes them do so on purpose in the tests).
Phase 2, reputation: small (source, timestamp, image_id, verdict) tuples are sent to
  ``job.reputation_shards`` stateful actors, sharded by crc32(source); each replays its
  sources in (timestamp, image_id) order (``twostream.core.reputation.replay``) and writes
  ``sources/part-*.parquet``.
Phase 3, final: each shard's staging rows get their Algorithm-2 response by (shard, row)
  and are written to ``images/<shard>.parquet``; then ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence

import pyarrow as pa
import ray

from jobs.ray_cluster import connect
from twostream import storage
from twostream.batch import outputs, reputation, stages
from twostream.batch.manifest import ManifestIndex, read_manifest
from twostream.batch.planning import Shard, plan_shards
from twostream.batch.report import write_batch_report
from twostream.core.config import LimitsConfig, TwoStreamConfig, load_config

log = logging.getLogger("twostream.jobs.score")

FAULT_STOP_AFTER = "TWOSTREAM_FAULT_STOP_AFTER_SHARDS"  # driver fails after K committed shards

_MANIFEST_CACHE: dict[str, ManifestIndex] = {}


def _manifest_index(holder: list) -> ManifestIndex:
    """The manifest's index, built once per worker from the object in ``holder`` (or none)."""
    ref = holder[0]
    if ref is None:
        return ManifestIndex(None)
    key = ref.hex()
    if key not in _MANIFEST_CACHE:
        _MANIFEST_CACHE.clear()
        _MANIFEST_CACHE[key] = ManifestIndex(ray.get(ref))
    return _MANIFEST_CACHE[key]


def read_decode_batch(batch: dict, *, input_uri: str, manifest: list, limits: LimitsConfig) -> pa.Table:
    """Ray Data task: a batch of shard specs -> :func:`twostream.batch.stages.read_decode`."""
    shards = [Shard.from_json(str(spec)) for spec in batch["shard"]]
    return stages.read_decode(shards, input_uri, _manifest_index(manifest), limits)


def _feed(staging: str, shard: str, actors: list, parts: int) -> int:
    """Ray task: one shard's staging rows -> the reputation actors of their sources."""
    table = storage.read_parquet(staging)
    split = reputation.split_staging(table, parts)
    ray.get([actors[p].add.remote(shard, *events) for p, events in split.items()])
    return table.num_rows


def _finalize(staging: str, output: str, shard: str, actors: list) -> dict:
    """Ray task: one shard's responses from the actors -> its images table."""
    responses: dict[int, tuple] = {}
    for part in ray.get([a.responses_for.remote(shard) for a in actors]):
        responses.update(part)
    return reputation.respond(storage.read_parquet(staging), responses, output, shard)


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


def _score(cfg: TwoStreamConfig, todo: Sequence[Shard], input_uri: str, output: str,
           manifest_uri: str | None, res: dict[str, float]) -> outputs.ShardSink:
    """Phase 1: the Ray Data pipeline over the shards to do, committed shard by shard."""
    manifest_table = read_manifest(manifest_uri) if manifest_uri else None
    manifest_holder = [ray.put(manifest_table) if manifest_table is not None else None]
    fault_after = int(os.environ.get(FAULT_STOP_AFTER, "0") or 0)
    faults = {k: v for k, v in os.environ.items() if k.startswith("TWOSTREAM_FAULT_")}
    fault_env = {"runtime_env": {"env_vars": faults}} if faults else {}
    sink = outputs.ShardSink(output, stop_after=fault_after)
    if not todo:
        return sink
    ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        read_decode_batch, batch_size=1, batch_format="numpy", num_cpus=res["decode"],
        fn_kwargs={"input_uri": input_uri, "manifest": manifest_holder, "limits": cfg.limits},
    )
    for kind in ("high", "low"):
        scfg = getattr(cfg, kind)
        ds = ds.map_batches(
            stages.StreamStage, batch_size=scfg.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"config": cfg, "kind": kind},
            compute=ray.data.ActorPoolStrategy(size=scfg.pool_size),
            num_cpus=res[kind], num_gpus=scfg.num_gpus or None, **fault_env,
        )
    ds = ds.map_batches(stages.compare, batch_size=None, batch_format="pyarrow",
                        num_cpus=res["compare"], fn_kwargs={"config": cfg})
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        sink.add(batch)
    sink.close(todo)
    return sink


def _reputation(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str) -> tuple[list, list[dict]]:
    """Phase 2: every shard's events to the reputation actors, which replay them; returns the
    actors (holding the responses) and their stats."""
    parts = cfg.job.reputation_shards
    actor = ray.remote(num_cpus=0)(reputation.ReputationShard)
    actors = [actor.remote(p, cfg.reputation) for p in range(parts)]
    feed = ray.remote(num_cpus=0.25)(_feed)
    order = list(shards)
    if cfg.job.shard_order_seed is not None:
        random.Random(cfg.job.shard_order_seed + 1).shuffle(order)
    ray.get([feed.remote(outputs.staging_uri(output, s.shard_id), s.shard_id, actors, parts) for s in order])
    return actors, ray.get([a.finish.remote(output) for a in actors])


def _final(shards: Sequence[Shard], output: str, actors: list) -> list[dict]:
    """Phase 3: the images tables, then the reputation actors are released."""
    final = ray.remote(num_cpus=0.25)(_finalize)
    results = ray.get([final.remote(outputs.staging_uri(output, s.shard_id), output, s.shard_id, actors)
                       for s in shards])
    for a in actors:
        ray.kill(a)
    return results


def run_job(cfg: TwoStreamConfig, input_uri: str, output: str, manifest_uri: str | None = None,
            progress: bool = True) -> dict:
    """Run the three phases against the current Ray cluster; returns the summary dict."""
    started = time.perf_counter()
    connect(log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Ray Data's default (0) fails the job on the first actor that dies before its constructor
    # ran, which a crash elsewhere in the pool can cause; a replacement is started instead.
    ctx.max_consecutive_actor_init_deaths = cfg.job.actor_init_deaths

    shards = plan_shards(input_uri, cfg.job.files_per_shard)
    outputs.record_plan(output, input_uri, shards)
    done = outputs.done_shards(output, shards) if cfg.job.resume else set()
    todo = [s for s in shards if s.shard_id not in done]
    if cfg.job.shard_order_seed is not None:
        random.Random(cfg.job.shard_order_seed).shuffle(todo)
    log.info("%d shards, %d already done, %d to score", len(shards), len(done), len(todo))
    res = _fit_resources(cfg, float(ray.cluster_resources().get("CPU", 1)))

    t0 = time.perf_counter()
    sink = _score(cfg, todo, input_uri, output, manifest_uri, res)
    t1 = time.perf_counter()
    actors, rep_stats = _reputation(cfg, shards, output)
    t2 = time.perf_counter()
    finals = _final(shards, output, actors)
    t3 = time.perf_counter()

    summary = outputs.build_summary(
        input_uri=input_uri, manifest_uri=manifest_uri, output=output,
        shards={"total": len(shards), "resumed_done": len(done), "scored_now": len(todo)},
        finals=finals, sources=rep_stats, scored_now=sink.rows, stage_ms=sink.stage_ms,
        wall_s={"total": t3 - started, "scoring": t1 - t0, "reputation": t2 - t1, "final": t3 - t2},
        resources=res, config=cfg.model_dump(mode="json"),
    )
    storage.write_bytes(outputs.summary_uri(output), json.dumps(summary, indent=2).encode())
    write_batch_report(output)  # report.html, from the files just written
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="s3:// prefix or local folder of images/tars")
    parser.add_argument("--manifest", help="CSV, JSON Lines or Parquet upload manifest")
    parser.add_argument("--output", required=True, help="s3:// prefix or local folder for results")
    parser.add_argument("--config", help="YAML/JSON config (TwoStreamConfig, job: section included)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    summary = run_job(cfg, args.input, args.output, args.manifest, progress=not args.no_progress)
    print(outputs.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
