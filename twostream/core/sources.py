"""The one per-source table of Algorithm 2 (SPEC 6), shared by the batch job, the audit and the
online endpoint: :data:`SOURCES_SCHEMA`, :func:`source_table` (states -> table) and
:func:`source_states` (table -> states), and :func:`read_sources` (a batch run's ``sources/``, a
folder of parts, or one file such as the audit's ``sources.parquet``).

A row is a source's :class:`~twostream.core.reputation.SourceState` plus ``errors`` (inputs of
that source that could not be decoded, not Algorithm-2 events) and ``times_blacklisted`` (the
number of blacklist intervals). :func:`source_states` also reads the audit's ranked
``sources.parquet`` (``scored`` for ``images``, intervals as ``start``/``end``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import pyarrow as pa

from twostream import storage
from twostream.core.reputation import SourceState

SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("images", pa.int64()),  # scored images (Algorithm-2 events)
        ("rejected", pa.int64()),
        ("blocked", pa.int64()),
        ("errors", pa.int64()),  # unreadable inputs (not Algorithm-2 events)
        ("cc", pa.int32()),  # final counter
        ("blacklisted", pa.bool_()),  # final standing
        ("first_seen", pa.float64()),
        ("last_seen", pa.float64()),
        ("blacklist_intervals", pa.list_(pa.struct([("joined", pa.float64()), ("left", pa.float64())]))),
        ("times_blacklisted", pa.int32()),
    ]
)
# Columns every readable sources table has (beside ``images`` or the audit's ``scored``).
_REQUIRED = ("source", "rejected", "blocked", "cc", "blacklisted", "first_seen", "last_seen", "blacklist_intervals")


class SourceRow(NamedTuple):
    """One row of a sources table: the source id, its state, and its undecodable inputs."""

    source: str
    state: SourceState
    errors: int


def source_table(entries: Iterable[tuple[str, SourceState, int]]) -> pa.Table:
    """(source, SourceState, errors) triples -> a table with :data:`SOURCES_SCHEMA`, in the given order."""
    cols: dict[str, list] = {f.name: [] for f in SOURCES_SCHEMA}
    for name, st, errors in entries:
        cols["source"].append(name)
        cols["images"].append(st.images)
        cols["rejected"].append(st.rejected)
        cols["blocked"].append(st.blocked)
        cols["errors"].append(errors)
        cols["cc"].append(st.cc)
        cols["blacklisted"].append(st.blacklisted)
        cols["first_seen"].append(st.first_seen)
        cols["last_seen"].append(st.last_seen)
        cols["blacklist_intervals"].append([{"joined": a, "left": b} for a, b in st.intervals])
        cols["times_blacklisted"].append(len(st.intervals))
    return pa.Table.from_pydict(cols, schema=SOURCES_SCHEMA)


def source_states(table: pa.Table) -> list[SourceRow]:
    """The rows of a sources table (:data:`SOURCES_SCHEMA`, or the audit's ranked form), in order.

    Raises ValueError naming a missing column, a duplicate source id, or a row whose standing
    contradicts its intervals (blacklisted exactly when the last interval is open).
    """
    images = "images" if "images" in table.column_names else "scored"
    missing = [c for c in (*_REQUIRED, images) if c not in table.column_names]
    if missing:
        raise ValueError(f"not a sources table: missing column(s) {', '.join(missing)}")
    cols = table.select([*_REQUIRED, images]).to_pydict()
    errors = table.column("errors").to_pylist() if "errors" in table.column_names else [0] * table.num_rows
    rows: list[SourceRow] = []
    seen: set[str] = set()
    for k, source in enumerate(cols["source"]):
        if source is None or source in seen:
            raise ValueError(f"sources table row {k}: {'null' if source is None else 'duplicate'} source id {source!r}")
        seen.add(source)
        intervals = [list(iv.values()) for iv in cols["blacklist_intervals"][k] or []]
        state = SourceState(
            cc=int(cols["cc"][k]),
            blacklisted=bool(cols["blacklisted"][k]),
            images=int(cols[images][k]),
            rejected=int(cols["rejected"][k]),
            blocked=int(cols["blocked"][k]),
            first_seen=cols["first_seen"][k],
            last_seen=cols["last_seen"][k],
            intervals=intervals,
        )
        if state.blacklisted != bool(intervals and intervals[-1][1] is None):
            raise ValueError(f"source {source!r}: blacklisted={state.blacklisted} but intervals {intervals}")
        rows.append(SourceRow(source, state, int(errors[k] or 0)))
    return rows


def read_sources(uri: str) -> pa.Table:
    """The sources table at ``uri``: one Parquet file, a folder of parts (a batch run's
    ``sources/``), or a batch run's output folder (its ``sources/`` is read)."""
    if not uri.endswith(".parquet") and storage.exists(storage.join(uri, "sources")):
        uri = storage.join(uri, "sources")
    files = storage.list_files(uri, (".parquet",))
    if not files:
        raise FileNotFoundError(f"no Parquet file at {uri}")
    tables = [storage.read_parquet(f) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
