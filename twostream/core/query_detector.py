"""The stateful query detector: flags the long runs of near-identical images a black-box query
attack sends, whatever source ids they come from, and leaves honest re-uploads alone.

After Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks" (2019: keep a
history of queries, flag a query with near neighbours in it) and Blacklight (Li et al., USENIX
Security 2022: a fingerprint per query from hashes of its quantized pixel windows; a query whose
fingerprint shares many hashes with an earlier one is a match). ART style: ``detect(image) ->
(report, is_adversarial)``, on decoded RGB ``uint8`` arrays (``scoring.decode_many``'s output).

**Per image** (:func:`fingerprint`; ``detect`` takes about 0.5 ms for a 500x375 photograph on
a shared 2-core CPU, most of it the digest): ``windows`` windows of two horizontally adjacent
pixels (six values), at places drawn from ``seed`` and the geometry ``(H, W)`` alone, so every
image of one geometry is read at the same places; half of them straddle a JPEG block edge. It
yields

- ``digest``: a hash of the geometry and every pixel; equal digests are the same image (an exact
  re-upload);
- ``sample``: the windows' exact values (``windows * 6`` bytes), to measure a difference;
- ``hashes``: the fingerprint, one 63-bit integer per index window (the first ``index_windows``):
  the window's values quantized with a step of ``quant_step`` (a random offset per window), mixed
  with the window's number and the geometry. Two images share a hash only at the same place.

**The rules** (:meth:`QueryDetector.detect`):

1. An exact re-upload (a remembered digest) is never a new query: it matches nothing, is not
   remembered again and is never flagged. A popular photograph sent by thousands of accounts costs
   one entry.
2. A *match* is an earlier remembered image of the same geometry, a distinct image, among the
   ``max_candidates`` newest that share at least ``min_shared`` hashes (the index: a count of
   shared integers, as a Redis store can answer it), whose sampled difference is
   - small: every sampled value within ``max_linf`` (16/255: an attacker held to L-inf <= 8/255
     of an original sends queries within 16/255 of each other; a decision-based walk, HopSkipJump
     or Boundary, sends its probes within a small distance of its current point);
   - noise-like: confined to few values (``max_sparse_changed``: Square and SimBA steps) or spread
     over flat and textured windows alike (``min_texture_ratio``);
   - and not JPEG-like: at most one of the three traces of JPEG requantization (the change
     follows the texture, R, G and B move together, it steps at the 8-pixel block grid), or, with
     two, a change that does not vary inside the blocks (``jpeg_min_inner``: requantization
     rounds every DCT coefficient, so its error has AC content; an offset constant per block,
     which the detector-aware attacker of ``twostream blackbox --adaptive jpeg:A`` sent, does
     not), see :meth:`Differences.jpeg_like`.
3. A query is *adversarial* when it has at least ``min_matches`` matches within the window, or
   at least ``min_source_near`` near-duplicates (verified candidates within ``max_linf``, of any
   shape) sent by its own identity: an attacker that shapes its changes past rule 2 (like
   texture, like JPEG, real JPEG re-encodes) from one identity is still caught. An identity is
   the detector's ``source_key`` of a source id: the callers (endpoint, batch job, audit,
   black-box harness) pass Algorithm 2's
   :func:`~twostream.core.reputation.reputation_key` under ``reputation.group_by_prefix``, so
   that with grouping on, ids rotated inside one network (an IPv6 /64, an IPv4 /24) are one
   identity, as they are one counter; without a ``source_key`` (or with grouping off) ids are
   compared as text. The store keeps the raw source id (the key is a pure function of it) and
   reports name the raw ids.

Why honest traffic stays honest: resizes and crops change the geometry or move the content (a
large difference), so they match nothing; exact copies are rule 1; two JPEG re-encodings of one
photograph at one size are often within 16/255 of each other on the sample (close qualities), but
their difference carries the JPEG traces and varies inside the blocks, so a match between them is
rare (about 1-6% of pairs of close qualities, measured) and ``min_matches`` of them at once rarer
still (0 in 20,000 honest uploads, and 0 when all 102 JPEG variants of a photograph arrive:
``docs/detector.md``). Near-duplicates of a popular photograph are many (up to 64 of one query,
all the candidates verified, among 102 variants), but they come from many sources: one honest
source rarely sends ``min_source_near`` distinct near-copies of one image within the window. An attack run adds a new
distinct near-duplicate with every query, so its k-th query has up to k-1 matches: it is flagged
after about ``min_matches`` + 1 queries, whatever account sent each.

**State** (:class:`DetectorStore`, the interface; :class:`MemoryStore`, in this process): the
remembered images, oldest first, bounded by a count (``max_entries``) and an age (``max_age_s``,
with timestamps the caller gives). Per image: its sample, its hashes, its digest and who sent it.
The store interface is two calls per query, ``lookup`` (evict, then the exact copy or the
candidates with their shared-hash counts and samples) and ``remember`` (add, then evict), in
integers and bytes only, so a Redis store can hold the same state for every replica and answer
each call in one round trip.

Known weaknesses (``docs/detector.md``): an attacker who knows the rules can space its queries
(more than ``max_entries`` or ``max_age_s`` apart), perturb each query enough to leave
``max_linf``, or shape its changes past rule 2 (like JPEG error with AC content, or confined to
texture) *and* rotate source ids across networks (or inside one when ``reputation.group_by_prefix``
is off; Feng et al., 2023, adaptive rejection sampling); it can change
the geometry of each query by a pixel (a match needs the same size); the positions are drawn
from a secret ``seed``, which hides where the sample lies, not the rules.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

_MASK63 = np.uint64((1 << 63) - 1)
WINDOW = 6  # values per sampled window: two horizontally adjacent pixels, RGB


@dataclass(frozen=True)
class QueryDetectorConfig:
    """The detector's rules and bounds (see the module docstring for what each one decides)."""

    windows: int = 512  # sampled windows (two adjacent RGB pixels each) per image
    index_windows: int = 32  # the first windows also hashed: the fingerprint
    quant_step: int = 64  # quantization step of the hashed values (0..255 scale)
    min_shared: int = 8  # hashes an earlier image must share to be a candidate
    max_linf: int = 16  # largest |difference| on the sample for a match (0..255 scale)
    min_texture_ratio: float = 0.85  # noise-like: mean |diff| on flat windows / on textured ones
    max_sparse_changed: float = 0.2  # noise-like too: at most this share of sampled values changed
    jpeg_texture_ratio: float = 0.95  # JPEG-like votes (two of three): the change follows texture,
    jpeg_channel_corr: float = 0.4  # R, G, B differences correlate at least this much,
    jpeg_block_ratio: float = 1.15  # the difference steps this much more across block edges,
    jpeg_min_inner: float = 0.3  # and varies inside blocks: step inside / mean |diff| at least this
    min_matches: int = 8  # matches within the window that make a query adversarial
    min_source_near: int | None = 16  # near-duplicates (within max_linf, any shape) from the query's own
    #                                   identity (QueryDetector's source_key) that do too (None: off; counted
    #                                   among the verified candidates)
    max_candidates: int = 64  # the newest candidates verified per query (bounds the cost)
    max_entries: int = 50_000  # remembered images (oldest evicted first)
    max_age_s: float | None = 3600.0  # remembered for at most this long (None: count only)
    seed: int = 0x5EED  # draws the window positions and offsets; keep it secret in production

    def __post_init__(self) -> None:
        checks = {
            "windows": self.windows >= 2,
            "index_windows": 1 <= self.index_windows <= self.windows,
            "quant_step": 2 <= self.quant_step <= 256,
            "min_shared": 1 <= self.min_shared <= self.index_windows,
            "max_linf": 0 <= self.max_linf <= 255, "min_matches": self.min_matches >= 1,
            "min_source_near": self.min_source_near is None or self.min_source_near >= 1,
            "max_candidates": self.max_candidates >= self.min_matches,
            "jpeg_min_inner": self.jpeg_min_inner >= 0,
            "min_texture_ratio": self.min_texture_ratio >= 0,
            "max_sparse_changed": 0 <= self.max_sparse_changed <= 1,
            "max_entries": self.max_entries >= 1,
            "max_age_s": self.max_age_s is None or self.max_age_s > 0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"query detector config: invalid {', '.join(bad)}")


@dataclass(frozen=True)
class Fingerprint:
    """What the detector keeps of one image (see the module docstring)."""

    geometry: tuple[int, int]
    digest: bytes
    sample: np.ndarray  # uint8, windows * 6 values
    hashes: tuple[int, ...]  # one per index window, position-bound


@dataclass(frozen=True)
class Entry:
    """One remembered image."""

    query_id: str
    source: str | None
    time: float
    fingerprint: Fingerprint


@dataclass(frozen=True)
class Match:
    """An earlier image the query matched: who sent it, shared hashes, and the sampled
    difference's statistics (see :class:`Differences`)."""

    query_id: str
    source: str | None
    shared: int
    linf: int
    texture_ratio: float
    changed: float
    channel_corr: float
    block_ratio: float
    inner_ratio: float


@dataclass(frozen=True)
class QueryReport:
    """The detector's answer for one query."""

    query_id: str
    source: str | None
    is_adversarial: bool
    duplicate_of: str | None = None  # an exact re-upload of this remembered query
    matches: tuple[Match, ...] = field(default_factory=tuple)
    candidates: int = 0  # images the index proposed (the newest max_candidates are verified)
    near: tuple[str, ...] = ()  # the verified candidates within max_linf, matched or not, newest first
    source_near: int = 0  # how many of them the query's own identity sent (source_key: its source or network)
    evidence: tuple[str, ...] = ()  # a flagged query's reason: its matches, else its source's near-duplicates


class DetectorStore(Protocol):
    """The detector's state, read and written once each per query (integers and bytes only, so
    that a Redis store does each in one round trip)."""

    def lookup(self, fp: Fingerprint, min_shared: int, now: float, max_entries: int,
               max_age_s: float | None) -> tuple[Entry | None, list[tuple[Entry, int]]]:
        """After forgetting the oldest entries beyond ``max_entries`` or older than ``max_age_s``
        (at ``now``): the remembered entry with ``fp``'s exact digest (then no candidates), else
        the entries of ``fp``'s geometry sharing >= ``min_shared`` of its hashes, with the count,
        newest first."""

    def remember(self, entry: Entry, max_entries: int, max_age_s: float | None) -> None:
        """Remember ``entry`` (a query id already remembered with another digest is refused; an
        image whose digest is remembered is not kept twice), then forget as :meth:`lookup` does,
        at the entry's time."""

    def __len__(self) -> int: ...


class MemoryStore(DetectorStore):
    """The state in this process: entries oldest first, an index hash -> entry ids, digest -> id.

    Hashes are position-bound (they include the window number and geometry), so an index hit is
    a window at the same place with the same quantized values; counting hits per entry is the
    shared-hash count.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._index: dict[int, list[str]] = {}
        self._digests: dict[bytes, str] = {}
        self._order: dict[str, int] = {}  # query id -> arrival number, for newest first
        self._added = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        """The remembered entries, oldest first (the order :meth:`add` restores them in)."""
        return iter(list(self._entries.values()))

    def lookup(self, fp: Fingerprint, min_shared: int, now: float, max_entries: int,
               max_age_s: float | None) -> tuple[Entry | None, list[tuple[Entry, int]]]:
        self.evict(now, max_entries, max_age_s)
        same = self.find_digest(fp.digest)
        return (same, []) if same is not None else (None, self.candidates(fp.geometry, fp.hashes, min_shared))

    def remember(self, entry: Entry, max_entries: int, max_age_s: float | None) -> None:
        if self.find_digest(entry.fingerprint.digest) is None:
            self.add(entry)
        self.evict(entry.time, max_entries, max_age_s)

    def find_digest(self, digest: bytes) -> Entry | None:
        """The remembered entry with this exact digest, if any."""
        query_id = self._digests.get(digest)
        return None if query_id is None else self._entries[query_id]

    def candidates(self, geometry: tuple[int, int], hashes: tuple[int, ...],
                   min_shared: int) -> list[tuple[Entry, int]]:
        """Remembered entries of this geometry sharing >= ``min_shared`` hashes, with the count,
        newest first."""
        counts: dict[str, int] = {}
        for h in hashes:
            for query_id in self._index.get(h, ()):
                counts[query_id] = counts.get(query_id, 0) + 1
        found = []
        for query_id, shared in counts.items():
            entry = self._entries[query_id]
            if shared >= min_shared and entry.fingerprint.geometry == geometry:
                found.append((entry, shared))
        found.sort(key=lambda pair: -self._order[pair[0].query_id])
        return found

    def add(self, entry: Entry) -> None:
        """Remember ``entry`` (its query id must be new; oldest first: a restored window is added in order)."""
        if entry.query_id in self._entries:
            raise ValueError(f"query detector: query id {entry.query_id!r} is already remembered")
        self._entries[entry.query_id] = entry
        self._order[entry.query_id] = self._added
        self._added += 1
        self._digests[entry.fingerprint.digest] = entry.query_id
        for h in entry.fingerprint.hashes:
            self._index.setdefault(h, []).append(entry.query_id)

    def evict(self, now: float, max_entries: int, max_age_s: float | None) -> int:
        """Forget the oldest entries beyond ``max_entries`` or older than ``max_age_s``; how many."""
        evicted = 0
        while self._entries:
            query_id, entry = next(iter(self._entries.items()))
            too_old = max_age_s is not None and entry.time < now - max_age_s
            if len(self._entries) <= max_entries and not too_old:
                break
            self._forget(query_id, entry)
            evicted += 1
        return evicted

    def _forget(self, query_id: str, entry: Entry) -> None:
        del self._entries[query_id]
        del self._order[query_id]
        if self._digests.get(entry.fingerprint.digest) == query_id:
            del self._digests[entry.fingerprint.digest]
        for h in entry.fingerprint.hashes:
            ids = self._index[h]
            ids.remove(query_id)  # the oldest is first: a short scan
            if not ids:
                del self._index[h]


@lru_cache(maxsize=256)
def _layout(height: int, width: int,
            config: QueryDetectorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.uint64, np.ndarray]:
    """The sampled flat indices ``(windows * 6,)`` (two horizontally adjacent pixels per window,
    RGB), per-value quantization offsets of the index windows, their salts, the geometry's salt
    and which windows straddle a JPEG block edge: a function of the seed and the geometry only."""
    rng = np.random.default_rng([config.seed, height, width])
    rows = rng.integers(0, height, size=config.windows)
    cols = rng.integers(0, max(width - 1, 1), size=config.windows)
    if width >= 16:  # the odd windows straddle a JPEG block edge (columns 8k+7 | 8k+8)
        cols[1::2] = 8 * rng.integers(0, (width - 8) // 8, size=config.windows // 2) + 7
    right = np.minimum(cols + 1, width - 1)  # a one-pixel-wide image reads its pixel twice
    pixels = np.stack([rows * width + cols, rows * width + right], axis=1)  # (windows, 2)
    flat = (pixels[:, :, None] * 3 + np.arange(3)).reshape(-1)
    offsets = rng.integers(0, config.quant_step, size=config.index_windows * WINDOW).astype(np.int16)
    salts = rng.integers(1, 1 << 62, size=config.index_windows, dtype=np.int64).astype(np.uint64)
    geometry_salt = np.uint64(int(rng.integers(1, 1 << 62)))
    block_edge = (cols % 8 == 7) & (right == cols + 1)
    for array in (flat, offsets, salts, block_edge):
        array.setflags(write=False)
    return flat, offsets, salts, geometry_salt, block_edge


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic), kept to 63 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK63


def check_image(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous ``(H, W, 3)`` uint8 array, or a ValueError saying what it is."""
    if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
            or image.shape[2] != 3 or image.size == 0):
        what = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"query detector: expected a non-empty (H, W, 3) uint8 array, got {what}")
    return np.ascontiguousarray(image)


def fingerprint(image: np.ndarray, config: QueryDetectorConfig) -> Fingerprint:
    """The digest, sample and position-bound hashes of one decoded RGB image."""
    image = check_image(image)
    return fingerprint_rows(image.shape[0], image.shape[1], [image], config)


def fingerprint_rows(height: int, width: int, strips: Iterable[np.ndarray], config: QueryDetectorConfig) -> Fingerprint:
    """:func:`fingerprint` of an ``height`` x ``width`` image given as successive strips of rows
    (each ``(rows, width, 3)`` uint8, top to bottom), so a large upload is never held whole; the
    same fingerprint as the whole image's. ValueError when the strips do not make that image."""
    flat, offsets, salts, geometry_salt, _ = _layout(height, width, config)
    sample = np.empty(len(flat), np.uint8)
    digest = hashlib.sha256(b"%d,%d:" % (height, width))
    top = 0
    for strip in strips:
        strip = check_image(strip)
        if strip.shape[1] != width or top + strip.shape[0] > height:
            raise ValueError(f"query detector: a strip of shape {strip.shape} at row {top} does not fit a "
                             f"{height}x{width} image")
        lo, hi = top * width * 3, (top + strip.shape[0]) * width * 3
        inside = (flat >= lo) & (flat < hi)
        sample[inside] = strip.reshape(-1)[flat[inside] - lo]
        digest.update(memoryview(strip).cast("B"))  # SHA-NI: about 0.8 ms per 0.5 MB here
        top += strip.shape[0]
    if top != height:
        raise ValueError(f"query detector: strips of {top} rows for a {height}x{width} image")
    n = config.index_windows * WINDOW
    levels = ((sample[:n].astype(np.int16) + offsets) // config.quant_step).astype(np.uint64)
    levels = levels.reshape(config.index_windows, WINDOW)
    code = np.zeros(config.index_windows, dtype=np.uint64)
    for j in range(WINDOW):  # a level is <= 255 // 2 + 1: 8 bits each, 48 bits in all
        code = (code << np.uint64(8)) | levels[:, j]
    with np.errstate(over="ignore"):
        hashes = _mix(_mix(code ^ salts) ^ geometry_salt)
    return Fingerprint((height, width), digest.digest()[:16], sample, tuple(int(h) for h in hashes))


@dataclass(frozen=True)
class Differences:
    """The sampled difference between a query and each of several earlier images."""

    linf: np.ndarray  # int, max |difference| per earlier image
    texture_ratio: np.ndarray  # mean |diff| on the flatter half of windows / on the textured half
    changed: np.ndarray  # share of sampled values that differ
    channel_corr: np.ndarray  # mean correlation of the difference between R, G and B
    block_ratio: np.ndarray  # the difference's step across a JPEG block edge / inside a block
    inner_ratio: np.ndarray  # the difference's step inside a block / its mean size

    def jpeg_like(self, config: QueryDetectorConfig) -> np.ndarray:
        """Two of the three traces of JPEG requantization: the difference follows the texture
        (ratio below ``jpeg_texture_ratio``), the channels move together (the error is mostly in
        luma: correlation >= ``jpeg_channel_corr``), it steps at the 8-pixel block grid (block
        ratio >= ``jpeg_block_ratio``); each alone is common in attacks (an interpolation moves
        the channels together), two together are rare (``docs/detector.md``). And it varies
        inside the blocks (``inner_ratio`` >= ``jpeg_min_inner``): requantization rounds every
        DCT coefficient, so its error has AC content; an offset constant per block (DC only) is
        not what a re-encode produces."""
        votes = ((self.texture_ratio < config.jpeg_texture_ratio).astype(int)
                 + (self.channel_corr >= config.jpeg_channel_corr) + (self.block_ratio >= config.jpeg_block_ratio))
        return (votes >= 2) & (self.inner_ratio >= config.jpeg_min_inner)

    def matches(self, config: QueryDetectorConfig) -> np.ndarray:
        """Small (``max_linf``), without the traces of JPEG requantization, and noise-like:
        confined to few values (a local change, as Square and SimBA steps make) or spread over
        flat and textured windows alike (``min_texture_ratio``; a re-encoding changes textured
        windows most)."""
        local = self.changed <= config.max_sparse_changed
        even = self.texture_ratio >= config.min_texture_ratio
        return (self.linf <= config.max_linf) & (local | even) & ~self.jpeg_like(config)


def differences(sample: np.ndarray, earlier: np.ndarray, margin: int, block_edge: np.ndarray) -> Differences:
    """Compare a query's sample ``(n,)`` with earlier samples ``(m, n)`` (same layout).

    A window's texture is the mean |difference| between its two pixels in the *query*. Windows
    with a query value within ``margin`` of 0 or 255 are left out of the ratio (noise there is
    clipped: a black background would look untouched); the rest are split at the median texture
    (ties by position) into a flat and a textured half. With fewer than 16 such windows the
    ratio is 1 (no evidence either way). ``block_edge`` marks the windows that straddle a JPEG
    block edge; the block ratio compares the difference's step between the two pixels there with
    the step elsewhere (1 for noise; 0.05 keeps 0/0 at 1 in both ratios); the inner ratio compares
    the step inside blocks with the mean |difference| (about 1.35 for uniform noise, 0 for an
    offset constant per block; 0.05 again keeps 0/0 finite).
    """
    query = sample.astype(np.int16).reshape(-1, 2, 3)
    signed = earlier.astype(np.int16).reshape(len(earlier), -1, 2, 3) - query  # (m, windows, 2, 3)
    diff = np.abs(signed)
    inside = ((query > margin) & (query < 255 - margin)).all(axis=(1, 2))
    kept = np.flatnonzero(inside)
    if len(kept) >= 16:
        texture = np.abs(query[kept, 0, :] - query[kept, 1, :]).mean(axis=1)
        order = kept[np.argsort(texture, kind="stable")]
        half = len(order) // 2
        per_window = diff.mean(axis=(2, 3))  # (m, windows)
        flat, textured = per_window[:, order[:half]].mean(axis=1), per_window[:, order[half:]].mean(axis=1)
        ratio = (flat + 0.05) / (textured + 0.05)
    else:
        ratio = np.ones(len(earlier))
    channels = signed.reshape(len(earlier), -1, 3).astype(np.float64)
    channels -= channels.mean(axis=1, keepdims=True)
    spread = np.sqrt((channels**2).mean(axis=1))  # (m, 3)
    corr = [(channels[:, :, i] * channels[:, :, j]).mean(axis=1) / np.maximum(spread[:, i] * spread[:, j], 1e-12)
            for i, j in ((0, 1), (0, 2), (1, 2))]
    step = np.abs(signed[:, :, 0, :] - signed[:, :, 1, :]).mean(axis=2)  # (m, windows)
    if block_edge.any() and not block_edge.all():
        block = (step[:, block_edge].mean(axis=1) + 0.05) / (step[:, ~block_edge].mean(axis=1) + 0.05)
    else:
        block = np.ones(len(earlier))
    if block_edge.all():  # no window inside a block (never at sizes that have blocks): no evidence
        inner = np.ones(len(earlier))
    else:
        inner = (step[:, ~block_edge].mean(axis=1) + 0.05) / (diff.mean(axis=(1, 2, 3)) + 0.05)
    return Differences(diff.max(axis=(1, 2, 3)), ratio, (diff > 0).mean(axis=(1, 2, 3)),
                       np.mean(corr, axis=0), block, inner)


class QueryDetector:
    """``detect(image) -> (report, is_adversarial)`` over a bounded store of earlier queries.

    ``source_key`` maps a source id to its identity for rule 3 (callers pass
    ``identity_key(config.reputation.group_by_prefix)`` of :mod:`twostream.core.reputation.keys`, so that
    one setting decides what one identity is, for Algorithm 2 and the detector alike); None: the
    source id itself. It is applied to the raw ids the store keeps, a few thousand of them cached.
    """

    def __init__(self, config: QueryDetectorConfig | None = None, store: DetectorStore | None = None,
                 source_key: Callable[[str], str] | None = None) -> None:
        self.config = config or QueryDetectorConfig()
        self.store: DetectorStore = store if store is not None else MemoryStore()
        self._key = lru_cache(maxsize=4096)(source_key) if source_key is not None else None
        self._count = 0

    def identity(self, source: str | None) -> str | None:
        """What rule 3 counts ``source`` under: its ``source_key`` (or itself); None stays None."""
        if source is None or self._key is None:
            return source
        return self._key(source)

    def detect(self, image: np.ndarray, *, source: str | None = None, query_id: str | None = None,
               now: float = 0.0) -> tuple[QueryReport, bool]:
        """Judge one query against the window, then remember it (unless an exact re-upload).

        ``query_id`` names it in later reports (default: its arrival number); ``now`` is its time
        in seconds for the age bound (the caller's clock, so replays are deterministic; it should
        not go backwards, as eviction takes the oldest arrivals first).
        """
        return self.judge(fingerprint(image, self.config), source=source, query_id=query_id, now=now)

    def judge(self, fp: Fingerprint, *, source: str | None = None, query_id: str | None = None,
              now: float = 0.0) -> tuple[QueryReport, bool]:
        """:meth:`detect` on an image's :func:`fingerprint` (made with this detector's config),
        for callers that fingerprint where the pixels are and judge where the state is."""
        config = self.config
        if query_id is None:
            query_id = f"q{self._count}"
        self._count += 1
        same, found = self.store.lookup(fp, config.min_shared, now, config.max_entries, config.max_age_s)
        if same is not None:
            report = QueryReport(query_id, source, False, duplicate_of=same.query_id)
            return report, False
        matches: list[Match] = []
        near: tuple[str, ...] = ()
        own: tuple[str, ...] = ()
        source_near = 0
        samples = np.stack([entry.fingerprint.sample for entry, _ in found[: config.max_candidates]]) if found else None
        if samples is not None:  # the cheap L-inf first, the statistics for the small ones only
            small = np.flatnonzero(np.abs(samples.astype(np.int16) - fp.sample).max(axis=1) <= config.max_linf)
            near = tuple(found[k][0].query_id for k in small)
            mine = self.identity(source)
            own = tuple(found[k][0].query_id for k in small
                        if mine is not None and self.identity(found[k][0].source) == mine)
            source_near = len(own)
            if len(small):
                diff = differences(fp.sample, samples[small], config.max_linf // 2, _layout(*fp.geometry, config)[4])
                ok = diff.matches(config)
                matches = [Match(found[k][0].query_id, found[k][0].source, found[k][1], int(diff.linf[i]),
                                 *(round(float(v[i]), 4) for v in (diff.texture_ratio, diff.changed, diff.channel_corr,
                                                                   diff.block_ratio, diff.inner_ratio)))
                           for i, k in enumerate(small) if ok[i]]
                matches.sort(key=lambda m: (m.linf, -m.shared, m.query_id))
        self.store.remember(Entry(query_id, source, now, fp), config.max_entries, config.max_age_s)
        by_matches = len(matches) >= config.min_matches
        flagged = by_matches or (config.min_source_near is not None and source_near >= config.min_source_near)
        evidence = () if not flagged else tuple(m.query_id for m in matches) if by_matches else own
        if flagged:
            log.info("query %s from %s: %d matches, %d near-duplicates (%d from the same identity; closest %s)",
                     query_id, source, len(matches), len(near), source_near,
                     matches[0].query_id if matches else near[0])
        return QueryReport(query_id, source, flagged, None, tuple(matches), len(found), near,
                           source_near, evidence), flagged
