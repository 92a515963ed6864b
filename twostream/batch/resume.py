"""Resume that cannot lie: the run's fingerprint, recorded in its output and checked by a rerun.

The fingerprint covers what the rows depend on: the input (every listed object's key, size and
modification time; a tar's own size and time beside its members' offsets and sizes), the manifest
(sha256 of its bytes) and every setting that changes results (:func:`result_settings`: models,
weights (a local weights file's size and time too), thresholds, limits, reputation, the query
detector, the shard
size, the prior state the sources start from and the rule for late events). The first run
records it in ``_progress/plan.json`` and the listing in
``_progress/listing.parquet``; a rerun on the same output with any difference is refused by
:class:`ResumeRefused`, whose message says what changed (``thresholds.p1: 0.1 -> 0.2``,
``input: 1 object changed (a.jpg: size 10 -> 12)``, ``manifest changed``). Settings that do not
change results (batch sizes, pool sizes, threads, devices, progress bars) may differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa

from twostream import storage
from twostream.batch.outputs import plan_uri
from twostream.batch.planning import Plan, Shard
from twostream.core.config import TwoStreamConfig

LISTING_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("size", pa.int64()),
                            ("stamp", pa.string())])
_SHOWN = 5  # changed objects named in a refusal


class ResumeRefused(RuntimeError):
    """The output holds a run over other inputs or settings; the message says what changed."""


def _weights_file(weights: str) -> str | None:
    """A local weights file's size and time (its content may change under the same name)."""
    if os.path.isfile(weights):
        info = os.stat(weights)
        return f"{info.st_size} bytes, mtime {info.st_mtime_ns}"
    return None


def result_settings(cfg: TwoStreamConfig) -> dict[str, Any]:
    """Every setting that changes the rows, flattened to ``section.field``."""
    out: dict[str, Any] = {}
    for kind in ("high", "low"):
        stream = getattr(cfg, kind)
        out[f"{kind}.model"] = stream.model
        out[f"{kind}.weights"] = stream.weights
        out[f"{kind}.top_k"] = stream.top_k
        out[f"{kind}.weights_file"] = _weights_file(stream.weights)
    for section in ("thresholds", "limits", "reputation", "detector"):
        for name, value in getattr(cfg, section).model_dump(mode="json").items():
            out[f"{section}.{name}"] = value
    for name in ("files_per_shard", "state", "late_events"):  # the sources also start from the state
        out[f"job.{name}"] = getattr(cfg.job, name)
    out["job.decode"] = "device" if cfg.decodes_jpeg_on_device() else "cpu"  # nvJPEG's pixels differ by a level or two
    return out


def shard_listing(shard: Shard) -> pa.Table:
    """One row per listed object of a shard (and one for a tar itself): what the input
    fingerprint is made of."""
    cols: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    if shard.kind == "tar":
        size, _, stamp = shard.stamp.partition(":")
        for name, value in (("shard", shard.shard_id), ("key", shard.uri), ("size", int(size or 0)),
                            ("stamp", stamp)):
            cols[name].append(value)
    for entry in shard.load_entries():
        stamp = entry.stamp if shard.kind == "files" else f"@{entry.offset}"
        if entry.sidecar is not None:
            stamp += f"+{entry.sidecar[0]}:{entry.sidecar[3]}"
        cols["shard"].append(shard.shard_id)
        cols["key"].append(entry.key)
        cols["size"].append(entry.size)
        cols["stamp"].append(stamp + (f"!{entry.error}" if entry.error else ""))
    return pa.table(cols, schema=LISTING_SCHEMA)


def listing_table(plan: Plan) -> pa.Table:
    """The whole input's listing (:func:`shard_listing` of every shard)."""
    return pa.concat_tables([shard_listing(s) for s in plan.shards] or [LISTING_SCHEMA.empty_table()])


def fingerprint(plan: Plan, input_uri: str, manifest_sha256: str | None, cfg: TwoStreamConfig) -> dict:
    """The run's fingerprint; the listing is hashed a shard at a time."""
    h = hashlib.sha256()
    objects = 0
    for shard in plan.shards:
        table = shard_listing(shard)
        objects += table.num_rows
        for column in table.columns:
            h.update(b"\0".join(str(v).encode() for v in column.to_pylist()))
            h.update(b"\1")
    return {"input": input_uri, "listing_sha256": h.hexdigest(), "objects": objects,
            "manifest_sha256": manifest_sha256, "settings": result_settings(cfg)}


def _listing_uri(output: str) -> str:
    return storage.join(output, "_progress", "listing.parquet")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def listing_changes(old: pa.Table, new: pa.Table) -> list[str]:
    """What differs between two listings: objects added, removed and changed (first few named)."""
    def keyed(table: pa.Table) -> dict[tuple[str, str], tuple[int, str]]:
        t = table.to_pydict()
        return {(s, k): (z, m) for s, k, z, m in zip(t["shard"], t["key"], t["size"], t["stamp"])}

    before, after = keyed(old), keyed(new)
    added = sorted(k for k in after if k not in before)
    removed = sorted(k for k in before if k not in after)
    changed = sorted(k for k in after if k in before and before[k] != after[k])
    lines = []
    for keys, what in ((added, "added"), (removed, "removed")):
        if keys:
            names = ", ".join(k for _, k in keys[:_SHOWN])
            lines.append(f"input: {_plural(len(keys), 'object')} {what} ({names}{', ...' if len(keys) > _SHOWN else ''})")
    if changed:
        parts = []
        for key in changed[:_SHOWN]:
            (s0, m0), (s1, m1) = before[key], after[key]
            parts.append(f"{key[1]}: size {s0} -> {s1}" if s0 != s1 else f"{key[1]}: modified ({m0} -> {m1})")
        lines.append(f"input: {_plural(len(changed), 'object')} changed ({'; '.join(parts)}"
                     f"{'; ...' if len(changed) > _SHOWN else ''})")
    return lines


def check_or_record(output: str, fp: dict, plan: Plan) -> None:
    """Record the fingerprint in a fresh output, or check a rerun's equals the recorded one;
    raises :class:`ResumeRefused` listing every difference."""
    uri = plan_uri(output)
    if not storage.exists(uri):
        storage.write_parquet_parts(map(shard_listing, plan.shards), LISTING_SCHEMA, _listing_uri(output))
        storage.write_bytes(uri, json.dumps(fp, indent=1, sort_keys=True).encode())
        return
    old = json.loads(storage.read_bytes(uri))
    changes = []
    if old.get("input") != fp["input"]:
        changes.append(f"input: {old.get('input')} -> {fp['input']}")
    if old.get("manifest_sha256") != fp["manifest_sha256"]:
        was, now = old.get("manifest_sha256"), fp["manifest_sha256"]
        changes.append("manifest changed" + ("" if was and now else f" ({'none' if not was else 'given'} -> "
                                                                     f"{'none' if not now else 'given'})"))
    settings = old.get("settings", {})
    for name in sorted(set(settings) | set(fp["settings"])):
        a, b = settings.get(name), fp["settings"].get(name)
        if a != b:
            changes.append(f"{name}: {a} -> {b}")
    if old.get("listing_sha256") != fp["listing_sha256"]:
        previous = storage.read_parquet(_listing_uri(output)) if storage.exists(_listing_uri(output)) else \
            LISTING_SCHEMA.empty_table()
        changes.extend(listing_changes(previous, listing_table(plan)) or ["input listing changed"])
    if changes:
        raise ResumeRefused(f"{output} holds a run over other inputs or settings; use a new --output or "
                            f"delete it. Changed: " + "; ".join(changes))

