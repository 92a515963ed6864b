"""Image ids unique over the whole input: duplicates of a claimed id become error rows.

An input's image id is its key (unique by construction, :func:`twostream.batch.planning.
escape_name`) unless its manifest row or its sidecar *claims* another. Claims are only known once
the sidecars are read (phase 1), so they are checked afterwards, over every staging row:

- a claim of an id that is **another input's key** is refused (that name is the other input's:
  its default id, and what a manifest may call it);
- of several inputs claiming **one id**, the first in (timestamp, key) order keeps it.

A refused claimant becomes an error row (``verdict = error``, the reason naming the other input)
under its own key as image id, so every image id in the output is unique: a kept claim is no
other input's key and no other kept claim. The check is a partitioned join by the id's text
(crc32): keys and claims of one text land in one partition (:func:`split`), each partition is
decided alone (:func:`conflicts`), and the losers' staging rows are rewritten
(:func:`as_error_rows`). A rerun decides the same: a loser, once rewritten, claims nothing, and
removing losers from a group never changes its winner.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.core.labels import Verdict

KEYS_SCHEMA = pa.schema([("name", pa.string()), ("shard", pa.int32()), ("row", pa.int32())])
CLAIMS_SCHEMA = pa.schema([("image_id", pa.string()), ("timestamp", pa.float64()), ("key", pa.string()),
                           ("shard", pa.int32()), ("row", pa.int32())])
LOSERS_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int32()), ("reason", pa.string())])
_NULLED = ("width", "height", "label", "imagenet_index", "high_idx", "high_prob", "high_labels",
           "low_idx", "low_prob", "low_labels")


def claims_of(staging: pa.Table, shard: int) -> tuple[pa.Table, pa.Table]:
    """A shard's staging rows -> (every key, the claims: rows whose image id is not their key)."""
    n = staging.num_rows
    shard_col = pa.array(np.full(n, shard, np.int32))
    keys = pa.table({"name": staging.column("key"), "shard": shard_col, "row": staging.column("row")},
                    schema=KEYS_SCHEMA)
    claimed = pc.not_equal(staging.column("image_id"), staging.column("key"))
    claims = pa.table({"image_id": staging.column("image_id"), "timestamp": staging.column("timestamp"),
                       "key": staging.column("key"), "shard": shard_col, "row": staging.column("row")},
                      schema=CLAIMS_SCHEMA).filter(claimed)
    return keys, claims


def _part_of(texts: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    encoded = (texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts).dictionary_encode()
    by_value = np.array([zlib.crc32(v.encode("utf-8", "surrogatepass")) % parts
                         for v in encoded.dictionary.to_pylist()], np.int64)
    return by_value[encoded.indices.to_numpy(zero_copy_only=False)] if len(by_value) else np.zeros(0, np.int64)


def split(table: pa.Table, column: str, parts: int) -> list[pa.Table]:
    """``table``'s rows in ``parts`` tables by crc32 of ``column``'s text."""
    part = _part_of(table.column(column), parts)
    return [table.filter(pa.array(part == p)) for p in range(parts)]


def conflicts(keys: pa.Table, claims: pa.Table) -> pa.Table:
    """The refused claims (:data:`LOSERS_SCHEMA`) among ``claims``, given every key whose text
    may equal one of them (one partition, or the whole input)."""
    claims = claims.combine_chunks()
    owners = {}
    is_key = pc.is_in(claims.column("image_id"), value_set=keys.column("name").combine_chunks())
    if pc.any(is_key).as_py():
        wanted = set(claims.filter(is_key).column("image_id").to_pylist())
        owners = {n: n for n in keys.column("name").to_pylist() if n in wanted}
    out: dict[str, list] = {"shard": [], "row": [], "reason": []}
    order = claims.sort_by([("image_id", "ascending"), ("timestamp", "ascending"), ("key", "ascending")])
    first: dict[str, str] = {}
    for image_id, key, shard, row in zip(*(order.column(c).to_pylist() for c in ("image_id", "key", "shard", "row"))):
        if image_id in owners:
            reason = (f"image id {image_id!r} claimed by its sidecar or manifest row is the key of another input "
                      f"({owners[image_id]}): an input may not take another input's name")
        elif image_id in first:
            reason = (f"image id {image_id!r} claimed by its sidecar or manifest row is also claimed by "
                      f"{first[image_id]}, which keeps it (first in (timestamp, key) order)")
        else:
            first[image_id] = key
            continue
        out["shard"].append(shard)
        out["row"].append(row)
        out["reason"].append(reason)
    return pa.table(out, schema=LOSERS_SCHEMA)


def as_error_rows(staging: pa.Table, losers: pa.Table) -> pa.Table:
    """A shard's staging rows with its ``losers`` (rows of this shard) made error rows: image id =
    key, verdict ``error``, the reason in ``error``, no size or scores (as the scorer's error
    rows have them)."""
    if losers.num_rows == 0:
        return staging
    reasons = dict(zip(losers.column("row").to_pylist(), losers.column("reason").to_pylist()))
    rows = staging.column("row").to_pylist()
    hit = pa.array([r in reasons for r in rows])
    columns = {}
    for name in staging.column_names:
        column = staging.column(name)
        if name == "image_id":
            column = pc.if_else(hit, staging.column("key"), column)
        elif name == "verdict":
            column = pc.if_else(hit, str(Verdict.ERROR), column)
        elif name == "error":
            column = pa.array([reasons.get(r, e) for r, e in zip(rows, column.to_pylist())], pa.string())
        elif name == "agreement":
            column = pc.if_else(hit, 0.0, column)
        elif name in _NULLED:
            column = pc.if_else(hit, pa.scalar(None, column.type), column)
        columns[name] = column
    return pa.table(columns, schema=staging.schema)


def resolve(stagings: Mapping[str, pa.Table]) -> dict[str, pa.Table]:
    """Every shard's staging rows (by shard id) with the refused claims made error rows, in one
    process (the job does the same partitioned, in Ray tasks)."""
    names = list(stagings)
    pairs = [claims_of(stagings[s], k) for k, s in enumerate(names)]
    keys = pa.concat_tables([p[0] for p in pairs] or [KEYS_SCHEMA.empty_table()])
    claims = pa.concat_tables([p[1] for p in pairs] or [CLAIMS_SCHEMA.empty_table()])
    losers = conflicts(keys, claims)
    shard = losers.column("shard").to_numpy()
    return {s: as_error_rows(stagings[s], losers.filter(pa.array(shard == k))) for k, s in enumerate(names)}
