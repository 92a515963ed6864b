"""The batch job's image-id phase on Ray, between scoring and the query detector: every image id
unique over the input (:mod:`twostream.batch.ids`), a partitioned join of the keys and the ids
claimed by sidecars or the manifest, by text (crc32), in Ray tasks; a claim of another input's
key, or of an id claimed earlier in (timestamp, key) order, becomes an error row in its staging
file."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import ray

from twostream import storage
from twostream.batch import ids, outputs
from twostream.batch.planning import Shard, shard_chunks
from twostream.core.config import TwoStreamConfig

log = logging.getLogger("twostream.jobs.score")

ROWS_PER_TASK = 100_000  # staging rows one claims task reads


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


def unique_ids(cfg: TwoStreamConfig, shards: Sequence[Shard], output: str) -> int:
    """Between phases 1 and 2: every image id unique over the input (:mod:`twostream.batch.ids`),
    a partitioned join of keys and claims by text in Ray tasks; the refused claimants' staging
    rows rewritten as error rows. Returns how many."""
    parts = max(1, cfg.job.reputation_shards)
    chunks = shard_chunks(shards, ROWS_PER_TASK)
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
