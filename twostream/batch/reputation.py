"""The batch job's reputation reduce (phase 2) and responses (phase 3), without Ray.

Algorithm 2 over columnar events. :func:`staging_events` turns a staging table into compact
:data:`EVENTS_SCHEMA` rows (source, timestamp, image_id, rejected, error, shard, row);
:func:`partition` splits events, or the rows of a previous run's sources table (the state), by
``crc32(source) % parts`` (:func:`reputation_shard`, stable across processes and runs), so one
partition holds every event of its sources. :func:`reduce_partition` replays a partition:
one Arrow sort on (source, timestamp, image_id; ties by shard and row), then Algorithm 2 for all sources at once in
NumPy (no Python loop per event or per source: :func:`twostream.core.reputation.scan`), starting from each
source's state when one is given (with ``reputation.forget_default``, rows of the state at CC 0 and not
listed with no event are not carried on); it returns the partition's new :data:`SOURCES_SCHEMA` rows and each
event's (shard, row, cc, blacklisted). :func:`respond` writes a shard's images table from them.

The result equals :func:`twostream.core.reputation.replay` (tests/batch/test_reputation.py),
also when a run starts from the state of a run over the earlier uploads. An event older than
its source's ``last_seen`` in the state cannot be ordered before the state's events: by
default (``late="refuse"``) the reduce fails naming it; ``late="after"`` applies it after them,
as the online endpoint would have.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.batch.outputs import images_table, images_uri
from twostream.core.config import ReputationConfig
from twostream.core.labels import Refusal, Verdict
from twostream.core.reputation import reputation_keys, scan
from twostream.core.sources import SOURCES_SCHEMA

LatePolicy = Literal["refuse", "after"]

# One row per staging row: an Algorithm-2 event, or (``error``) an unreadable input, only counted.
EVENTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("timestamp", pa.float64()),
        ("image_id", pa.string()),
        ("rejected", pa.bool_()),
        ("error", pa.bool_()),
        ("shard", pa.int32()),  # the shard's index in the plan
        ("row", pa.int32()),  # the row's position in its shard's staging table
    ]
)
# Each event's standing after it, by (shard, row): what phase 3 needs to answer it.
RESPONSES_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("row", pa.int32()), ("cc", pa.int32()), ("blacklisted", pa.bool_())]
)
_INTERVAL = SOURCES_SCHEMA.field("blacklist_intervals").type


class StateError(ValueError):
    """A starting state that cannot be used: not a consistent sources table, or not found."""


class LateEventError(StateError):
    """Events older than their source's ``last_seen`` in the starting state."""


def reputation_shard(source: str, shards: int) -> int:
    """Stable shard of a source id (crc32), the same in every process and run."""
    return zlib.crc32(source.encode("utf-8")) % shards


def staging_events(staging: pa.Table, shard_index: int, config: ReputationConfig) -> pa.Table:
    """A staging table's rows as :data:`EVENTS_SCHEMA` rows (error rows flagged, not dropped), each
    under its source's Algorithm-2 key (:func:`twostream.core.reputation.reputation_key`; the images
    table keeps the original source, from the staging rows)."""
    verdict = staging.column("verdict")
    return pa.table(
        {
            "source": reputation_keys(staging.column("source"), config.group_by_prefix),
            "timestamp": staging.column("timestamp"),
            "image_id": staging.column("image_id"),
            "rejected": pc.not_equal(verdict, str(Verdict.ACCEPTED)),
            "error": pc.equal(verdict, str(Verdict.ERROR)),
            "shard": pa.array(np.full(staging.num_rows, shard_index, np.int32)),
            "row": staging.column("row"),
        },
        schema=EVENTS_SCHEMA,
    )


def partition(table: pa.Table, parts: int) -> list[pa.Table]:
    """``table``'s rows split by :func:`reputation_shard` of their ``source`` into ``parts`` tables."""
    encoded = table.column("source").combine_chunks().dictionary_encode()
    by_value = np.array([reputation_shard(s, parts) for s in encoded.dictionary.to_pylist()], np.int64)
    part = by_value[encoded.indices.to_numpy(zero_copy_only=False)] if len(by_value) else np.zeros(0, np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [table.take(order[bounds[p]:bounds[p + 1]]) for p in range(parts)]


def _intervals(
    src: np.ndarray, ts: np.ndarray, listed: np.ndarray, before: np.ndarray, n_sources: int, carried: pa.ListArray
) -> pa.ListArray:
    """Blacklist intervals per source: the carried ones (the state's, the last one closed when
    this run's first change of a listed source is leaving) followed by this run's joins."""
    changes = np.nonzero(listed != before)[0]
    joins = changes[listed[changes]]
    # the change after each join, when it is in the same source, is the join's leave
    k = np.searchsorted(changes, joins) + 1
    has_left = k < len(changes)
    has_left[has_left] = src[changes[k[has_left]]] == src[joins[has_left]]
    left = np.full(len(joins), np.nan)
    left[has_left] = ts[changes[k[has_left]]]
    # a leave that is its source's first change closes the carried open interval
    leaves = changes[~listed[changes]]
    first = np.ones(len(leaves), bool)
    prev = np.searchsorted(changes, leaves) - 1
    first[prev >= 0] = src[changes[prev[prev >= 0]]] != src[leaves[prev >= 0]]
    closing = leaves[first]

    c_offsets = carried.offsets.to_numpy() - carried.offsets[0].as_py()
    c_flat = carried.flatten()
    c_joined = c_flat.field("joined").to_numpy(zero_copy_only=False).copy()
    c_left = c_flat.field("left").fill_null(np.nan).to_numpy(zero_copy_only=False).copy()
    c_src = np.repeat(np.arange(n_sources), np.diff(c_offsets))
    c_left[c_offsets[src[closing] + 1] - 1] = ts[closing]

    owner = np.concatenate([c_src, src[joins]])
    order = np.argsort(owner, kind="stable")  # carried first, then this run's in time order
    joined = np.concatenate([c_joined, ts[joins]])[order]
    left_all = np.concatenate([c_left, left])[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_sources))]).astype(np.int32)
    values = pa.StructArray.from_arrays(
        [pa.array(joined, pa.float64()), pa.array(left_all, pa.float64(), mask=np.isnan(left_all))],
        fields=list(_INTERVAL.value_type),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=_INTERVAL)


def _fresh_state(sources: pa.Array) -> pa.Table:
    """Never-seen sources as :data:`SOURCES_SCHEMA` rows."""
    n = len(sources)
    zeros = pa.array(np.zeros(n, np.int64))
    return pa.table(
        {
            "source": sources, "images": zeros, "rejected": zeros, "blocked": zeros, "errors": zeros,
            "cc": pa.array(np.zeros(n, np.int32)), "blacklisted": pa.array(np.zeros(n, bool)),
            "first_seen": pa.nulls(n, pa.float64()), "last_seen": pa.nulls(n, pa.float64()),
            "blacklist_intervals": pa.array([[]] * n, _INTERVAL),
            "times_blacklisted": pa.array(np.zeros(n, np.int32)),
        },
        schema=SOURCES_SCHEMA,
    )


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-segment sums of ``values`` (segments begin at ``starts``)."""
    return np.add.reduceat(values.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)


def check_state(state: pa.Table) -> pa.Table:
    """A starting state as a :data:`SOURCES_SCHEMA` table; StateError for a missing column, a null
    or duplicate source, or a standing that contradicts its intervals (listed = last one open)."""
    missing = [n for n in SOURCES_SCHEMA.names if n not in state.column_names]
    if missing:
        raise StateError(f"not a sources table: missing column(s) {', '.join(missing)}")
    state = state.select(SOURCES_SCHEMA.names).cast(SOURCES_SCHEMA).combine_chunks()
    source = state.column("source")
    if source.null_count or pc.count_distinct(source).as_py() != state.num_rows:
        raise StateError("sources table: null or duplicate source ids")
    intervals = state.column("blacklist_intervals").chunk(0) if state.num_rows else pa.array([], _INTERVAL)
    ends = intervals.offsets.to_numpy()[1:] - intervals.offsets[0].as_py()
    lengths = np.diff(np.r_[0, ends])
    open_last = np.zeros(state.num_rows, bool)
    has = lengths > 0
    open_last[has] = intervals.flatten().field("left").is_null().to_numpy(zero_copy_only=False)[ends[has] - 1]
    bad = np.flatnonzero(open_last != _col(state, "blacklisted"))
    if len(bad):
        raise StateError(f"sources table: {len(bad)} source(s) whose blacklisted flag contradicts their "
                         f"intervals, e.g. {source[int(bad[0])].as_py()!r}")
    return state


def reduce_partition(
    events: pa.Table, state: pa.Table | None, config: ReputationConfig, late: LatePolicy = "refuse"
) -> tuple[pa.Table, pa.Table]:
    """Algorithm 2 for every source of a partition, from its ``state`` (a :data:`SOURCES_SCHEMA`
    table, rows of other sources ignored) or from zero.

    Returns the partition's sources (every source with an event, an error row or a state row;
    sorted by source) and each event's (shard, row, cc, blacklisted) (:data:`RESPONSES_SCHEMA`).
    """
    events = events.select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
    state = check_state(state if state is not None else SOURCES_SCHEMA.empty_table())
    is_error = _col(events, "error")
    errors = events.filter(pa.array(is_error)).group_by("source").aggregate([("source", "count")])
    scored = events.filter(pa.array(~is_error))

    # sort: source (as a dictionary code), then (timestamp, image_id), ties (one image id sent
    # twice at one time) in input order, (shard, row): whatever order the events arrive in
    encoded = scored.column("source").combine_chunks().dictionary_encode()
    keyed = pa.table({"c": encoded.indices, "t": scored.column("timestamp"), "i": scored.column("image_id"),
                      "s": scored.column("shard"), "r": scored.column("row")})
    order = pc.sort_indices(keyed, sort_keys=[("c", "ascending"), ("t", "ascending"), ("i", "ascending"),
                                              ("s", "ascending"), ("r", "ascending")])
    code = encoded.indices.to_numpy()[order.to_numpy()]
    ts = _col(scored, "timestamp")[order.to_numpy()]
    rejected = _col(scored, "rejected")[order.to_numpy()]
    n = len(code)
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]]) if n else np.zeros(0, np.int64)
    src = np.cumsum(np.r_[False, code[1:] != code[:-1]]) if n else np.zeros(0, np.int64)  # 0..S-1
    pos = np.arange(n) - starts[src]
    names = encoded.dictionary.take(pa.array(code[starts]))

    start_state = _start_states(names, state)

    last_seen = start_state.column("last_seen").fill_null(-np.inf).to_numpy()
    too_old = ts < last_seen[src]
    if late == "refuse" and too_old.any():
        k = int(np.flatnonzero(too_old)[0])
        raise LateEventError(
            f"{int(too_old.sum())} event(s) of {len(np.unique(src[too_old]))} source(s) are older than "
            f"the state's last_seen, e.g. source {names[src[k]].as_py()!r} at {ts[k]} < {last_seen[src[k]]}; "
            "rerun without --state, or set job.late_events=after to apply them after the state")

    step = np.where(rejected, config.step_up, -config.step_down)
    listed0 = _col(start_state, "blacklisted")
    cc, listed = scan(pos, step, _col(start_state, "cc")[src].astype(np.int64), listed0[src], config)
    before = np.empty(n, bool)
    before[1:] = listed[:-1]
    before[starts] = listed0

    ends = np.r_[starts[1:], n] - 1 if n else starts
    count = np.diff(np.r_[starts, n])
    intervals = _intervals(src, ts, listed, before, len(starts), start_state.column("blacklist_intervals").chunk(0)
                           if start_state.num_rows else pa.array([], _INTERVAL))
    first_seen = pc.coalesce(start_state.column("first_seen"), pa.array(ts[starts]))
    updated = pa.table(
        {
            "source": names,
            "images": _col(start_state, "images") + count,
            "rejected": _col(start_state, "rejected") + _sums(rejected, starts),
            "blocked": _col(start_state, "blocked") + _sums(listed, starts),
            "errors": start_state.column("errors"),
            "cc": cc[ends].astype(np.int32),
            "blacklisted": listed[ends],
            "first_seen": first_seen,
            "last_seen": pa.array(ts[ends], pa.float64()),
            "blacklist_intervals": intervals,
            "times_blacklisted": pc.list_value_length(intervals).cast(pa.int32()),
        },
        schema=SOURCES_SCHEMA,
    )
    table = _all_sources(updated, names, state, errors, config)
    responses = pa.table(
        {
            "shard": pa.array(_col(scored, "shard")[order.to_numpy()]),
            "row": pa.array(_col(scored, "row")[order.to_numpy()]),
            "cc": pa.array(cc.astype(np.int32)),
            "blacklisted": pa.array(listed),
        },
        schema=RESPONSES_SCHEMA,
    )
    return table, responses


def _start_states(names: pa.Array, state: pa.Table) -> pa.Table:
    """Each of ``names``' starting state, in their order: its row of ``state``, or a fresh one
    when the state does not know it."""
    at = pc.fill_null(pc.index_in(names, value_set=state.column("source")), -1).to_numpy()
    known = at >= 0
    start_state = pa.concat_tables([state.take(pa.array(at[known])), _fresh_state(names.filter(pa.array(~known)))])
    start_state = start_state.take(pa.array(np.argsort(np.r_[np.flatnonzero(known), np.flatnonzero(~known)])))
    return start_state.combine_chunks()


def _all_sources(updated: pa.Table, names: pa.Array, state: pa.Table, errors: pa.Table,
                 config: ReputationConfig) -> pa.Table:
    """The partition's sources table, sorted by source: the ``updated`` rows of the sources with
    events (``names``); the state's sources without events this run as they were (with
    forget_default, those at the default standing are not carried on); new ones with only errors;
    every source's error rows (``errors``: source, source_count) added to its count."""
    rest = state.filter(pc.invert(pc.is_in(state.column("source"), value_set=names)))
    if config.forget_default:
        rest = rest.filter(pc.or_(pc.greater(rest.column("cc"), 0), rest.column("blacklisted")))
    seen = pa.concat_arrays([names, rest.column("source").combine_chunks()])
    new = errors.column("source").filter(pc.invert(pc.is_in(errors.column("source"), value_set=seen)))
    table = pa.concat_tables([updated, rest, _fresh_state(new.combine_chunks())]).combine_chunks()
    found = pc.index_in(table.column("source"), value_set=errors.column("source"))
    extra = pc.fill_null(pc.take(errors.column("source_count"), found), 0)
    table = table.set_column(4, "errors", pc.add(table.column("errors"), extra))
    return table.sort_by("source")


def respond(staging: pa.Table, responses: pa.Table, output: str, shard: str) -> dict:
    """Write a shard's images table: each staging row (with the query detector's verdicts and
    ``query_matches``, :func:`twostream.batch.detector.apply_detections`) with the (cc,
    blacklisted) of its event in ``responses`` (the shard's :data:`RESPONSES_SCHEMA` rows; error
    rows answer ``error``, query attacks ``query_attack`` unless blocked).
    Returns the shard's counts; fails when an event is missing or answered twice."""
    verdict = staging.column("verdict")
    is_error = pc.equal(verdict, str(Verdict.ERROR)).to_numpy(zero_copy_only=False)
    staged = _col(staging, "row")
    rows = _col(responses, "row")
    size = int(max(staged.max(initial=-1), rows.max(initial=-1))) + 1
    expected = np.zeros(size, np.int64)
    expected[staged[~is_error]] = 1
    if not np.array_equal(np.bincount(rows, minlength=size), expected):
        raise RuntimeError(f"shard {shard}: reputation answers do not match its {staging.num_rows} staging rows")
    cc = np.zeros(size, np.int32)
    listed = np.zeros(size, bool)
    cc[rows] = _col(responses, "cc")
    listed[rows] = _col(responses, "blacklisted")
    cc, listed = cc[staged], listed[staged]
    refusal = pc.if_else(pc.equal(verdict, str(Verdict.QUERY_ATTACK)), str(Refusal.QUERY_ATTACK), str(Refusal.ADVERSARIAL))
    answer = pc.if_else(
        pa.array(listed), str(Refusal.BLOCKED),
        pc.if_else(pc.equal(verdict, str(Verdict.ACCEPTED)), staging.column("label"), refusal))
    answer = pc.if_else(pa.array(is_error), str(Refusal.ERROR), answer).to_pylist()
    images = images_table(staging, answer, pa.array(cc, mask=is_error).to_pylist(),
                          pa.array(listed, mask=is_error).to_pylist())
    storage.write_parquet(images, images_uri(output, shard))
    return {"rows": staging.num_rows, "verdict": Counter(verdict.to_pylist()), "response": Counter(answer)}
