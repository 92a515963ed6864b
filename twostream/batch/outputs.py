"""What the batch job writes, and where: the pinned Arrow schemas (SPEC 6, docs/batch.md), the
output layout, the staging/images/sources tables, committing a shard (staging rows, then its
progress marker), the accounting of rows against the plan, and the run's summary.

Layout under the output prefix: ``_progress/plan.json`` + ``_progress/listing.parquet`` (the
run's fingerprint, :mod:`twostream.batch.resume`), ``_progress/entries/<shard>.parquet`` (each
shard's planned entries, :func:`twostream.batch.planning.spool_entries`),
``_progress/parts/<shard>/`` (phase 1's write tasks' rows until the shard is committed,
:func:`write_rows`), ``_staging/<shard>.parquet`` + ``_progress/<shard>.done`` (phase 1),
``sources/part-N.parquet`` (phase 2), ``detector/window.parquet`` (the query detector's window,
carried to the next run), ``images/<shard>.parquet`` and ``summary.json`` (phase 3).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.batch import ground_truth
from twostream.batch.planning import Plan, Shard
from twostream.core.labels import Verdict
from twostream.core.results import SCORE_FIELDS
from twostream.core.sources import SOURCES_SCHEMA, source_table  # noqa: F401  (the shared sources table)

# The batch's identity columns, placed after ``image_id`` among the scored columns.
IDENTITY_FIELDS = (
    pa.field("key", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("source", pa.string()),
    pa.field("timestamp", pa.float64()),
)
_ROW_FIELDS = [SCORE_FIELDS[0], *IDENTITY_FIELDS, *SCORE_FIELDS[1:]]
# The query detector's fingerprint of each decoded image (null on error or with the detector off):
# twostream.core.query_detector.Fingerprint's digest, sample and hashes (little-endian int64s).
FINGERPRINT_FIELDS = (
    pa.field("fp_digest", pa.binary()),
    pa.field("fp_sample", pa.binary()),
    pa.field("fp_hashes", pa.binary()),
)
STAGING_SCHEMA = pa.schema(_ROW_FIELDS + [pa.field("row", pa.int32()), *FINGERPRINT_FIELDS])  # row: position in its shard
IMAGES_SCHEMA = pa.schema(
    _ROW_FIELDS
    + [
        # verdict query_attack: the earlier images the detector matched it to, closest first; else null
        pa.field("query_matches", pa.list_(pa.string())),
        pa.field("response", pa.string()),  # Algorithm 2: a label, adversarial, query_attack, blocked, or error
        pa.field("cc", pa.int32()),  # the source's counter after this image (null for errors)
        pa.field("blacklisted", pa.bool_()),  # the source's standing after this image (null for errors)
    ]
)
STAGE_TIMES = ("read", "decode", "high", "low", "compare")  # per-row ``t_<stage>_ms`` columns


# ---------------------------------------------------------------------------------------------
# Output layout
# ---------------------------------------------------------------------------------------------
def staging_uri(output: str, shard_id: str) -> str:
    return storage.join(output, "_staging", f"{shard_id}.parquet")


def progress_uri(output: str, shard_id: str) -> str:
    return storage.join(output, "_progress", f"{shard_id}.done")


def plan_uri(output: str) -> str:
    return storage.join(output, "_progress", "plan.json")


def entries_folder(output: str) -> str:
    """Where planning spools each shard's entries (rewritten by every run's planning)."""
    return storage.join(output, "_progress", "entries")


def images_uri(output: str, shard_id: str) -> str:
    return storage.join(output, "images", f"{shard_id}.parquet")


def sources_uri(output: str, part: int) -> str:
    return storage.join(output, "sources", f"part-{part:05d}.parquet")


def summary_uri(output: str) -> str:
    return storage.join(output, "summary.json")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def staging_table(scored: pa.Table, rows: pa.Table) -> pa.Table:
    """:data:`STAGING_SCHEMA` rows: the scored columns (``ScoredBatch.to_arrow()``) beside the
    identity columns and ``row`` of the same rows, in the same order."""
    columns = [(scored if f.name in scored.column_names else rows).column(f.name) for f in STAGING_SCHEMA]
    return pa.Table.from_arrays(columns, names=STAGING_SCHEMA.names).cast(STAGING_SCHEMA)


def images_table(staging: pa.Table, response: Sequence, cc: Sequence, blacklisted: Sequence) -> pa.Table:
    """A staging table (with the detector's ``query_matches``) plus the Algorithm-2 columns ->
    :data:`IMAGES_SCHEMA` (drops ``row`` and the fingerprint)."""
    table = staging.drop_columns(["row", *(f.name for f in FINGERPRINT_FIELDS)])
    table = table.append_column("response", pa.array([str(r) for r in response], pa.string()))
    table = table.append_column("cc", pa.array(list(cc), pa.int32()))
    table = table.append_column("blacklisted", pa.array(list(blacklisted), pa.bool_()))
    return table.cast(IMAGES_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Phase 1: the plan, and shards committed as their rows arrive
# ---------------------------------------------------------------------------------------------
def done_shards(output: str, shards: Sequence[Shard]) -> set[str]:
    """Ids of the shards whose progress marker exists (committed by an earlier run)."""
    return {s.shard_id for s in shards if storage.exists(progress_uri(output, s.shard_id))}


def commit_shard(output: str, shard_id: str, parts: Sequence[pa.Table], total: int) -> None:
    """Write a shard's staging rows (sorted by ``row``), then (only then) its progress marker;
    raises unless the rows are exactly ``0 .. total-1``, each once."""
    if parts:
        table = pa.concat_tables([p.select(STAGING_SCHEMA.names) for p in parts]).sort_by("row")
    else:
        table = STAGING_SCHEMA.empty_table()
    rows = table.column("row").to_numpy()
    if len(rows) != total or (total and not (rows == range(total)).all()):
        seen = Counter(rows.tolist())
        twice = sorted(r for r, n in seen.items() if n > 1)[:10]
        missing = sorted(set(range(total)) - set(seen))[:10]
        raise RuntimeError(f"shard {shard_id}: {len(rows)} rows for {total} inputs "
                           f"(rows twice: {twice}, missing: {missing})")
    storage.write_parquet(table.cast(STAGING_SCHEMA), staging_uri(output, shard_id))
    storage.write_bytes(progress_uri(output, shard_id),
                        json.dumps({"rows": table.num_rows, "at": time.time()}).encode())


def parts_folder(output: str, shard_id: str | None = None) -> str:
    """Where phase 1's write tasks put a shard's rows before the shard is committed."""
    folder = storage.join(output, "_progress", "parts")
    return storage.join(folder, shard_id) if shard_id is not None else folder


def _part_name(rows: pa.Array) -> str:
    """A part's file name from the rows it holds (first row, count, crc32 of the sorted rows): a
    retried write task writes the same rows under the same name, and the row count is read from
    the names alone."""
    ordered = np.sort(rows.to_numpy())
    return f"r{ordered[0]:09d}-n{len(ordered):09d}-{zlib.crc32(ordered.astype('<i4').tobytes()):08x}.parquet"


def _rows_in(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split("-")[1][1:])


def write_rows(output: str, table: pa.Table, on_commit: Callable[[str], None] | None = None) -> dict:
    """Phase 1's sink, for one write task (any rows, any order): each shard's rows become one part
    file; a shard whose parts then hold all its rows (``shard_total``) is committed
    (:func:`commit_shard`: exactly rows ``0..n-1``, each once). Several tasks may see one shard
    complete at once: each writes the same staging rows. ``on_commit(shard_id)`` follows each
    commit. Returns the rows written, the shards committed here and the summed per-stage times."""
    stage_ms = {stage: pc.sum(table.column(f"t_{stage}_ms")).as_py() or 0.0 for stage in STAGE_TIMES}
    committed = []
    shards = table.column("shard")
    for shard_id in pc.unique(shards).to_pylist():
        part = table.filter(pc.equal(shards, shard_id))
        total = part.column("shard_total")[0].as_py()
        folder = parts_folder(output, shard_id)
        storage.write_parquet(part.select(STAGING_SCHEMA.names).cast(STAGING_SCHEMA),
                              storage.join(folder, _part_name(part.column("row").combine_chunks())))
        names = storage.list_files(folder, (".parquet",))
        held = sum(_rows_in(name) for name in names)
        if held > total:
            raise RuntimeError(f"shard {shard_id}: {held} rows written for {total} inputs ({len(names)} parts)")
        if held == total:
            commit_shard(output, shard_id, [storage.read_parquet(name) for name in names], total)
            committed.append(shard_id)
            if on_commit is not None:
                on_commit(shard_id)
    return {"rows": table.num_rows, "committed": committed, "stage_ms": stage_ms}


def clear_parts(output: str) -> None:
    """Remove the parts an earlier, interrupted run left (its shards are scored again)."""
    try:
        names = storage.list_files(parts_folder(output))
    except FileNotFoundError:
        return
    for name in names:
        storage.remove(name)


def close_shards(output: str, shards: Sequence[Shard]) -> None:
    """After phase 1: fail on a shard that has rows but no commit (naming it); commit the shards
    that had no rows at all (a tar of folders); remove the parts."""
    missing = [s.shard_id for s in shards if s.rows and not storage.exists(progress_uri(output, s.shard_id))]
    if missing:
        raise RuntimeError(f"incomplete shards after the scan: {missing[:10]} ({len(missing)} in all)")
    for shard in shards:
        if not shard.rows and not storage.exists(progress_uri(output, shard.shard_id)):
            commit_shard(output, shard.shard_id, [], 0)
    clear_parts(output)


def account(plan: Plan, written: dict[str, int]) -> dict:
    """The objects listed at planning against the rows written (``written``: rows per shard id);
    raises, naming the shards, when any shard's rows differ from its listed objects."""
    differ = [f"{s.shard_id}: {written.get(s.shard_id, 0)} rows for {s.rows} objects"
              for s in plan.shards if written.get(s.shard_id, 0) != s.rows]
    unknown = sorted(set(written) - {s.shard_id for s in plan.shards})
    summary = {
        "objects_listed": sum(s.listed for s in plan.shards),
        "folders": plan.folders,
        "tar_directories": sum(s.directories for s in plan.shards),
        "sidecars_attached": sum(s.sidecars for s in plan.shards),
        "planned_errors": sum(s.planned_errors for s in plan.shards),
        "rows_expected": plan.rows,
        "rows_written": sum(written.values()),
    }
    if differ or unknown:
        raise RuntimeError(f"rows written differ from the objects listed: {differ[:10]}"
                           + (f"; shards not in the plan: {unknown[:10]}" if unknown else ""))
    return summary


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    out = {}
    for name in ("twostream", "ray", "torch", "timm", "pyarrow", "numpy", "pillow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def build_summary(
    *,
    input_uri: str,
    manifest_uri: str | None,
    output: str,
    shards: dict[str, int],
    finals: Sequence[dict],
    sources: Sequence[dict],
    scored_now: int,
    stage_ms: dict[str, float],
    wall_s: dict[str, float],
    resources: dict[str, float],
    config: dict,
    accounting: dict,
    manifest: dict | None,
    detector: dict | None = None,
) -> dict:
    """The run's summary (``summary.json``); raises if the verdict/response counts do not add up.

    ``finals``: one ``{"rows", "verdict", "response"}`` per shard (Counters); ``sources``: one
    ``{"sources", "blacklisted", "events"}`` per reputation shard; ``wall_s``: total, scoring,
    reputation, final; ``accounting``: :func:`account`'s objects listed against rows written;
    ``manifest``: its rows matched and unmatched (:meth:`twostream.batch.manifest.Match.summary`);
    ``detector``: the query detector's counts (:func:`twostream.batch.detector.detect_run`).
    """
    verdicts: Counter = Counter()
    responses: Counter = Counter()
    rows = 0
    for r in finals:
        rows += r["rows"]
        verdicts.update(r["verdict"])
        responses.update(r["response"])
    scoring_s, total_s = wall_s["scoring"], wall_s["total"]
    summary = {
        "input": input_uri,
        "manifest": manifest_uri,
        "output": output,
        "inputs": rows,
        "verdicts": {str(v): verdicts.get(v, 0) for v in Verdict},
        "responses": {str(k): n for k, n in sorted(responses.items())},
        "counts_add_up": sum(verdicts.values()) == rows == sum(responses.values()) == accounting["rows_expected"],
        "accounting": accounting,
        "manifest_rows": manifest,
        "detector": detector or {"enabled": False},
        "sources": sum(s["sources"] for s in sources),
        "blacklisted_sources": sum(s["blacklisted"] for s in sources),
        "shards": shards,
        "throughput": {
            "images_scored_this_run": scored_now,
            "scoring_images_per_s": scored_now / scoring_s if scoring_s > 0 and scored_now else None,
            "end_to_end_images_per_s": scored_now / total_s if scored_now else None,
            # images per second of busy worker time, per stage (one worker's rate)
            "per_stage_images_per_worker_s": {
                k: (scored_now / (v / 1e3) if v > 0 else None) for k, v in sorted(stage_ms.items())
            },
        },
        "wall_s": wall_s,
        "resources": resources,
        "config": config,
        "versions": versions(),
    }
    if not summary["counts_add_up"]:
        raise RuntimeError(f"counts do not add up: {summary}")
    truth = ground_truth.from_output(manifest_uri, output)  # None unless the manifest names roles
    if truth:
        summary["ground_truth"] = truth
    return summary


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end."""
    v = summary["verdicts"]
    t = summary["throughput"]
    lines = [
        "=" * 64,
        f"twostream batch scoring  ->  {summary['output']}",
        f"inputs {summary['inputs']}: accepted {v['accepted']}, adversarial {v['adversarial']}, "
        f"query_attack {v.get('query_attack', 0)}, error {v['error']}  (counts add up: {summary['counts_add_up']})",
        "responses: " + ", ".join(f"{k} {n}" for k, n in summary["responses"].items()),
        f"objects listed {summary['accounting']['objects_listed']} (sidecars with their file "
        f"{summary['accounting']['sidecars_attached']}, tar folders {summary['accounting']['tar_directories']}): "
        f"rows written {summary['accounting']['rows_written']} of {summary['accounting']['rows_expected']}",
        f"sources {summary['sources']}, blacklisted {summary['blacklisted_sources']}",
        f"shards {summary['shards']['total']} (already done {summary['shards']['resumed_done']}, "
        f"scored now {summary['shards']['scored_now']})",
    ]
    if summary["manifest_rows"]:
        m = summary["manifest_rows"]
        lines.append(f"manifest rows {m['rows']}: matched {m['matched']}, matching no input {m['unmatched']}"
                     + (f" (first: {', '.join(m['unmatched_first'][:3])})" if m["unmatched"] else ""))
    d = summary.get("detector") or {}
    if d.get("enabled"):
        lines.append(f"query detector: {d['queries']} queries, {d['exact_reuploads']} exact re-uploads, "
                     f"{d['query_attacks']} query attacks; window {d['window_carried_in']} entries carried in, "
                     f"{d['window_carried_out']} carried out")
    if summary.get("ground_truth"):
        lines += ground_truth.format_lines(summary["ground_truth"])
    if t["scoring_images_per_s"]:
        per_stage = ", ".join(f"{k} {v:.0f}/s" for k, v in t["per_stage_images_per_worker_s"].items() if v)
        lines.append(f"throughput: {t['scoring_images_per_s']:.1f} images/s scoring, "
                     f"{t['end_to_end_images_per_s']:.1f} end to end")
        lines.append(f"per worker: {per_stage}")
    w = summary["wall_s"]
    lines.append(f"wall {w['total']:.1f}s (scoring {w['scoring']:.1f}, detector {w.get('detector', 0):.1f}, reputation "
                 f"{w['reputation']:.1f}, final {w['final']:.1f})")
    lines.append("=" * 64)
    return "\n".join(lines)
