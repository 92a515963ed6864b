"""The query detector in the audit: which uploads were near-identical runs, and who sent them.

With ``--images`` (the audit has pixels only then), :func:`detect_clusters` runs the stateful
query detector (:class:`~twostream.core.query_detector.QueryDetector`) over the log's images in
the order they were first uploaded, (timestamp, image id), each with the source of that first
upload (the logged id; rule 3 counts it under its Algorithm-2 key, the spill's
``reputation.group_by_prefix``): a later upload of the same image is an exact re-upload, which
the detector never flags.
An image it flags is a query attack in every upload of it: its verdict becomes
``query_attack``, a rejection for Algorithm 2 (and for every what-if setting). The detector's
matches (each flagged image and the earlier images it matched) are grouped into connected
components, the *clusters* of near-identical uploads, each with every source that uploaded one
of its images (:data:`CLUSTERS_SCHEMA`, ``clusters.parquet``).

Images that cannot be read or decoded are no query (they are error rows of the audit anyway);
they are counted. Without ``--images``, or with ``detector.enabled`` false, the clusters are
unavailable and the summary and report say why.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.audit.catalogue import Catalogue
from twostream.audit.replay import Spill
from twostream.core.config import LimitsConfig
from twostream.core.labels import Verdict
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig
from twostream.core.reputation import identity_key

if TYPE_CHECKING:
    from twostream.core.models import InputSpec

log = logging.getLogger("twostream.audit")

CLUSTERS_SCHEMA = pa.schema([
    ("cluster", pa.int32()),  # 1 = the largest (most images, then earliest)
    ("images", pa.list_(pa.string())),  # its image ids, in first-upload order
    ("flagged", pa.list_(pa.string())),  # those the detector flagged (verdict query_attack)
    ("uploads", pa.int64()),  # log records naming one of its images
    ("sources", pa.list_(pa.string())),  # every source that uploaded one of them, most uploads first
    ("source_uploads", pa.list_(pa.int64())),  # uploads of each of those sources
    ("first_seen", pa.float64()),
    ("last_seen", pa.float64()),
])


@dataclass
class Clusters:
    """What the detector found; ``available`` False with the ``reason`` when it did not run."""

    available: bool
    reason: str | None = None
    table: pa.Table = field(default_factory=CLUSTERS_SCHEMA.empty_table)
    flagged: np.ndarray | None = None  # bool per catalogue row
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, **self.counts, "clusters": self.table.num_rows}


def _first_uploads(spill: Spill) -> pa.Table:
    """Each image's first upload: (img, ts, source, sent_by), earliest (timestamp, line) first."""
    firsts = []
    for _, records in spill.partitions_sorted():
        table = records.select(["img", "ts", "line", "source", "sent_by"]).sort_by(
            [("img", "ascending"), ("ts", "ascending"), ("line", "ascending")])
        img = table.column("img").to_numpy()
        first = np.flatnonzero(np.r_[True, img[1:] != img[:-1]]) if len(img) else np.zeros(0, np.int64)
        firsts.append(table.take(pa.array(first)))
    if not firsts:
        return pa.table({"img": pa.array([], pa.int32()), "ts": pa.array([], pa.float64()),
                         "line": pa.array([], pa.int64()), "source": pa.array([], pa.string()),
                         "sent_by": pa.array([], pa.string())})
    table = pa.concat_tables(firsts).sort_by([("img", "ascending"), ("ts", "ascending"), ("line", "ascending")])
    img = table.column("img").to_numpy()
    first = np.flatnonzero(np.r_[True, img[1:] != img[:-1]]) if len(img) else np.zeros(0, np.int64)
    return table.take(pa.array(first))


def _components(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find: catalogue row -> its component's smallest row."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def detect_clusters(spill: Spill, cat: Catalogue, images_uri: str | None, enabled: bool,
                    config: QueryDetectorConfig, limits: LimitsConfig,
                    streams: Callable[[], Sequence["InputSpec"]] = tuple) -> Clusters:
    """Run the detector over the log's images (module docstring) and group its matches, each
    image decoded for ``streams()`` (``scoring.stream_specs``: the pixels the batch job and the
    endpoint fingerprint; asked for only when there are images to decode)."""
    if not images_uri:
        return Clusters(False, "no --images: the audit has no pixels to compare, so clusters of near-identical "
                               "uploads are unavailable (rerun with --images)")
    if not enabled:
        return Clusters(False, "the query detector is off (detector.enabled=false)")
    from twostream.core.preprocess import ImageDecodeError, decode_image

    specs = streams()
    firsts = _first_uploads(spill)
    order = np.lexsort((pc.take(cat.ids, firsts.column("img")).to_numpy(zero_copy_only=False),
                        firsts.column("ts").to_numpy()))
    firsts = firsts.take(pa.array(order))
    detector = QueryDetector(config, source_key=identity_key(spill.grouping))
    logged = pc.coalesce(firsts.column("sent_by"), firsts.column("source"))  # the spill's source is the key
    flagged = np.zeros(len(cat), bool)
    row_of: dict[str, int] = {}
    edges: list[tuple[int, int]] = []
    counts: Counter = Counter()
    for img, ts, source in zip(*(c.to_pylist() for c in (firsts.column("img"), firsts.column("ts"), logged))):
        uri = cat.uri[img]
        if uri is None or cat.verdict[img] == Verdict.ERROR:
            counts["unreadable"] += 1
            continue
        try:
            pixels = decode_image(storage.read_bytes(uri, limits.max_bytes), limits, specs)
        except (OSError, ImageDecodeError) as exc:
            log.warning("query detector: %s: %s", uri, exc)
            counts["unreadable"] += 1
            continue
        image_id = cat.ids[img].as_py()
        row_of[image_id] = img
        report, hit = detector.detect(pixels, source=source, query_id=image_id, now=ts)
        counts["queries"] += 1
        counts["exact_reuploads"] += report.duplicate_of is not None
        if hit:
            flagged[img] = True
            edges += [(img, row_of[q]) for q in report.evidence]
    counts["flagged"] = int(flagged.sum())
    log.info("query detector: %d images, %d exact re-uploads, %d flagged, %d unreadable", counts["queries"],
             counts["exact_reuploads"], counts["flagged"], counts["unreadable"])
    return Clusters(True, None, _cluster_table(_components(edges), flagged, spill, cat), flagged,
                    {k: int(counts[k]) for k in ("queries", "exact_reuploads", "flagged", "unreadable")})


def _cluster_table(component: dict[int, int], flagged: np.ndarray, spill: Spill, cat: Catalogue) -> pa.Table:
    """:data:`CLUSTERS_SCHEMA` rows: each component's images, its uploads and their sources."""
    if not component:
        return CLUSTERS_SCHEMA.empty_table()
    rows = np.array(sorted(component), np.int64)
    uploads: Counter = Counter()
    by_source: dict[int, Counter] = defaultdict(Counter)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    seen: dict[int, float] = {}
    for _, records in spill.partitions_sorted():
        mine = records.filter(pc.is_in(records.column("img"), pa.array(rows, pa.int32())))
        for img, ts, source in zip(*(mine.column(c).to_pylist() for c in ("img", "ts", "source"))):
            c = component[img]
            uploads[c] += 1
            by_source[c][source] += 1
            first[c], last[c] = min(first.get(c, ts), ts), max(last.get(c, ts), ts)
            seen[img] = min(seen.get(img, ts), ts)
    members: dict[int, list[int]] = defaultdict(list)
    for img, c in component.items():
        members[c].append(img)
    ranked = sorted(members, key=lambda c: (-len(members[c]), first.get(c, 0.0), c))
    out: dict[str, list] = {f.name: [] for f in CLUSTERS_SCHEMA}
    for number, c in enumerate(ranked, 1):
        imgs = sorted(members[c], key=lambda r: (seen.get(r, 0.0), cat.ids[r].as_py()))
        sources = sorted(by_source[c].items(), key=lambda kv: (-kv[1], kv[0]))
        values = (number, [cat.ids[r].as_py() for r in imgs], [cat.ids[r].as_py() for r in imgs if flagged[r]],
                  uploads[c], [s for s, _ in sources], [n for _, n in sources], first.get(c), last.get(c))
        for name, value in zip(CLUSTERS_SCHEMA.names, values):
            out[name].append(value)
    return pa.table(out, schema=CLUSTERS_SCHEMA)
