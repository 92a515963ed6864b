"""The catalogue of images a log may name: an earlier batch job's score rows plus the image files.

:func:`build_catalogue` joins the rows of ``--scores`` (``image_id`` and ``verdict`` needed; the
top-k columns for a p1/p2 what-if) and the files under ``--images`` that no score row
describes, sorted by image id so that an index into it orders like the id itself.
:meth:`Catalogue.lookup` resolves a log's image keys; :func:`score_missing` scores the
referenced images no score row covers (a :data:`ScoreFn`, nothing scored twice); and
:func:`rejected_for` gives the verdicts under other thresholds from the stored top-k, through
:func:`twostream.core.results.score_rows` (no rescoring).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from twostream import storage
from twostream.audit.logread import AuditError
from twostream.core.config import ThresholdsConfig
from twostream.core.labels import Verdict
from twostream.core.results import ScoredBatch, score_rows

log = logging.getLogger("twostream.audit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TOP_K_COLUMNS = ("high_idx", "high_prob", "low_idx", "low_prob")
_ALIAS_PATTERNS = (r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", r"[?#].*$", r"^/+", r"\.[A-Za-z0-9]{1,5}$", r"^.*/")

# (uris, image ids) -> one scored row per image, in order
ScoreFn = Callable[[list[str], list[str]], ScoredBatch]
ImageFile = tuple[str, str, str]  # (key = relative path without extension, relative path, uri)


class Scores(Protocol):
    """What :func:`scorer_score_fn` needs of a :class:`twostream.core.scoring.Scorer`."""

    def score(self, images: Sequence[bytes], ids: Sequence[str]) -> ScoredBatch: ...


@dataclass
class Catalogue:
    """Every image the log may name, sorted by id; score columns filled where known."""

    ids: pa.Array  # string, sorted
    uri: list[str | None]
    scored: np.ndarray  # bool: has a verdict (from --scores or scored by this audit)
    from_scores: np.ndarray  # bool: the verdict came from --scores
    verdict: np.ndarray  # object: Verdict text, None (not scored yet)
    label: np.ndarray  # object
    high_idx: np.ndarray  # (N, k_high) int32, -1 unknown
    high_prob: np.ndarray  # (N, k_high) float32, nan unknown
    low_idx: np.ndarray  # (N, k_low) int32
    low_prob: np.ndarray  # (N, k_low) float32
    has_topk: np.ndarray  # bool
    aliases: pa.Array | None = None  # strings that name an image (id, key, uri, relative path)
    alias_index: np.ndarray | None = None  # int64: catalogue row of each alias

    @classmethod
    def empty(cls, ids: pa.Array, k_high: int, k_low: int) -> "Catalogue":
        """Rows for ``ids`` with nothing known about them yet."""
        n = len(ids)
        return cls(
            ids=ids, uri=[None] * n, scored=np.zeros(n, bool), from_scores=np.zeros(n, bool),
            verdict=np.full(n, None, dtype=object), label=np.full(n, None, dtype=object),
            high_idx=np.full((n, k_high), -1, np.int32), high_prob=np.full((n, k_high), np.nan, np.float32),
            low_idx=np.full((n, k_low), -1, np.int32), low_prob=np.full((n, k_low), np.nan, np.float32),
            has_topk=np.zeros(n, bool),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_error(self) -> np.ndarray:
        """True where the image is not an Algorithm-2 event (undecodable, or never scored)."""
        return (self.verdict == Verdict.ERROR) | (self.verdict == None)  # noqa: E711

    def lookup(self, values: pa.Array) -> np.ndarray:
        """Catalogue row of each value (-1 when unknown); tries the value as given, then
        without scheme/host/query/leading slash, then without extension, then its basename."""
        n = len(values)
        out = np.full(n, -1, dtype=np.int64)
        if len(self.aliases) == 0 or n == 0:
            return out
        current = pc.cast(values, pa.string())
        if isinstance(current, pa.ChunkedArray):
            current = current.combine_chunks()
        forms = [current]
        for pattern in _ALIAS_PATTERNS:
            current = pc.replace_substring_regex(current, pattern, "")
            forms.append(current)
        # one hash-set build per block: all candidate forms probed at once, the first match wins
        pos = pc.index_in(pa.concat_arrays(forms), value_set=self.aliases)
        valid = np.asarray(pc.is_valid(pos)).reshape(len(forms), n)
        posv = pc.fill_null(pos, 0).to_numpy().reshape(len(forms), n)
        hit = valid.any(axis=0)
        first = valid.argmax(axis=0)
        rows = np.flatnonzero(hit)
        out[rows] = self.alias_index[posv[first[rows], rows]]
        return out

    def add_scored(self, rows: np.ndarray, batch: ScoredBatch) -> None:
        """Record this audit's scores of the catalogue ``rows``."""
        self.scored[rows] = True
        self.verdict[rows] = batch.verdict
        self.label[rows] = batch.label
        if batch.high_idx.shape[1:] == self.high_idx.shape[1:] and batch.low_idx.shape[1:] == self.low_idx.shape[1:]:
            ok = batch.scored
            target = rows[ok]
            self.high_idx[target], self.high_prob[target] = batch.high_idx[ok], batch.high_prob[ok]
            self.low_idx[target], self.low_prob[target] = batch.low_idx[ok], batch.low_prob[ok]
            self.has_topk[target] = True


# ---------------------------------------------------------------------------------------------
# Reading the scores and the image files
# ---------------------------------------------------------------------------------------------
def _scores_path(uri: str) -> str:
    """An earlier batch job's output root holds its per-image rows under images/."""
    images = storage.join(uri, "images")
    fs, path = storage.filesystem(images)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return images
    return uri


def read_scores(uri: str) -> pa.Table:
    """Read score rows (``image_id``, ``verdict`` required; key/uri/label/top-k if present)."""
    uri = _scores_path(uri)
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise AuditError(f"--scores not found: {uri}")
    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    names = dataset.schema.names
    missing = [c for c in ("image_id", "verdict") if c not in names]
    if missing:
        raise AuditError(f"--scores {uri} lacks column(s) {missing}; it has {names}")
    wanted = [c for c in ("image_id", "key", "uri", "verdict", "label", *TOP_K_COLUMNS) if c in names]
    return dataset.to_table(columns=wanted)


def _last_per_id(scores: pa.Table) -> pa.Table:
    """One row per image id, the last one winning (found by a stable sort, no hash table)."""
    scores = scores.filter(pc.is_valid(scores.column("image_id")))
    sid = pc.cast(scores.column("image_id"), pa.string()).combine_chunks()
    if len(sid) > 1:
        order = pc.sort_indices(sid).to_numpy()
        sorted_ids = pc.take(sid, pa.array(order))
        last = np.append(np.asarray(pc.not_equal(sorted_ids[1:], sorted_ids[:-1])), True)
        if not last.all():
            scores = scores.take(pa.array(np.sort(order[last])))
    return scores


def _strip_ext(path: str) -> str:
    head, _, tail = path.rpartition("/")
    stem = tail.split(".", 1)[0] if not tail.startswith(".") else tail
    return f"{head}/{stem}" if head else stem


def _list_images(images_uri: str, score_names: pa.Array) -> tuple[list[ImageFile], list[ImageFile]]:
    """(files no score row names, one per key; files a score row names) under ``images_uri``."""
    try:
        listed = storage.list_files(images_uri)
    except FileNotFoundError as exc:
        raise AuditError(f"--images not found: {images_uri}") from exc
    _, base = storage.filesystem(images_uri)
    entries = []
    for u in listed:
        name = u.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        _, p = storage.filesystem(u)
        rel = p[len(base):].lstrip("/") if p != base else name
        entries.append((_strip_ext(rel), rel, u))
    files: list[ImageFile] = []
    covered: list[ImageFile] = []
    if not entries:
        return files, covered
    hit = pc.is_in(pa.array([e[0] for e in entries], pa.string()), value_set=score_names)
    for alt in ([e[1] for e in entries], [e[2] for e in entries], [e[0].rsplit("/", 1)[-1] for e in entries]):
        hit = pc.or_(hit, pc.is_in(pa.array(alt, pa.string()), value_set=score_names))
    seen: set[str] = set()
    for e, h in zip(entries, hit.to_pylist()):
        if h:
            covered.append(e)
        elif e[0] not in seen:
            seen.add(e[0])
            files.append(e)
    return files, covered


def _topk_matrix(column: pa.ChunkedArray | None, n: int, k: int, dtype: type,
                 fill: float) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((n, k), fill, dtype=dtype)
    ok = np.zeros(n, dtype=bool)
    if column is None:
        return out, ok
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    good = lengths == k
    if good.any():
        flat = pc.list_flatten(pc.filter(col, pa.array(good))).to_numpy(zero_copy_only=False)
        out[good] = np.asarray(flat, dtype=dtype).reshape(-1, k)
        ok = good
    return out, ok


def _objects(column: pa.ChunkedArray) -> np.ndarray:
    """A low-cardinality string column as an object array sharing one str per distinct value."""
    encoded = pc.dictionary_encode(pc.cast(column, pa.string()).combine_chunks())
    values = np.array(encoded.dictionary.to_pylist() + [None], dtype=object)
    return values[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


# ---------------------------------------------------------------------------------------------
# Building the catalogue
# ---------------------------------------------------------------------------------------------
def build_catalogue(scores_uri: str | None, images_uri: str | None, k_high: int = 5, k_low: int = 2) -> Catalogue:
    """The images a log may name: score rows (deduplicated by image id, the last row winning),
    then the files under ``images_uri`` that no score row names (id = path without extension,
    relative to the prefix, as the batch job keys loose files). Vectorised with pyarrow."""
    scores = _last_per_id(read_scores(scores_uri)) if scores_uri else None
    score_names = pa.array([], pa.string())
    if scores is not None:
        named = [pc.cast(scores.column(c), pa.string()).combine_chunks()
                 for c in ("image_id", "key", "uri") if c in scores.column_names]
        score_names = pa.concat_arrays([a.filter(pc.is_valid(a)) for a in named])
    files, covered = _list_images(images_uri, score_names) if images_uri else ([], [])
    n_s = scores.num_rows if scores is not None else 0
    ids_all = pa.concat_arrays([
        pc.cast(scores.column("image_id"), pa.string()).combine_chunks() if scores is not None
        else pa.array([], pa.string()),
        pa.array([e[0] for e in files], pa.string()),
    ])
    order = pc.sort_indices(ids_all).to_numpy()  # catalogue row r holds input row order[r]
    pos = np.empty(len(ids_all), dtype=np.int64)  # input row -> catalogue row
    pos[order] = np.arange(len(ids_all))
    cat = Catalogue.empty(pc.take(ids_all, pa.array(order)), k_high, k_low)
    aliases: list[pa.Array] = []
    alias_rows: list[np.ndarray] = []
    if n_s:
        _fill_from_scores(cat, scores, pos[:n_s], aliases, alias_rows)
    if files:
        t = pos[n_s:]
        for r, (_, _, u) in zip(t.tolist(), files):
            cat.uri[r] = u
        for k in range(3):
            aliases.append(pa.array([e[k] for e in files], pa.string()))
            alias_rows.append(t)
    if covered:
        _alias_covered(cat, covered, aliases, alias_rows)
    cat.aliases = pa.concat_arrays(aliases) if aliases else pa.array([], pa.string())
    cat.alias_index = np.concatenate(alias_rows).astype(np.int64) if alias_rows else np.zeros(0, np.int64)
    return cat


def _fill_from_scores(cat: Catalogue, scores: pa.Table, rows: np.ndarray, aliases: list[pa.Array],
                      alias_rows: list[np.ndarray]) -> None:
    """Verdicts, labels, URIs and top-k of the score rows (catalogue ``rows``), and their aliases."""
    cols = scores.column_names
    cat.scored[rows] = True
    cat.from_scores[rows] = True
    cat.verdict[rows] = _objects(scores.column("verdict"))
    if "label" in cols:
        cat.label[rows] = _objects(scores.column("label"))
    if "uri" in cols:
        for r, u in zip(rows.tolist(), scores.column("uri").to_pylist()):
            cat.uri[r] = u
    n, k_high, k_low = len(rows), cat.high_idx.shape[1], cat.low_idx.shape[1]
    mats = [_topk_matrix(scores.column(c) if c in cols else None, n, k, dt, fill)
            for c, k, dt, fill in (("high_idx", k_high, np.int32, -1), ("high_prob", k_high, np.float32, np.nan),
                                   ("low_idx", k_low, np.int32, -1), ("low_prob", k_low, np.float32, np.nan))]
    cat.high_idx[rows], cat.high_prob[rows], cat.low_idx[rows], cat.low_prob[rows] = (m[0] for m in mats)
    cat.has_topk[rows] = mats[0][1] & mats[1][1] & mats[2][1] & mats[3][1]
    # image ids first (they win over a key or URI that happens to equal another id)
    for c in ("image_id", "key", "uri"):
        if c in cols:
            a = pc.cast(scores.column(c), pa.string()).combine_chunks()
            valid = np.asarray(pc.is_valid(a))
            aliases.append(a.filter(pa.array(valid)))
            alias_rows.append(rows[valid])


def _alias_covered(cat: Catalogue, covered: list[ImageFile], aliases: list[pa.Array],
                   alias_rows: list[np.ndarray]) -> None:
    """A file a score row describes: its key, path and URI name that row too (score aliases first)."""
    names = pa.concat_arrays(aliases) if aliases else pa.array([], pa.string())
    rows_of = np.concatenate(alias_rows) if alias_rows else np.zeros(0, np.int64)
    index: list[int | None] = [None] * len(covered)
    for form in (0, 1, 2, 3):
        probe = pa.array([e[0].rsplit("/", 1)[-1] if form == 3 else e[form] for e in covered], pa.string())
        for k, hit in enumerate(pc.index_in(probe, value_set=names).to_pylist()):
            if index[k] is None and hit is not None:
                index[k] = int(rows_of[hit])
    for (key, rel, u), r in zip(covered, index):
        if r is None:
            continue
        aliases.append(pa.array([key, rel, u], pa.string()))
        alias_rows.append(np.array([r, r, r], np.int64))
        if cat.uri[r] is None:
            cat.uri[r] = u


# ---------------------------------------------------------------------------------------------
# Verdicts: scoring the unscored, other thresholds from the stored top-k
# ---------------------------------------------------------------------------------------------
def scorer_score_fn(scorer: Scores, chunk: int = 32, max_bytes: int | None = None) -> ScoreFn:
    """A score function over a :class:`twostream.core.scoring.Scorer` (in-process, ``chunk``
    images per call). Files are read as stored (never decompressed), at most ``max_bytes``
    (``limits.max_bytes``) each; a file that cannot be read, or holds more, is an error row whose
    error says why."""

    def score(uris: list[str], ids: list[str]) -> ScoredBatch:
        parts = []
        for start in range(0, len(uris), chunk):
            blobs, unread = [], {}
            for k, u in enumerate(uris[start:start + chunk]):
                try:
                    blobs.append(storage.read_bytes(u, max_bytes))
                except OSError as exc:
                    blobs.append(b"")
                    unread[k] = str(exc) if isinstance(exc, storage.TooLargeError) else f"cannot read: {exc}"
                    log.warning("%s: %s", u, unread[k])
            part = scorer.score(blobs, ids[start:start + chunk])
            for k, reason in unread.items():
                part.error[k] = reason
            parts.append(part)
        return ScoredBatch.concat(parts)

    return score


def score_missing(cat: Catalogue, rows: np.ndarray, score_fn: ScoreFn) -> tuple[list[str], ScoredBatch]:
    """Score the catalogue ``rows`` (images the log names that no score row covers) and record
    the scores; returns their URIs and the scored batch."""
    uris = [cat.uri[k] for k in rows]
    batch = score_fn(uris, pc.take(cat.ids, pa.array(rows)).to_pylist())
    if len(batch) != len(rows):
        raise AuditError(f"scoring returned {len(batch)} results for {len(rows)} images")
    cat.add_scored(rows, batch)
    return uris, batch


def rejected_for(cat: Catalogue, thresholds: ThresholdsConfig | None) -> tuple[np.ndarray, np.ndarray]:
    """(rejected bool, verdict) per catalogue row: the stored verdict when ``thresholds`` is
    None, else Algorithm 1 recomputed from the top-k columns (rows without them: AuditError).
    A query attack (the query detector's verdict) is rejected under any thresholds."""
    verdict = cat.verdict.copy()
    if thresholds is not None:
        need = cat.scored & (cat.verdict != Verdict.ERROR) & (cat.verdict != Verdict.QUERY_ATTACK)
        lacking = need & ~cat.has_topk
        if lacking.any():
            raise AuditError(
                f"{int(lacking.sum())} scored image(s) have no top-k columns (high_idx, high_prob, "
                "low_idx, low_prob), so p1/p2 cannot be changed for them"
            )
        rows = np.flatnonzero(need)
        if len(rows):
            none = [None] * len(rows)
            batch = score_rows(pc.take(cat.ids, pa.array(rows)).to_pylist(), none, none, cat.high_idx[rows],
                               cat.high_prob[rows], cat.low_idx[rows], cat.low_prob[rows], thresholds)
            verdict[rows] = batch.verdict
    return (verdict == Verdict.ADVERSARIAL) | (verdict == Verdict.QUERY_ATTACK), verdict
