"""Batch scoring on Ray: ``python -m jobs.score --input URI --manifest URI --output URI [--config FILE]``.

Run it with ``ray job submit --working-dir . -- python -m jobs.score ...`` on a cluster, or
through ``twostream score`` (which starts a local Ray when none is running). Design, output
schema and resume rules: docs/batch.md. In short:

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
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from twostream import storage
from twostream.batch import pipeline
from twostream.core.config import TwoStreamConfig, build_config, read_config_file

log = logging.getLogger("twostream.jobs.score")

FAULT_STOP_AFTER = "TWOSTREAM_FAULT_STOP_AFTER_SHARDS"  # driver fails after K committed shards
FAULT_CRASH_ACTOR = "TWOSTREAM_FAULT_CRASH_ACTOR_ONCE"  # dir: first high-stream batch kills its actor


class JobSettings(BaseModel):
    """Settings of the batch job itself (the ``job:`` section of the config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    files_per_shard: int = Field(256, gt=0, description="loose files per input shard (unit of resume)")
    decode_batch_size: int = Field(32, gt=0, description="rows per read/decode task batch")
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs per read/decode task")
    compare_num_cpus: float = Field(0.25, gt=0, description="CPUs per comparator task")
    reputation_shards: int = Field(4, gt=0, description="stateful reputation actors (by crc32(source))")
    fit_cpus: bool = Field(True, description="scale actor CPU requests down to fit a small cluster")
    shuffle_stream_output: bool = Field(False, description="testing: pools permute their output rows")
    shard_order_seed: int | None = Field(None, description="testing: shuffle shard order with this seed")
    resume: bool = Field(True, description="skip shards recorded as done in the output")
    actor_init_deaths: int = Field(
        3, ge=-1, description="stream actors that may die while starting before the job fails (-1: no limit)")


class JobConfig(TwoStreamConfig):
    """The scoring config plus the ``job:`` section."""

    job: JobSettings = JobSettings()


# ---------------------------------------------------------------------------------------------
# Stage functions (run in Ray workers; each is a thin wrapper over twostream.batch.pipeline/scoring)
# ---------------------------------------------------------------------------------------------
_MANIFEST_CACHE: dict[str, Any] = {}


def _manifest_index(holder: list) -> Any:
    import ray

    from twostream.batch.manifest import ManifestIndex

    ref = holder[0]
    if ref is None:
        return ManifestIndex(None)
    key = ref.hex()
    if key not in _MANIFEST_CACHE:
        _MANIFEST_CACHE.clear()
        _MANIFEST_CACHE[key] = ManifestIndex(ray.get(ref))
    return _MANIFEST_CACHE[key]


def read_decode_batch(batch: dict, *, input_uri: str, manifest: list, cfg_json: str) -> pa.Table:
    """Shards -> one row per input with the decoded RGB pixels (or the error)."""
    from twostream.core.scoring import decode_many

    cfg = JobConfig.model_validate_json(cfg_json)
    index = _manifest_index(manifest)
    out: dict[str, list] = defaultdict(list)
    for spec in batch["shard"]:
        shard = pipeline.Shard.from_json(str(spec))
        t0 = time.perf_counter()
        rows = pipeline.attach_identity(
            pipeline.read_shard(shard, input_uri, cfg.limits.max_bytes), index
        )
        t1 = time.perf_counter()
        readable = [k for k, r in enumerate(rows) if r["read_error"] is None]
        images, errors = decode_many([rows[k]["data"] for k in readable], cfg.limits)
        t2 = time.perf_counter()
        decoded: list = [None] * len(rows)
        reason = [r["read_error"] for r in rows]
        for k, image, error in zip(readable, images, errors):
            decoded[k], reason[k] = image, error
        n = max(len(rows), 1)
        for k, row in enumerate(rows):
            image = decoded[k]
            out["shard"].append(shard.shard_id)
            out["shard_total"].append(len(rows))
            out["row"].append(k)
            for name in ("image_id", "key", "uri", "source", "timestamp"):
                out[name].append(row[name])
            out["error"].append(reason[k])
            out["height"].append(int(image.shape[0]) if image is not None else None)
            out["width"].append(int(image.shape[1]) if image is not None else None)
            out["pixels"].append(image.tobytes() if image is not None else b"")
            out["t_read_ms"].append((t1 - t0) * 1e3 / n)
            out["t_decode_ms"].append((t2 - t1) * 1e3 / n)
    types = {"pixels": pa.large_binary(), "timestamp": pa.float64(), "height": pa.int32(),
             "width": pa.int32(), "row": pa.int32(), "shard_total": pa.int32()}
    if not out:
        return pa.table({})
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in out.items()})


def _images(table: pa.Table) -> tuple[list[int], list[np.ndarray]]:
    heights = table.column("height").to_pylist()
    widths = table.column("width").to_pylist()
    pixels = table.column("pixels")
    good, images = [], []
    for k, (h, w) in enumerate(zip(heights, widths)):
        if h is not None:
            good.append(k)
            images.append(np.frombuffer(pixels[k].as_buffer(), np.uint8).reshape(h, w, 3).copy())
    return good, images


class _StreamStage:
    """One stream's actor: prepare (its own resize) + forward + top-k, via twostream.core.scoring."""

    kind = "high"
    top_k = 5

    def __init__(self, cfg_json: str) -> None:
        import torch

        from twostream.core.models import build_stream
        from twostream.core.scoring import resolve_device, use_threads

        self.cfg = JobConfig.model_validate_json(cfg_json)
        self.stream_cfg = getattr(self.cfg, self.kind)
        use_threads(self.stream_cfg)
        self.device = resolve_device(self.stream_cfg.device)
        torch.manual_seed(0)  # `random` weights (tests, benchmarks): the same in every actor
        self.stream = build_stream(self.stream_cfg, self.kind).to(self.device).eval()
        self.calls = 0

    def _maybe_crash(self) -> None:
        marker_dir = os.environ.get(FAULT_CRASH_ACTOR)
        if self.kind == "high" and marker_dir and self.calls == 1:
            marker = os.path.join(marker_dir, "crashed")
            if not os.path.exists(marker):
                os.makedirs(marker_dir, exist_ok=True)
                open(marker, "w").close()
                os._exit(1)  # a hard crash: Ray restarts the actor and retries this batch

    def __call__(self, table: pa.Table) -> pa.Table:
        from twostream.core.scoring import prepare, stream_topk

        self.calls += 1
        self._maybe_crash()
        t0 = time.perf_counter()
        good, images = _images(table)
        idx = [None] * table.num_rows
        prob = [None] * table.num_rows
        if images:
            top_i, top_p = stream_topk(
                self.stream, prepare(self.stream, images), self.top_k,
                self.stream_cfg.batch_size, self.device,
            )
            for row, k in enumerate(good):
                idx[k] = top_i[row].tolist()
                prob[k] = top_p[row].tolist()
        elapsed = (time.perf_counter() - t0) * 1e3 / max(table.num_rows, 1)
        table = table.append_column(f"{self.kind}_idx", pa.array(idx, pa.list_(pa.int32())))
        table = table.append_column(f"{self.kind}_prob", pa.array(prob, pa.list_(pa.float32())))
        table = table.append_column(f"t_{self.kind}_ms", pa.array([elapsed] * table.num_rows, pa.float64()))
        if self.kind == "low":
            table = table.drop_columns(["pixels"])
        if self.cfg.job.shuffle_stream_output:
            order = np.random.default_rng(self.calls + os.getpid()).permutation(table.num_rows)
            table = table.take(pa.array(order))
        return table


class HighStage(_StreamStage):
    kind, top_k = "high", 5


class LowStage(_StreamStage):
    kind, top_k = "low", 2


def compare_batch(table: pa.Table, *, cfg_json: str) -> pa.Table:
    """Algorithm 1 (twostream.core.scoring.verdict_columns) over the rows both streams scored."""
    from twostream.core.scoring import ACCEPTED, ADVERSARIAL, ERROR, verdict_columns

    cfg = JobConfig.model_validate_json(cfg_json)
    t0 = time.perf_counter()
    n = table.num_rows
    high_idx = table.column("high_idx").to_pylist()
    low_idx = table.column("low_idx").to_pylist()
    good = [k for k in range(n) if high_idx[k] is not None and low_idx[k] is not None]
    cols: dict[str, list] = {
        "verdict": [ERROR] * n, "label": [None] * n, "imagenet_index": [None] * n,
        "agreement": [0.0] * n, "high_labels": [None] * n, "low_labels": [None] * n,
    }
    if good:
        high_prob = table.column("high_prob").to_pylist()
        low_prob = table.column("low_prob").to_pylist()
        v = verdict_columns(
            np.array([high_idx[k] for k in good], np.int64),
            np.array([high_prob[k] for k in good], np.float32),
            np.array([low_idx[k] for k in good], np.int64),
            np.array([low_prob[k] for k in good], np.float32),
            cfg.thresholds,
        )
        for row, k in enumerate(good):
            verdict = str(v["verdict"][row])
            assert verdict in (ACCEPTED, ADVERSARIAL)
            cols["verdict"][k] = verdict
            cols["label"][k] = v["label"][row]
            index = int(v["imagenet_index"][row])
            cols["imagenet_index"][k] = index if index >= 0 and verdict == ACCEPTED else None
            cols["agreement"][k] = float(v["agreement"][row])
            cols["high_labels"][k] = [str(x) for x in v["high_labels"][row]]
            cols["low_labels"][k] = [str(x) for x in v["low_labels"][row]]
    errors = table.column("error").to_pylist()
    for k in range(n):
        if cols["verdict"][k] == ERROR and errors[k] is None:
            errors[k] = "not scored by both streams"
    data = {name: table.column(name) for name in ("image_id", "key", "uri", "shard", "source",
                                                  "timestamp", "width", "height")}
    data.update(cols)
    for name in ("high_idx", "high_prob", "low_idx", "low_prob"):
        data[name] = table.column(name)
    data["error"] = errors
    data["row"] = table.column("row")
    staging = pipeline.staging_table({k: (v.to_pylist() if hasattr(v, "to_pylist") else v)
                                      for k, v in data.items()})
    elapsed = (time.perf_counter() - t0) * 1e3 / max(n, 1)
    extra = {name: table.column(name) for name in ("shard_total", "t_read_ms", "t_decode_ms",
                                                   "t_high_ms", "t_low_ms")}
    for name, column in extra.items():
        staging = staging.append_column(name, column)
    return staging.append_column("t_compare_ms", pa.array([elapsed] * n, pa.float64()))


# ---------------------------------------------------------------------------------------------
# Phase 2: reputation actors
# ---------------------------------------------------------------------------------------------
class ReputationShard:
    """Holds the Algorithm-2 events of the sources that hash to it; replays them at the end."""

    def __init__(self, part: int, rep_json: str) -> None:
        from twostream.core.config import ReputationConfig

        self.part = part
        self.config = ReputationConfig.model_validate_json(rep_json)
        self.refs: list[tuple[str, int]] = []
        self.uploads: list = []
        self.errors: Counter = Counter()
        self.responses: dict[str, dict[int, tuple]] = {}

    def add(self, shard: str, rows: list[int], uploads: list, error_sources: list[str]) -> int:
        self.refs.extend((shard, r) for r in rows)
        self.uploads.extend(uploads)
        self.errors.update(error_sources)
        return len(rows)

    def finish(self, output: str) -> dict:
        responses, table = pipeline.replay_source_rows(self.uploads, dict(self.errors), self.config)
        for (shard, row), resp in zip(self.refs, responses):
            self.responses.setdefault(shard, {})[row] = (resp.response, resp.cc, resp.blacklisted)
        storage.write_parquet(table, pipeline.sources_uri(output, self.part))
        return {
            "sources": table.num_rows,
            "blacklisted": int(sum(table.column("blacklisted").to_pylist())),
            "events": len(self.uploads),
        }

    def responses_for(self, shard: str) -> dict[int, tuple]:
        return self.responses.get(shard, {})


def _feed(staging: str, shard: str, actors: list, parts: int) -> int:
    import ray

    table = storage.read_parquet(staging)
    rows, uploads = pipeline.uploads_from_staging(table)
    by_part: dict[int, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for row, upload in zip(rows, uploads):
        entry = by_part[pipeline.reputation_shard(upload.source, parts)]
        entry[0].append(row)
        entry[1].append(upload)
    verdicts = table.column("verdict").to_pylist()
    for source, verdict in zip(table.column("source").to_pylist(), verdicts):
        if verdict == pipeline.ERROR_RESPONSE:
            by_part[pipeline.reputation_shard(source, parts)][2].append(source)
    ray.get([actors[p].add.remote(shard, r, u, e) for p, (r, u, e) in by_part.items()])
    return table.num_rows


def _finalize(staging: str, output: str, shard: str, actors: list) -> dict:
    import ray

    table = storage.read_parquet(staging)
    merged: dict[int, tuple] = {}
    for part in ray.get([a.responses_for.remote(shard) for a in actors]):
        merged.update(part)
    rows = table.column("row").to_pylist()
    verdicts = table.column("verdict").to_pylist()
    response, cc, blacklisted = [], [], []
    for row, verdict in zip(rows, verdicts):
        if verdict == pipeline.ERROR_RESPONSE:
            response.append(pipeline.ERROR_RESPONSE)
            cc.append(None)
            blacklisted.append(None)
        else:
            r = merged[row]  # KeyError = a lost event: fail loudly rather than drop it
            response.append(r[0])
            cc.append(r[1])
            blacklisted.append(r[2])
    images = pipeline.images_table(table, response, cc, blacklisted)
    storage.write_parquet(images, pipeline.images_uri(output, shard))
    return {"rows": images.num_rows, "verdict": Counter(verdicts), "response": Counter(response)}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _fit_resources(cfg: JobConfig, total_cpus: float) -> dict[str, float]:
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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("twostream", "ray", "torch", "timm", "pyarrow", "numpy", "pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def run_job(cfg: JobConfig, input_uri: str, output: str, manifest_uri: str | None = None,
            progress: bool = True) -> dict:
    """Run the three phases against the current Ray cluster; returns the summary dict."""
    import ray

    from twostream.batch.manifest import read_manifest

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # Ray Data's default (0) fails the job on the first actor that dies before its constructor
    # ran, which a crash elsewhere in the pool can cause; a replacement is started instead.
    ctx.max_consecutive_actor_init_deaths = cfg.job.actor_init_deaths
    cfg_json = cfg.model_dump_json()

    shards = pipeline.plan_shards(input_uri, cfg.job.files_per_shard)
    digest = pipeline.plan_digest(shards)
    plan_uri = pipeline.plan_uri(output)
    if storage.exists(plan_uri):
        previous = json.loads(storage.read_bytes(plan_uri))
        if previous["digest"] != digest:
            raise RuntimeError(
                f"{output} holds a run over a different input plan; use a new output or delete it"
            )
    else:
        storage.write_bytes(plan_uri, json.dumps(
            {"digest": digest, "input": input_uri, "shards": len(shards)}).encode())
    done = set()
    if cfg.job.resume:
        done = {s.shard_id for s in shards if storage.exists(pipeline.progress_uri(output, s.shard_id))}
    todo = [s for s in shards if s.shard_id not in done]
    if cfg.job.shard_order_seed is not None:
        random.Random(cfg.job.shard_order_seed).shuffle(todo)
    log.info("%d shards, %d already done, %d to score", len(shards), len(done), len(todo))

    manifest_table = read_manifest(manifest_uri) if manifest_uri else None
    manifest_holder = [ray.put(manifest_table) if manifest_table is not None else None]
    res = _fit_resources(cfg, float(ray.cluster_resources().get("CPU", 1)))

    stage_ms: Counter = Counter()
    scored_now = 0
    phase1 = time.perf_counter()
    fault_after = int(os.environ.get(FAULT_STOP_AFTER, "0") or 0)
    faults = {k: v for k, v in os.environ.items() if k.startswith("TWOSTREAM_FAULT_")}
    fault_env = {"runtime_env": {"env_vars": faults}} if faults else {}
    if todo:
        ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            read_decode_batch, batch_size=1, batch_format="numpy", num_cpus=res["decode"],
            fn_kwargs={"input_uri": input_uri, "manifest": manifest_holder, "cfg_json": cfg_json},
        )
        for kind, stage in (("high", HighStage), ("low", LowStage)):
            scfg = getattr(cfg, kind)
            ds = ds.map_batches(
                stage, batch_size=scfg.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={"cfg_json": cfg_json},
                compute=ray.data.ActorPoolStrategy(size=scfg.pool_size),
                num_cpus=res[kind], num_gpus=scfg.num_gpus or None, **fault_env,
            )
        ds = ds.map_batches(compare_batch, batch_size=None, batch_format="pyarrow",
                            num_cpus=res["compare"], fn_kwargs={"cfg_json": cfg_json})
        pending: dict[str, list[pa.Table]] = defaultdict(list)
        counts: Counter = Counter()
        committed = 0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            for name in ("t_read_ms", "t_decode_ms", "t_high_ms", "t_low_ms", "t_compare_ms"):
                stage_ms[name[2:-3]] += float(np.sum(batch.column(name).to_numpy()))
            shard_col = batch.column("shard").to_pylist()
            for shard_id in set(shard_col):
                part = batch.filter(pc.equal(batch.column("shard"), shard_id))
                pending[shard_id].append(part)
                counts[shard_id] += part.num_rows
                total = part.column("shard_total")[0].as_py()
                if counts[shard_id] == total:
                    _commit(output, shard_id, pending.pop(shard_id))
                    scored_now += total
                    committed += 1
                    if fault_after and committed >= fault_after:
                        raise RuntimeError(f"injected fault: stopping after {committed} shards")
                elif counts[shard_id] > total:
                    raise RuntimeError(f"shard {shard_id}: {counts[shard_id]} rows > {total}")
        if pending:
            raise RuntimeError(f"incomplete shards after the scan: {sorted(pending)}")
        for shard in todo:  # shards with no rows at all (e.g. an empty tar)
            if not storage.exists(pipeline.progress_uri(output, shard.shard_id)):
                _commit(output, shard.shard_id, [])
    phase1 = time.perf_counter() - phase1

    # Phase 2: reputation, sharded by source.
    phase2 = time.perf_counter()
    parts = cfg.job.reputation_shards
    Rep = ray.remote(num_cpus=0)(ReputationShard)
    actors = [Rep.remote(p, cfg.reputation.model_dump_json()) for p in range(parts)]
    feed = ray.remote(num_cpus=0.25)(_feed)
    order = list(shards)
    if cfg.job.shard_order_seed is not None:
        random.Random(cfg.job.shard_order_seed + 1).shuffle(order)
    ray.get([feed.remote(pipeline.staging_uri(output, s.shard_id), s.shard_id, actors, parts)
             for s in order])
    rep_stats = ray.get([a.finish.remote(output) for a in actors])
    phase2 = time.perf_counter() - phase2

    # Phase 3: responses into the images output.
    phase3 = time.perf_counter()
    final = ray.remote(num_cpus=0.25)(_finalize)
    results = ray.get([final.remote(pipeline.staging_uri(output, s.shard_id), output, s.shard_id, actors)
                       for s in shards])
    for a in actors:
        ray.kill(a)
    phase3 = time.perf_counter() - phase3

    verdicts: Counter = Counter()
    responses: Counter = Counter()
    rows = 0
    for r in results:
        rows += r["rows"]
        verdicts.update(r["verdict"])
        responses.update(r["response"])
    wall = time.perf_counter() - started
    summary = {
        "input": input_uri,
        "manifest": manifest_uri,
        "output": output,
        "inputs": rows,
        "verdicts": {k: verdicts.get(k, 0) for k in ("accepted", "adversarial", "error")},
        "responses": dict(sorted(responses.items())),
        "counts_add_up": sum(verdicts.values()) == rows == sum(responses.values()),
        "sources": sum(s["sources"] for s in rep_stats),
        "blacklisted_sources": sum(s["blacklisted"] for s in rep_stats),
        "shards": {"total": len(shards), "resumed_done": len(done), "scored_now": len(todo)},
        "throughput": {
            "images_scored_this_run": scored_now,
            "scoring_images_per_s": scored_now / phase1 if phase1 > 0 and scored_now else None,
            "end_to_end_images_per_s": scored_now / wall if scored_now else None,
            # images per second of busy worker time, per stage (one worker's rate)
            "per_stage_images_per_worker_s": {
                k: (scored_now / (v / 1e3) if v > 0 else None) for k, v in sorted(stage_ms.items())
            },
        },
        "wall_s": {"total": wall, "scoring": phase1, "reputation": phase2, "final": phase3},
        "resources": res,
        "config": json.loads(cfg_json),
        "versions": _versions(),
    }
    if not summary["counts_add_up"]:
        raise RuntimeError(f"counts do not add up: {summary}")
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def _commit(output: str, shard_id: str, parts: list[pa.Table]) -> None:
    """Write a shard's staging rows, then (only then) its progress marker."""
    columns = [f.name for f in pipeline.STAGING_SCHEMA]
    if parts:
        table = pa.concat_tables([p.select(columns) for p in parts])
        table = table.sort_by("row")
    else:
        table = pipeline.STAGING_SCHEMA.empty_table()
    storage.write_parquet(table.cast(pipeline.STAGING_SCHEMA), pipeline.staging_uri(output, shard_id))
    storage.write_bytes(pipeline.progress_uri(output, shard_id),
                        json.dumps({"rows": table.num_rows, "at": time.time()}).encode())


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end."""
    v = summary["verdicts"]
    t = summary["throughput"]
    lines = [
        "=" * 64,
        f"twostream batch scoring  ->  {summary['output']}",
        f"inputs {summary['inputs']}: accepted {v['accepted']}, adversarial {v['adversarial']}, "
        f"error {v['error']}  (counts add up: {summary['counts_add_up']})",
        "responses: " + ", ".join(f"{k} {n}" for k, n in summary["responses"].items()),
        f"sources {summary['sources']}, blacklisted {summary['blacklisted_sources']}",
        f"shards {summary['shards']['total']} (already done {summary['shards']['resumed_done']}, "
        f"scored now {summary['shards']['scored_now']})",
    ]
    if t["scoring_images_per_s"]:
        per_stage = ", ".join(f"{k} {v:.0f}/s" for k, v in t["per_stage_images_per_worker_s"].items() if v)
        lines.append(f"throughput: {t['scoring_images_per_s']:.1f} images/s scoring, "
                     f"{t['end_to_end_images_per_s']:.1f} end to end")
        lines.append(f"per worker: {per_stage}")
    w = summary["wall_s"]
    lines.append(f"wall {w['total']:.1f}s (scoring {w['scoring']:.1f}, reputation "
                 f"{w['reputation']:.1f}, final {w['final']:.1f})")
    lines.append("=" * 64)
    return "\n".join(lines)


def load_job_config(path: str | None, overrides: list[str]) -> JobConfig:
    data = read_config_file(path) if path else {}
    return build_config(JobConfig, data, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="s3:// prefix or local folder of images/tars")
    parser.add_argument("--manifest", help="CSV, JSON Lines or Parquet upload manifest")
    parser.add_argument("--output", required=True, help="s3:// prefix or local folder for results")
    parser.add_argument("--config", help="YAML/JSON config (TwoStreamConfig + job: section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_job_config(args.config, args.overrides)
    summary = run_job(cfg, args.input, args.output, args.manifest, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
