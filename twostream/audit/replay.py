"""The replay: the log's good records spilled to disk by source, and Algorithm 2 run over them.

:class:`Spill` keeps the good records as fixed-size binary rows in files partitioned by
source, so memory is bounded by the largest partition, not the log. :func:`replay` is the ONE
per-source replay loop (SPEC 3: each partition sorted by (source, timestamp, image id, line)
and fed to :class:`twostream.core.reputation.ReputationLedger`); the audit reads the timeline
and the per-source rows off it, and :func:`what_if` runs it again under each
:class:`WhatIf` setting (p1/p2 verdicts from the stored top-k, no rescoring).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.audit.catalogue import Catalogue, rejected_for
from twostream.audit.outputs import WHAT_IF_SCHEMA
from twostream.core.config import ConfigError, ReputationConfig, ThresholdsConfig, TwoStreamConfig
from twostream.core.labels import Response, Verdict
from twostream.core.reputation import ReputationLedger, Upload
from twostream.reporting import SourceSeries

RECORD = np.dtype([("src", "<i4"), ("img", "<i4"), ("ts", "<f8"), ("line", "<i8")])
MAX_AGENTS = 5  # distinct user agents kept per source


# ---------------------------------------------------------------------------------------------
# Spill files: good log records as fixed-size rows, partitioned by source
# ---------------------------------------------------------------------------------------------
class Spill:
    """Records (source code, catalogue row, timestamp, line) in ``partitions`` files under ``directory``."""

    def __init__(self, directory: str, partitions: int) -> None:
        self.dir = directory
        self.partitions = partitions
        self.handles = [open(os.path.join(directory, f"part-{p:04d}.bin"), "wb") for p in range(partitions)]
        self.rows = np.zeros(partitions, np.int64)

    def append(self, rec: np.ndarray) -> None:
        part = rec["src"] % self.partitions
        order = np.argsort(part, kind="stable")
        rec, part = rec[order], part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in range(self.partitions):
            a, b = bounds[p], bounds[p + 1]
            if b > a:
                rec[a:b].tofile(self.handles[p])
                self.rows[p] += b - a

    def close(self) -> None:
        for h in self.handles:
            h.close()

    def partitions_sorted(self) -> Iterator[np.ndarray]:
        """Each partition's records sorted by (source, timestamp, image id, line)."""
        for p in range(self.partitions):
            if not self.rows[p]:
                continue
            rec = np.fromfile(os.path.join(self.dir, f"part-{p:04d}.bin"), dtype=RECORD)
            yield rec[np.lexsort((rec["line"], rec["img"], rec["ts"], rec["src"]))]


class SourceNames:
    """Source name <-> int code (order of first appearance), and a few user agents per source."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.names: list[str] = []
        self.agents: list[set[str]] = []

    def __len__(self) -> int:
        return len(self.names)

    def codes(self, names: pa.Array) -> np.ndarray:
        """The code of each name (new names get the next codes)."""
        uniq = pc.unique(names)
        codes_u = np.empty(len(uniq), dtype=np.int32)
        for k, name in enumerate(uniq.to_pylist()):
            code = self.code.get(name)
            if code is None:
                code = self.code[name] = len(self.names)
                self.names.append(name)
                self.agents.append(set())
            codes_u[k] = code
        return codes_u[pc.index_in(names, value_set=uniq).to_numpy()]

    def add_agents(self, codes: np.ndarray, agents: pa.Array) -> None:
        pairs = pa.table({"s": codes, "ua": agents}).filter(pc.is_valid(agents)).group_by(["s", "ua"]).aggregate([])
        for s, a in zip(pairs.column("s").to_pylist(), pairs.column("ua").to_pylist()):
            if len(self.agents[s]) < MAX_AGENTS and a:
                self.agents[s].add(a[:200])


# ---------------------------------------------------------------------------------------------
# The replay
# ---------------------------------------------------------------------------------------------
@dataclass
class ReplayedPartition:
    """One partition after Algorithm 2: per upload (in replay order) the state after it."""

    rec: np.ndarray  # RECORD, sorted
    names: list[str]  # source of each upload
    image_ids: list[str]
    error: np.ndarray  # bool: not an Algorithm-2 event
    rejected: np.ndarray  # bool
    label: np.ndarray  # object: the stored label
    cc: np.ndarray  # int32 (0 on error rows)
    blacklisted: np.ndarray  # bool (False on error rows)
    response: np.ndarray  # object: a label, adversarial, blocked or error
    ledger: ReputationLedger

    def spans(self) -> Iterator[tuple[str, int, int]]:
        """(source, start, end) of each source's run of uploads."""
        src = self.rec["src"]
        starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
        ends = np.r_[starts[1:], len(src)]
        for a, e in zip(starts.tolist(), ends.tolist()):
            yield self.names[a], a, e

    def timeline(self, verdict: np.ndarray) -> dict[str, Any]:
        """The timeline rows (TIMELINE_SCHEMA) given each catalogue row's ``verdict``."""
        img, err = self.rec["img"], self.error
        return {
            "line": self.rec["line"], "source": self.names, "timestamp": self.rec["ts"],
            "image_id": self.image_ids, "verdict": verdict[img].tolist(),
            "label": [lab if not rj and not er else None for lab, rj, er in zip(self.label, self.rejected, err)],
            "cc": pa.array(self.cc, pa.int32(), mask=err),
            "blacklisted": pa.array(self.blacklisted, pa.bool_(), mask=err),
            "response": self.response.tolist(),
        }

    def source_row(self, name: str, a: int, e: int, agents: set[str]) -> dict[str, Any]:
        """The sources.parquet row (SOURCES_SCHEMA less rank) of the source at ``a:e``."""
        st = self.ledger.get(name)
        ts = self.rec["ts"]
        uploads = e - a
        errors = int(self.error[a:e].sum())
        scored = uploads - errors
        intervals = [[x, y] for x, y in st.intervals]
        last = float(ts[e - 1])
        return {
            "source": name, "uploads": uploads, "scored": scored, "rejected": st.rejected, "errors": errors,
            "blocked": st.blocked, "rejection_rate": st.rejected / scored if scored else 0.0,
            "first_seen": float(ts[a]), "last_seen": last,
            "blacklist_intervals": [{"start": x, "end": y} for x, y in intervals],
            "times_blacklisted": len(intervals),
            "blacklisted_seconds": float(sum(((y if y is not None else last) - x) for x, y in intervals)),
            "cc": st.cc, "blacklisted": st.blacklisted,
            "final_standing": "blacklisted" if st.blacklisted else "released" if intervals else "clean",
            "user_agents": sorted(agents),
        }

    def series(self, name: str, a: int, e: int, threshold: int) -> SourceSeries:
        """The CC after each scored upload of the source at ``a:e``, for the report's plot."""
        sel = np.arange(a, e)[~self.error[a:e]]
        intervals = [[x, y] for x, y in self.ledger.get(name).intervals]
        return SourceSeries(name, self.rec["ts"][sel].copy(), self.cc[sel].copy(), intervals, threshold)


def replay(spill: Spill, cat: Catalogue, rejected: np.ndarray, reputation: ReputationConfig,
           source_names: Sequence[str]) -> Iterator[ReplayedPartition]:
    """Algorithm 2 over every partition (a fresh ledger each: a source lives in one partition).

    ``rejected`` is per catalogue row; error images leave the state unchanged (response ``error``).
    """
    is_error = cat.is_error
    for rec in spill.partitions_sorted():
        img = rec["img"]
        m = len(rec)
        part = ReplayedPartition(
            rec=rec, names=[source_names[c] for c in rec["src"].tolist()],
            image_ids=pc.take(cat.ids, pa.array(img)).to_pylist(), error=is_error[img], rejected=rejected[img],
            label=cat.label[img], cc=np.zeros(m, np.int32), blacklisted=np.zeros(m, bool),
            response=np.empty(m, dtype=object), ledger=ReputationLedger(reputation),
        )
        observe, response, cc, blacklisted = part.ledger.observe, part.response, part.cc, part.blacklisted
        for k, (name, t, image_id, er, r, lab) in enumerate(zip(
                part.names, rec["ts"].tolist(), part.image_ids, part.error.tolist(), part.rejected.tolist(),
                part.label.tolist())):
            if er:
                response[k] = Response.ERROR
                continue
            resp = observe(Upload(name, t, image_id, r, Verdict.ADVERSARIAL if r else (lab or Verdict.ACCEPTED)))
            response[k] = resp.response
            cc[k] = resp.cc
            blacklisted[k] = resp.blacklisted
        yield part


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
            sources: pa.Table, clean_rate: float, source_names: Sequence[str]) -> pa.Table:
    """Replay the spilled log under each setting; count blocked sources and collateral hits.

    A *clean-looking* source is one whose rejection rate under the audit's own thresholds is at
    most ``clean_rate`` (and has at least one scored upload); ``clean_sources_hit`` counts those
    a setting would have blacklisted at least once.
    """
    names = sources.column("source").to_pylist()
    rates = dict(zip(names, sources.column("rejection_rate").to_pylist()))
    scored = dict(zip(names, sources.column("scored").to_pylist()))
    clean = {s for s, r in rates.items() if scored[s] > 0 and r <= clean_rate}
    out: dict[str, list] = {f.name: [] for f in WHAT_IF_SCHEMA}
    verdict_cache: dict[tuple[float, float], np.ndarray] = {}
    for setting in settings:
        th, rep = setting.configs(base)
        key = (th.p1, th.p2)
        if key not in verdict_cache:
            same = th.p1 == base.thresholds.p1 and th.p2 == base.thresholds.p2
            verdict_cache[key] = rejected_for(cat, None if same else th)[0]
        n_rej = n_blocked = at_end = 0
        ever: set[str] = set()
        for part in replay(spill, cat, verdict_cache[key], rep, source_names):
            n_rej += int((part.rejected & ~part.error).sum())
            n_blocked += int((part.response == Response.BLOCKED).sum())
            for name, st in part.ledger.items():
                if st.intervals:
                    ever.add(name)
                at_end += st.blacklisted
        row = {"setting": setting.label(), "p1": th.p1, "p2": th.p2, "threshold": rep.threshold, "cap": rep.cap,
               "rejected_uploads": n_rej, "blocked_uploads": n_blocked, "sources_blocked": len(ever),
               "blacklisted_at_end": at_end, "clean_sources_hit": len(ever & clean), "clean_sources": len(clean)}
        for name, value in row.items():
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=WHAT_IF_SCHEMA)
