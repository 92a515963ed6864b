"""The replay: the log's good records spilled to disk by source, and Algorithm 2 run over them.

:class:`Spill` keeps the good records (source name, catalogue row, timestamp, line, user agent)
in Arrow files hash-partitioned by source name (:func:`source_partition`), so that memory is
bounded by the largest partition, not by the log nor by its number of sources: nothing is kept
per source across partitions. :func:`replay` is the ONE per-source replay loop (SPEC 3: each
partition sorted by (source, timestamp, image id, line) and fed to
:class:`twostream.core.reputation.ReputationLedger`); the audit reads the timeline and the
per-source rows off it, and :func:`what_if` runs it again under each :class:`WhatIf` setting
(p1/p2 verdicts from the stored top-k, no rescoring). Under ``reputation.group_by_prefix`` a
source name is its Algorithm-2 key (:func:`twostream.core.reputation.reputation_key`, applied in
:meth:`Spill.append`): the replay, the per-source rows and the what-if are per key, the timeline
keeps the logged id.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.audit.catalogue import Catalogue, rejected_for
from twostream.audit.outputs import SOURCES_SCHEMA, WHAT_IF_SCHEMA, SourceRuns, rank_key
from twostream.core.config import ConfigError, PrefixGrouping, ReputationConfig, ThresholdsConfig, TwoStreamConfig
from twostream.core.labels import Refusal, Verdict
from twostream.core.reputation import ReputationLedger, Upload, reputation_keys
from twostream.reporting import SourceSeries

MAX_AGENTS = 5  # distinct user agents kept per source
AGENT_CHARS = 200  # characters kept of a user agent
# source: the Algorithm-2 key (reputation_key); sent_by: the logged id where it differs (else null)
SPILL_SCHEMA = pa.schema([("source", pa.string()), ("img", pa.int32()), ("ts", pa.float64()),
                          ("line", pa.int64()), ("user_agent", pa.string()), ("sent_by", pa.string())])
_NO_INTERVALS: tuple = ()  # shared by the sources never blacklisted
_REPLAY_ORDER = [("source", "ascending"), ("ts", "ascending"), ("img", "ascending"), ("line", "ascending")]


# ---------------------------------------------------------------------------------------------
# Spill files: good log records, hash-partitioned by source
# ---------------------------------------------------------------------------------------------
def source_partition(names: pa.Array, partitions: int) -> np.ndarray:
    """The partition of each source name: CRC-32 of its UTF-8 bytes modulo ``partitions`` (the same
    in every run, so a source's records all land in one partition)."""
    if partitions == 1:
        return np.zeros(len(names), np.int64)
    encoded = pc.dictionary_encode(names)
    distinct = encoded.dictionary.cast(pa.binary()).to_pylist()
    crc = np.fromiter((zlib.crc32(v) for v in distinct), np.int64, len(distinct))
    return (crc % partitions)[encoded.indices.to_numpy()]


class Spill:
    """Good records in ``partitions`` Arrow files under ``directory``, a source's all in one file;
    with ``grouping`` (``reputation.group_by_prefix``) a source is its Algorithm-2 key, the logged
    id kept beside it for the timeline."""

    def __init__(self, directory: str, partitions: int, grouping: PrefixGrouping | None = None) -> None:
        self.dir = directory
        self.partitions = partitions
        self.grouping = grouping
        self.writers: list[pa.ipc.RecordBatchFileWriter | None] = [None] * partitions
        self.rows = np.zeros(partitions, np.int64)

    def path(self, p: int) -> str:
        return os.path.join(self.dir, f"part-{p:04d}.arrow")

    def append(self, source: pa.Array, img: np.ndarray, ts: np.ndarray, line: np.ndarray,
               user_agent: pa.Array | None) -> None:
        """Spill one block's good records (the user agents cut to AGENT_CHARS, empty ones as null)."""
        n = len(line)
        if user_agent is None:
            agents = pa.nulls(n, pa.string())
        else:
            cut = pc.utf8_slice_codeunits(user_agent, 0, AGENT_CHARS)
            agents = pc.if_else(pc.equal(cut, ""), pa.scalar(None, pa.string()), cut)
        if self.grouping is None:
            sent_by = pa.nulls(n, pa.string())
        else:
            key = reputation_keys(source, self.grouping)
            sent_by = pc.if_else(pc.equal(key, source), pa.scalar(None, pa.string()), source)
            source = key
        table = pa.table([source, pa.array(img, pa.int32()), pa.array(ts, pa.float64()),
                          pa.array(line, pa.int64()), agents, sent_by], schema=SPILL_SCHEMA)
        part = source_partition(source, self.partitions)
        if self.partitions > 1:
            order = np.argsort(part, kind="stable")
            table, part = table.take(pa.array(order)), part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            if self.writers[p] is None:
                self.writers[p] = pa.ipc.new_file(self.path(p), SPILL_SCHEMA)
            self.writers[p].write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))
            self.rows[p] += bounds[p + 1] - bounds[p]

    def close(self) -> None:
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def partitions_sorted(self) -> Iterator[tuple[int, pa.Table]]:
        """(partition, its records sorted by (source, timestamp, image id, line)), one at a time."""
        for p in range(self.partitions):
            if not self.rows[p]:
                continue
            with pa.OSFile(self.path(p)) as handle:
                table = pa.ipc.open_file(handle).read_all()
            yield p, table.sort_by(_REPLAY_ORDER)


# ---------------------------------------------------------------------------------------------
# The replay
# ---------------------------------------------------------------------------------------------
@dataclass
class ReplayedPartition:
    """One partition after Algorithm 2: per upload (in replay order) the state after it."""

    index: int  # the partition
    records: pa.Table  # SPILL_SCHEMA, sorted
    ts: np.ndarray  # float64
    img: np.ndarray  # int32: catalogue row
    starts: np.ndarray  # int64: first upload of each source (in name order); one more entry: the end
    names: list[str]  # each source's name
    error: np.ndarray  # bool: not an Algorithm-2 event
    rejected: np.ndarray  # bool
    label: np.ndarray  # object: the stored label
    cc: np.ndarray  # int32 (0 on error rows)
    blacklisted: np.ndarray  # bool (False on error rows)
    response: np.ndarray  # object: a label, adversarial, blocked or error
    # each source's final state (counts 0 if it had only error images)
    src_rejected: np.ndarray  # int64
    src_blocked: np.ndarray  # int64
    src_cc: np.ndarray  # int32
    src_blacklisted: np.ndarray  # bool
    src_intervals: list[Sequence[list[float | None]]]  # blacklist intervals [start, end or None]

    def span(self, k: int) -> tuple[str, int, int]:
        """(name, start, end) of the ``k``-th source's run of uploads."""
        return self.names[k], int(self.starts[k]), int(self.starts[k + 1])

    def timeline(self, verdict: np.ndarray, ids: pa.Array) -> dict[str, Any]:
        """The timeline rows (TIMELINE_SCHEMA) given each catalogue row's ``verdict`` and id."""
        img, err = self.img, self.error
        return {
            "line": self.records.column("line"),
            "source": pc.coalesce(self.records.column("sent_by"), self.records.column("source")),  # as logged
            "timestamp": self.ts,
            "image_id": pc.take(ids, pa.array(img)), "verdict": verdict[img].tolist(),
            "label": [lab if not rj and not er else None for lab, rj, er in zip(self.label, self.rejected, err)],
            "cc": pa.array(self.cc, pa.int32(), mask=err),
            "blacklisted": pa.array(self.blacklisted, pa.bool_(), mask=err),
            "response": self.response.tolist(),
        }

    def sources(self) -> pa.Table:
        """The sources.parquet rows (SOURCES_SCHEMA less rank) of this partition's sources, in
        name order, with their rank ``key`` (:func:`twostream.audit.outputs.rank_key`)."""
        starts, ends = self.starts[:-1], self.starts[1:]
        uploads = ends - starts
        errors = np.add.reduceat(self.error.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        scored = uploads - errors
        last_seen = self.ts[ends - 1]
        cols: dict[str, list] = {n: [] for n in ("blacklist_intervals", "times_blacklisted", "blacklisted_seconds",
                                                  "final_standing")}
        for intervals, listed, last in zip(self.src_intervals, self.src_blacklisted.tolist(), last_seen.tolist()):
            cols["blacklist_intervals"].append([{"start": x, "end": y} for x, y in intervals])
            cols["times_blacklisted"].append(len(intervals))
            cols["blacklisted_seconds"].append(float(sum(((y if y is not None else last) - x) for x, y in intervals)))
            cols["final_standing"].append("blacklisted" if listed else "released" if intervals else "clean")
        rejected = self.src_rejected
        table = pa.table({
            "source": pa.array(self.names, pa.string()), "uploads": uploads, "scored": scored, "rejected": rejected,
            "errors": errors, "blocked": self.src_blocked,
            "rejection_rate": np.where(scored > 0, rejected / np.maximum(scored, 1), 0.0),
            "first_seen": self.ts[starts], "last_seen": last_seen,
            **{n: cols[n] for n in ("blacklist_intervals", "times_blacklisted", "blacklisted_seconds")},
            "cc": self.src_cc, "blacklisted": self.src_blacklisted, "final_standing": cols["final_standing"],
            "user_agents": self._agents(),
        }, schema=pa.schema([f for f in SOURCES_SCHEMA if f.name != "rank"]))
        return table.append_column("key", rank_key(table))

    def _agents(self) -> pa.Array:
        """Each source's first MAX_AGENTS distinct user agents in log order, sorted."""
        n = len(self.names)
        code = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.starts))
        seen = pa.table({"s": code, "line": self.records.column("line"), "ua": self.records.column("user_agent")})
        seen = seen.filter(pc.is_valid(seen.column("ua")))
        first = seen.group_by(["s", "ua"], use_threads=False).aggregate([("line", "min")])
        first = first.sort_by([("s", "ascending"), ("line_min", "ascending")])
        s = first.column("s").to_numpy()
        group_start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
        rank = np.arange(len(s)) - np.repeat(group_start, np.diff(np.r_[group_start, len(s)]))
        kept = first.filter(pa.array(rank < MAX_AGENTS)).sort_by([("s", "ascending"), ("ua", "ascending")])
        offsets = np.r_[0, np.cumsum(np.bincount(kept.column("s").to_numpy(), minlength=n))].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), kept.column("ua").combine_chunks())

    def series(self, k: int, threshold: int) -> SourceSeries:
        """The CC after each scored upload of the ``k``-th source, for the report's plot."""
        name, a, e = self.span(k)
        sel = np.arange(a, e)[~self.error[a:e]]
        intervals = [[x, y] for x, y in self.src_intervals[k]]
        return SourceSeries(name, self.ts[sel].copy(), self.cc[sel].copy(), intervals, threshold)


def replay_partition(index: int, records: pa.Table, cat: Catalogue, rejected: np.ndarray,
                     reputation: ReputationConfig) -> ReplayedPartition:
    """Algorithm 2 over one partition's sorted records (a source lives in one partition).

    ``rejected`` is per catalogue row; error images leave the state unchanged (response ``error``);
    a rejected query attack (the query detector's verdict) is answered ``query_attack``.
    Each source's final state is kept in the ``src_*`` arrays and dropped from the ledger once its
    uploads are replayed, so that the ledger holds one source at a time.
    """
    img = records.column("img").to_numpy()
    ts = records.column("ts").to_numpy()
    m = len(img)
    source = records.column("source").combine_chunks()
    change = np.flatnonzero(np.asarray(pc.not_equal(source[1:], source[:-1]))) + 1 if m > 1 else np.zeros(0, int)
    starts = np.r_[0, change, m].astype(np.int64) if m else np.zeros(1, np.int64)
    part = ReplayedPartition(
        index=index, records=records, ts=ts, img=img, starts=starts,
        names=pc.take(source, pa.array(starts[:-1])).to_pylist(), error=cat.is_error[img], rejected=rejected[img],
        label=cat.label[img], cc=np.zeros(m, np.int32), blacklisted=np.zeros(m, bool),
        response=np.empty(m, dtype=object), src_rejected=np.zeros(0, np.int64), src_blocked=np.zeros(0, np.int64),
        src_cc=np.zeros(0, np.int32), src_blacklisted=np.zeros(0, bool), src_intervals=[],
    )
    # one source at a time already bounds the state; its counts are read at its end, so never forgotten
    ledger = ReputationLedger(reputation.model_copy(update={"forget_default": False}))
    observe, response, cc, blacklisted = ledger.observe, part.response, part.cc, part.blacklisted
    ts_list, err, rej, lab = ts.tolist(), part.error.tolist(), part.rejected.tolist(), part.label.tolist()
    refusal = np.where(cat.verdict[img] == Verdict.QUERY_ATTACK, Refusal.QUERY_ATTACK, Refusal.ADVERSARIAL).tolist()
    distinct, which = np.unique(img, return_inverse=True)
    distinct_ids = pc.take(cat.ids, pa.array(distinct)).to_pylist()
    ids = [distinct_ids[i] for i in which.tolist()]  # one str per image, shared by its uploads
    final: tuple[list[int], list[int], list[int], list[bool]] = ([], [], [], [])  # rejected, blocked, cc, listed
    for name, a, e in zip(part.names, starts[:-1].tolist(), starts[1:].tolist()):
        for k in range(a, e):
            if err[k]:
                response[k] = Refusal.ERROR
                continue
            r = rej[k]
            resp = observe(Upload(name, ts_list[k], ids[k], r, refusal[k] if r else (lab[k] or Verdict.ACCEPTED)))
            response[k] = resp.response
            cc[k] = resp.cc
            blacklisted[k] = resp.blacklisted
        st = ledger.get(name)
        for column, value in zip(final, (st.rejected, st.blocked, st.cc, st.blacklisted)):
            column.append(value)
        part.src_intervals.append(st.intervals or _NO_INTERVALS)
        ledger.reset(name)
    part.src_rejected, part.src_blocked, part.src_cc, part.src_blacklisted = (
        np.array(column, dtype) for column, dtype in zip(final, (np.int64, np.int64, np.int32, bool)))
    return part


def replay(spill: Spill, cat: Catalogue, rejected: np.ndarray, reputation: ReputationConfig) -> Iterator[ReplayedPartition]:
    """Algorithm 2 over every partition, one at a time (see :func:`replay_partition`)."""
    for p, records in spill.partitions_sorted():
        yield replay_partition(p, records, cat, rejected, reputation)


# ---------------------------------------------------------------------------------------------
# What-if
# ---------------------------------------------------------------------------------------------
@dataclass
class WhatIf:
    """One alternative setting; None fields keep the audit's own value."""

    p1: float | None = None
    p2: float | None = None
    threshold: int | None = None
    cap: int | None = None

    @classmethod
    def parse(cls, text: str) -> "WhatIf":
        """``"p1=0.05,threshold=5"`` -> WhatIf (ConfigError on unknown keys or bad values)."""
        out = cls()
        for part in filter(None, (p.strip() for p in re.split(r"[,;\s]+", text))):
            if "=" not in part:
                raise ConfigError(f"--what-if {text!r}: {part!r} is not key=value")
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in ("p1", "p2", "threshold", "cap"):
                raise ConfigError(f"--what-if {text!r}: unknown key {key!r} (p1, p2, threshold, cap)")
            try:
                setattr(out, key, float(value) if key in ("p1", "p2") else int(value))
            except ValueError:
                raise ConfigError(f"--what-if {text!r}: {key}={value!r} is not a number") from None
        return out

    def configs(self, base: TwoStreamConfig) -> tuple[ThresholdsConfig, ReputationConfig]:
        """The thresholds and counter rules of this setting over ``base``."""
        changes = {k: getattr(self, k) for k in ("threshold", "cap") if getattr(self, k) is not None}
        try:
            th = ThresholdsConfig(p1=base.thresholds.p1 if self.p1 is None else self.p1,
                                  p2=base.thresholds.p2 if self.p2 is None else self.p2)
            rep = ReputationConfig(**{**base.reputation.model_dump(), **changes})
        except Exception as exc:
            raise ConfigError(f"--what-if {self.label()}: {exc}") from None
        return th, rep

    def label(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("p1", "p2", "threshold", "cap") if getattr(self, k) is not None]
        return ",".join(parts) or "baseline"


def what_if(spill: Spill, cat: Catalogue, base: TwoStreamConfig, settings: Sequence[WhatIf],
            runs: SourceRuns, clean_rate: float) -> pa.Table:
    """Replay the spilled log under each setting; count blocked sources and collateral hits.

    A *clean-looking* source is one whose rejection rate under the audit's own thresholds is at
    most ``clean_rate`` (and has at least one scored upload), read from the audit's per-partition
    source rows (``runs``); ``clean_sources_hit`` counts those a setting would have blacklisted at
    least once. One partition at a time, every setting replayed over it.
    """
    plans = []
    verdict_cache: dict[tuple[float, float], np.ndarray] = {}
    for setting in settings:
        th, rep = setting.configs(base)
        key = (th.p1, th.p2)
        if key not in verdict_cache:
            same = th.p1 == base.thresholds.p1 and th.p2 == base.thresholds.p2
            verdict_cache[key] = rejected_for(cat, None if same else th)[0]
        plans.append((setting, th, rep, verdict_cache[key]))
    counts = np.zeros((len(plans), 5), np.int64)  # rejected, blocked, sources blocked, at end, clean hit
    clean_total = 0
    for p, records in spill.partitions_sorted():
        clean = runs.clean(p, clean_rate)
        clean_total += len(clean)
        for i, (_, _, rep, rejected) in enumerate(plans):
            part = replay_partition(p, records, cat, rejected, rep)
            counts[i, 0] += int((part.rejected & ~part.error).sum())
            counts[i, 1] += int((part.response == Refusal.BLOCKED).sum())
            for name, intervals in zip(part.names, part.src_intervals):
                if intervals:
                    counts[i, 2] += 1
                    counts[i, 4] += name in clean
            counts[i, 3] += int(part.src_blacklisted.sum())
    out: dict[str, list] = {f.name: [] for f in WHAT_IF_SCHEMA}
    for (setting, th, rep, _), (n_rej, n_blocked, ever, at_end, hit) in zip(plans, counts.tolist()):
        row = {"setting": setting.label(), "p1": th.p1, "p2": th.p2, "threshold": rep.threshold, "cap": rep.cap,
               "rejected_uploads": n_rej, "blocked_uploads": n_blocked, "sources_blocked": ever,
               "blacklisted_at_end": at_end, "clean_sources_hit": hit, "clean_sources": clean_total}
        for name, value in row.items():
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=WHAT_IF_SCHEMA)
