"""The stateful query detector (core/query_detector): attack runs are flagged within a handful of
queries, honest re-uploads (exact copies across sources, re-encodings, resizes, crops) and
distinct photographs are not; every report is checked against a brute-force reference of the rules
written here from the docstring (no index, plain Python over the sampled values)."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import texture_run
from twostream.core.config import PrefixGrouping
from twostream.core.query_detector import (MemoryStore, QueryDetector, QueryDetectorConfig, _layout,
                                           fingerprint)
from twostream.core.reputation import reputation_key

DEMO = sorted((Path(__file__).resolve().parents[2] / "twostream" / "demo" / "data").glob("*.jpg"))
CONFIG = QueryDetectorConfig()


def photo(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def jpeg(image: np.ndarray, quality: int, subsampling: int = -1) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def reference_match(query: np.ndarray, earlier: np.ndarray, config: QueryDetectorConfig) -> dict | None:
    """The match rule by hand from the module docstring: same geometry, distinct pixels,
    >= min_shared equal hashes at the same index position, sampled |diff| <= max_linf, not
    JPEG-like (two of: follows texture, channels correlated, steps at block edges; and varying
    inside blocks) and noise-like (few values changed, or spread evenly over flat and textured
    windows). ``near`` says whether it is within max_linf at all (the near-duplicate count)."""
    if query.shape != earlier.shape or np.array_equal(query, earlier):
        return None
    fq, fe = fingerprint(query, config), fingerprint(earlier, config)
    shared = sum(a == b for a, b in zip(fq.hashes, fe.hashes))
    if shared < config.min_shared:
        return None
    height, width = query.shape[:2]
    flat = _layout(height, width, config)[0]
    pixel = [divmod(int(i) // 3, width) + (int(i) % 3,) for i in flat]  # (row, col, channel)
    q = [int(query[r, c, ch]) for r, c, ch in pixel]
    e = [int(earlier[r, c, ch]) for r, c, ch in pixel]
    assert q == [int(v) for v in fq.sample] and e == [int(v) for v in fe.sample]
    signed = [b - a for a, b in zip(q, e)]
    diffs = [abs(d) for d in signed]
    n = len(q) // 6
    margin = config.max_linf // 2  # windows near black or white are left out (noise is clipped there)
    kept = [i for i in range(n) if all(margin < v < 255 - margin for v in q[6 * i: 6 * i + 6])]
    texture = {i: sum(abs(q[6 * i + c] - q[6 * i + 3 + c]) for c in range(3)) / 3 for i in kept}
    ordered = sorted(kept, key=lambda i: (texture[i], i))
    half = len(ordered) // 2
    mean = lambda ws: sum(sum(diffs[6 * i: 6 * i + 6]) for i in ws) / (6 * len(ws))  # noqa: E731
    ratio = (mean(ordered[:half]) + 0.05) / (mean(ordered[half:]) + 0.05) if len(kept) >= 16 else 1.0
    changed = sum(d > 0 for d in diffs) / len(diffs)
    channels = [[signed[3 * p + c] for p in range(2 * n)] for c in range(3)]
    centred = [[v - sum(ch) / len(ch) for v in ch] for ch in channels]
    rms = [(sum(v * v for v in ch) / len(ch)) ** 0.5 for ch in centred]
    corr = sum(sum(a * b for a, b in zip(centred[i], centred[j])) / len(centred[i]) / max(rms[i] * rms[j], 1e-12)
               for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    edge = [pixel[6 * i][1] % 8 == 7 and pixel[6 * i + 3][1] == pixel[6 * i][1] + 1 for i in range(n)]
    step = [sum(abs(signed[6 * i + c] - signed[6 * i + 3 + c]) for c in range(3)) / 3 for i in range(n)]
    at_edge = [s for s, on in zip(step, edge) if on]
    inside = [s for s, on in zip(step, edge) if not on]
    block = (sum(at_edge) / len(at_edge) + 0.05) / (sum(inside) / len(inside) + 0.05) if at_edge and inside else 1.0
    inner = (sum(inside) / len(inside) + 0.05) / (sum(diffs) / len(diffs) + 0.05) if inside else 1.0
    linf = max(diffs)
    votes = (ratio < config.jpeg_texture_ratio) + (corr >= config.jpeg_channel_corr) + (block >= config.jpeg_block_ratio)
    jpeg_like = votes >= 2 and inner >= config.jpeg_min_inner
    noise_like = ratio >= config.min_texture_ratio or changed <= config.max_sparse_changed
    return {"shared": shared, "linf": linf, "ratio": ratio, "changed": changed, "corr": corr, "block": block,
            "inner": inner, "near": linf <= config.max_linf,
            "match": linf <= config.max_linf and not jpeg_like and noise_like}


def run_and_check(images: list[np.ndarray], config: QueryDetectorConfig = CONFIG,
                  sources: list[str] | None = None) -> list:
    """Feed the stream to a detector and, beside it, to the brute-force reference (a window large
    enough to keep everything); every report must agree. Returns the reports."""
    detector = QueryDetector(config)
    reports = []
    remembered: list[tuple[str, np.ndarray]] = []
    for i, image in enumerate(images):
        source = sources[i] if sources else f"s{i}"
        report, flagged = detector.detect(image, source=source, query_id=f"q{i}")
        assert flagged == report.is_adversarial
        twin = next((qid for qid, old in remembered if np.array_equal(old, image)), None)
        assert report.duplicate_of == twin
        if twin is None:
            compared = {qid: reference_match(image, old, config) for qid, old in remembered}
            verified = [(qid, m) for qid, m in reversed(compared.items()) if m is not None][: config.max_candidates]
            expected = {qid: m for qid, m in compared.items() if m is not None and m["match"]}
            got = {m.query_id: m for m in report.matches}
            assert report.near == tuple(qid for qid, m in verified if m["near"]), i
            own = sum(m["near"] and (sources[int(qid[1:])] if sources else f"s{qid[1:]}") == source
                      for qid, m in verified)
            assert report.source_near == own
            assert set(got) == set(expected), i
            for qid, m in expected.items():
                assert (got[qid].shared, got[qid].linf) == (m["shared"], m["linf"])
                assert got[qid].texture_ratio == pytest.approx(m["ratio"], abs=1e-3)
                assert got[qid].changed == pytest.approx(m["changed"], abs=1e-3)
                assert got[qid].channel_corr == pytest.approx(m["corr"], abs=1e-3)
                assert got[qid].block_ratio == pytest.approx(m["block"], abs=1e-3)
                assert got[qid].inner_ratio == pytest.approx(m["inner"], abs=1e-3)
            by_source = config.min_source_near is not None and own >= config.min_source_near
            assert flagged == (len(expected) >= config.min_matches or by_source)
            remembered.append((f"q{i}", image))
        else:
            assert not flagged and report.matches == ()
        reports.append(report)
    assert len(detector.store) == len(remembered)
    return reports


def noise_run(image: np.ndarray, steps: int, seed: int = 0, eps: int = 8, step: int = 2) -> list[np.ndarray]:
    """A random-noise walk (Square/SimBA-like): each query the last plus +-step per value,
    kept within L-inf eps of the photograph."""
    rng = np.random.default_rng(seed)
    x0 = image.astype(np.int16)
    x = x0.copy()
    run = []
    for _ in range(steps):
        x = np.clip(x + rng.choice([-step, step], size=x.shape), x0 - eps, x0 + eps).clip(0, 255)
        run.append(x.astype(np.uint8))
    return run


def first_flag(reports: list) -> int | None:
    return next((i for i, r in enumerate(reports) if r.is_adversarial), None)


def test_a_noise_run_is_flagged_after_min_matches_queries_and_names_the_earlier_queries() -> None:
    image = photo(DEMO[0])
    sources = [f"attacker-{i}" for i in range(12)]  # a new identity for every query
    reports = run_and_check(noise_run(image, 12), sources=sources)
    # every query is within 2 * 8 of every other one and changes values everywhere: query k has k matches
    assert [len(r.matches) for r in reports] == list(range(12))
    assert first_flag(reports) == CONFIG.min_matches
    flagged = reports[CONFIG.min_matches]
    assert {m.query_id for m in flagged.matches} == {f"q{i}" for i in range(CONFIG.min_matches)}
    assert {m.source for m in flagged.matches} == {f"attacker-{i}" for i in range(CONFIG.min_matches)}
    assert flagged.matches[0].query_id == f"q{CONFIG.min_matches - 1}"  # the closest: the last step
    assert flagged.evidence == tuple(m.query_id for m in flagged.matches)


def test_an_hsj_like_interpolation_run_is_flagged_within_a_handful() -> None:
    """A boundary walk: interpolations from another photograph towards the original, the blend
    weight shrinking by small steps (HopSkipJump's and Boundary's approach to the original)."""
    x = photo(DEMO[1]).astype(np.float64)
    with Image.open(DEMO[2]) as other:
        y = np.asarray(other.convert("RGB").resize((x.shape[1], x.shape[0]))).astype(np.float64)
    alphas = np.linspace(0.30, 0.20, 16)
    run = [np.round((1 - a) * x + a * y).astype(np.uint8) for a in alphas]
    reports = run_and_check(run)
    assert first_flag(reports) is not None and first_flag(reports) <= CONFIG.min_matches + 4


def test_a_square_like_run_is_flagged() -> None:
    """Square-attack-like: a start at +-8 per column, then one random square re-drawn per query."""
    rng = np.random.default_rng(3)
    x0 = photo(DEMO[3]).astype(np.int16)
    x = (x0 + rng.choice([-8, 8], size=(1, x0.shape[1], 3))).clip(0, 255)
    run = []
    for _ in range(20):
        x = x.copy()
        side = int(rng.integers(8, 40))
        r, c = (int(rng.integers(0, n - side)) for n in x0.shape[:2])
        x[r:r + side, c:c + side] = (x0[r:r + side, c:c + side] + rng.choice([-8, 8], size=(1, 1, 3))).clip(0, 255)
        run.append(x.astype(np.uint8))
    reports = run_and_check(run)
    assert first_flag(reports) is not None and first_flag(reports) <= CONFIG.min_matches + 6


def block_offset_run() -> list[np.ndarray]:
    """Query k = x0 + c_k * P, P = +-1 per 8x8 block (equal on R, G, B), c_k a permutation of
    -4..4, x0 kept in [16, 239] (the test below works out its matches by hand)."""
    rng = np.random.default_rng(11)
    x0 = np.clip(photo(DEMO[0]), 16, 239).astype(np.int16)
    h, w = x0.shape[:2]
    pattern = np.repeat(np.repeat(rng.choice([-1, 1], size=(-(-h // 8), -(-w // 8), 1)), 8, 0), 8, 1)[:h, :w]
    return [(x0 + c * pattern).astype(np.uint8) for c in rng.permutation(np.arange(-4, 5))]


def test_a_block_offset_run_that_the_jpeg_veto_let_through_is_flagged_like_noise() -> None:
    """The measured evasion (``twostream blackbox --adaptive jpeg:4``: 0 detections in 4,400
    queries): queries that differ by an offset constant per 8x8 block, the same on R, G and B.
    Built so that the rules work out by hand: query k is x0 + c_k * P with P = +-1 per block,
    c_k = -4..4, x0 kept in [16, 239] (nothing clips). Between queries i and j the sampled
    difference is (c_i - c_j) * P: |diff| = |c_i - c_j| <= 8 on every value (small), the same on
    flat and textured windows (texture ratio exactly 1: noise-like), R, G and B equal
    (correlation 1) and stepping only across block edges (step 0 inside blocks, block ratio
    >= 1.15): two JPEG traces, so the old veto called every pair JPEG-like and none matched. But
    it does not vary inside the blocks, as requantization error does: inner ratio =
    0.05 / (|c_i - c_j| + 0.05) <= 0.048 < jpeg_min_inner = 0.3. So every pair matches, query k
    has k matches, and the 9th query (min_matches + 1) is flagged, as a plain noise run is."""
    run = block_offset_run()
    reports = run_and_check(run)
    assert [len(r.matches) for r in reports] == list(range(9))
    assert all(m.inner_ratio == pytest.approx(0.05 / (m.linf + 0.05), abs=1e-4) for m in reports[-1].matches)
    assert all(m.channel_corr == pytest.approx(1.0) and m.texture_ratio == pytest.approx(1.0)
               and m.block_ratio >= CONFIG.jpeg_block_ratio for m in reports[-1].matches)
    assert first_flag(reports) == CONFIG.min_matches
    before = QueryDetectorConfig(jpeg_min_inner=0.0, min_source_near=None)  # the rules of the measured evasion
    assert not any(r.matches or r.is_adversarial for r in run_and_check(run, before))


def test_a_run_hidden_in_texture_from_one_source_is_flagged_by_its_near_duplicates() -> None:
    """The texture-hidden run (:func:`texture_run`): query k has k near-duplicates and no match.
    From one source, query min_source_near + 1 is flagged by the source's near-duplicate count;
    from a new source per query it is not (the known weakness)."""
    run = texture_run(CONFIG.min_source_near + 3)
    one, many = QueryDetector(CONFIG), QueryDetector(CONFIG)
    reports = [one.detect(x, source="mallory", query_id=f"q{k}")[0] for k, x in enumerate(run)]
    assert [(len(r.near), r.source_near, len(r.matches)) for r in reports] == [(k, k, 0) for k in range(len(run))]
    assert [r.is_adversarial for r in reports] == [k >= CONFIG.min_source_near for k in range(len(run))]
    assert reports[-1].evidence == tuple(f"q{k}" for k in reversed(range(len(run) - 1)))  # newest first
    rotated = [many.detect(x, source=f"id{k}", query_id=f"q{k}")[0] for k, x in enumerate(run)]
    assert [(len(r.near), r.source_near, r.is_adversarial) for r in rotated] == [(k, 0, False) for k in range(len(run))]
    # the reference agrees on a short prefix (it is slow): same near-duplicates, same own-source counts
    run_and_check(run[:6], sources=["mallory"] * 6)


GROUPED = partial(reputation_key, grouping=PrefixGrouping(ipv4=24, ipv6=64))  # reputation.group_by_prefix


def test_rotating_ids_inside_one_network_are_one_identity_when_grouped() -> None:
    """The texture-hidden run from a fresh address of one IPv6 /64 per query. Rule 3 under
    ``reputation.group_by_prefix`` (source_key = reputation_key, /64): every address is
    2001:db8:5:5::/64, so the run is one identity and flagged at the same query as from one id
    (query k: k near-duplicates, all from its network; flagged from k = min_source_near = 16),
    with the same evidence. Grouping off (no source_key, or the key with grouping None): ids
    compared as text, no query flagged. Addresses of different /64s (one per query, all in one
    /48) are not merged. Reports and the store keep the raw ids."""
    n = CONFIG.min_source_near + 3
    run = texture_run(n)
    one_net = [f"2001:db8:5:5::{k + 1:x}" for k in range(n)]
    grouped = QueryDetector(CONFIG, source_key=GROUPED)
    reports = [grouped.detect(x, source=s, query_id=f"q{k}")[0] for k, (x, s) in enumerate(zip(run, one_net))]
    assert [(len(r.near), r.source_near, len(r.matches)) for r in reports] == [(k, k, 0) for k in range(n)]
    assert [r.is_adversarial for r in reports] == [k >= 16 for k in range(n)]
    assert reports[-1].evidence == tuple(f"q{k}" for k in reversed(range(n - 1)))
    assert [r.source for r in reports] == one_net and [e.source for e in grouped.store] == one_net
    one = QueryDetector(CONFIG)  # the same run from one id: the same flags and evidence
    alone = [one.detect(x, source="mallory", query_id=f"q{k}")[0] for k, x in enumerate(run)]
    assert [(r.is_adversarial, r.evidence) for r in alone] == [(r.is_adversarial, r.evidence) for r in reports]

    for off in (QueryDetector(CONFIG), QueryDetector(CONFIG, source_key=partial(reputation_key, grouping=None))):
        plain = [off.detect(x, source=s, query_id=f"q{k}")[0] for k, (x, s) in enumerate(zip(run, one_net))]
        assert [(len(r.near), r.source_near, r.is_adversarial) for r in plain] == [(k, 0, False) for k in range(n)]
    nets = QueryDetector(CONFIG, source_key=GROUPED)
    apart = [nets.detect(x, source=f"2001:db8:5:{k:x}::1", query_id=f"q{k}")[0] for k, x in enumerate(run)]
    assert [(len(r.near), r.source_near, r.is_adversarial) for r in apart] == [(k, 0, False) for k in range(n)]


def test_a_block_offset_run_is_flagged_by_its_matches_whatever_the_grouping() -> None:
    """The block-offset run (9 queries, query k has k matches: rule 2) from a fresh address of
    one /64 per query: flagged at query min_matches (8) with grouping on, off, and from one id,
    with the same evidence (rule 2 does not look at identities); grouped, its 8 near-duplicates
    are all its network's."""
    run = block_offset_run()
    one_net = [f"2001:db8:6:6::{k + 1:x}" for k in range(len(run))]
    seen = []
    for detector, sources in ((QueryDetector(CONFIG, source_key=GROUPED), one_net), (QueryDetector(CONFIG), one_net),
                              (QueryDetector(CONFIG), ["mallory"] * len(run))):
        reports = [detector.detect(x, source=s, query_id=f"q{k}")[0] for k, (x, s) in enumerate(zip(run, sources))]
        assert [r.is_adversarial for r in reports] == [k >= CONFIG.min_matches for k in range(len(run))]
        seen.append((reports[-1].evidence, reports[-1].source_near))
    assert [own for _, own in seen] == [8, 0, 8] and len({evidence for evidence, _ in seen}) == 1


def test_what_is_not_an_address_is_its_own_identity() -> None:
    """Mixed ids under grouping (IPv4 /24, IPv6 /64), min_source_near 3, the texture-hidden run
    (every query near every earlier one). Identities by hand: A = 2001:db8:7:7::/64 (a zone id
    is dropped), B = the malformed text 2001:db8:7:7::zz (not an address: itself, never its /64),
    C = 192.0.2.0/24 (an IPv4-mapped IPv6 address counts as IPv4), D = 192.0.3.0/24, E =
    2001:db8:7:8::/64, F = itself. Query k's own near-duplicates are the earlier queries of its
    identity; flagged where that reaches 3: queries 10 and 12 (the 4th and 5th of A). Grouping
    off: only B's repeated text is one id (counts 0, 1, 2): none flagged."""
    config = QueryDetectorConfig(min_source_near=3)
    sources = ["2001:db8:7:7::1", "2001:db8:7:7::zz", "2001:db8:7:7::2", "192.0.2.1", "2001:db8:7:7::zz",
               "::ffff:192.0.2.9", "2001:db8:7:8::1", "2001:db8:7:7::3", "192.0.3.1", "2001:db8:7:7::zz",
               "2001:db8:7:7::fffe", "192.0.2.250", "2001:db8:7:7::4%eth0", "not an address"]
    own = [0, 0, 1, 0, 1, 1, 0, 2, 0, 2, 3, 2, 4, 0]  # A B A C B C E A D B A C A F
    run = texture_run(len(sources))
    grouped = QueryDetector(config, source_key=GROUPED)
    reports = [grouped.detect(x, source=s, query_id=f"q{k}")[0] for k, (x, s) in enumerate(zip(run, sources))]
    assert [r.source_near for r in reports] == own
    assert [k for k, r in enumerate(reports) if r.is_adversarial] == [10, 12]
    assert reports[10].evidence == ("q7", "q2", "q0")  # A's earlier queries, newest first
    plain = QueryDetector(config)
    counts = [plain.detect(x, source=s, query_id=f"q{k}")[0].source_near for k, (x, s) in enumerate(zip(run, sources))]
    assert counts == [0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0]


# Source ids and their identity under /24 and /64 grouping, labelled by hand (not by reputation_key):
# addresses of one network in several spellings, other networks, and hostile text that is no address.
POOL = {
    "2001:db8:1:1::1": "A", "2001:db8:1:1::ffff": "A", "2001:db8:1:1:0:0:0:2": "A", "2001:DB8:1:1::3": "A",
    "2001:db8:1:1:8000::1": "A", "2001:db8:1:1::5%eth0": "A", "2001:db8:1:2::1": "B", "2001:db8:2::1": "B2",
    "192.0.2.1": "C", "192.0.2.254": "C", "::ffff:192.0.2.7": "C", "192.0.20.1": "D", "192.0.3.1": "D2",
    "2001:db8:1:1::zz": "bad6", " 192.0.2.1": "space", "192.0.2.01": "zero", "user-17": "user-17", "": "",
}
SOURCES = sorted(POOL)


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.sampled_from(SOURCES + [None]), min_size=12, max_size=12))
@example(picks=["2001:db8:1:1::1", "2001:db8:1:1::zz", "2001:DB8:1:1::3", "::ffff:192.0.2.7", None,
                "2001:db8:1:2::1", "2001:db8:1:1::5%eth0", "192.0.2.01", "2001:db8:1:1:8000::1", "192.0.2.1",
                "192.0.2.254", "2001:db8:1:1::ffff"])  # A (0, 2, 6, 8, 11) flagged at 8 and 11; C (3, 9, 10) not
def test_rule_3_counts_each_identity_on_generated_streams(picks: list[str | None]) -> None:
    """The texture-hidden run (every query near every earlier one, no match) from generated
    source ids, grouped: a query's own near-duplicates are the earlier queries whose hand label
    is its own (a query with no source counts none and is counted by none); flagged where that
    reaches min_source_near = 3."""
    config = QueryDetectorConfig(min_source_near=3)
    detector = QueryDetector(config, source_key=GROUPED)
    labels = [POOL[s] if s is not None else None for s in picks]
    for k, (x, source) in enumerate(zip(texture_run(len(picks)), picks)):
        report, flagged = detector.detect(x, source=source, query_id=f"q{k}")
        own = 0 if labels[k] is None else sum(label == labels[k] for label in labels[:k])
        assert (report.source, report.source_near, flagged) == (source, own, own >= 3)


def test_distinct_photographs_are_never_matched() -> None:
    images = [photo(p) for p in DEMO]
    reports = run_and_check(images)
    assert all(r.matches == () and not r.is_adversarial for r in reports)


def test_distinct_shared_photographs_are_never_matched(assets_dir: Path) -> None:
    paths = sorted((assets_dir / "imagenet-sample").glob("*.JPEG"))[::10]
    if not paths:
        pytest.skip(f"no photographs in {assets_dir / 'imagenet-sample'}")
    reports = run_and_check([photo(p) for p in paths])
    assert all(r.matches == () and not r.is_adversarial for r in reports)


def test_exact_reuploads_across_sources_are_one_query() -> None:
    images = [photo(p) for p in DEMO[:3]]
    stream = [images[i % 3].copy() for i in range(30)]
    reports = run_and_check(stream, sources=[f"user-{i}" for i in range(30)])
    assert [r.duplicate_of for r in reports] == [None] * 3 + [f"q{i % 3}" for i in range(3, 30)]
    assert not any(r.is_adversarial for r in reports)


def test_reencodings_resizes_and_crops_of_one_photograph_are_not_flagged() -> None:
    for path in DEMO[:2]:
        image = photo(path)
        h, w = image.shape[:2]
        variants = [jpeg(image, q) for q in range(50, 101, 5)] + [jpeg(image, q) for q in (51, 94, 96, 99)]
        variants += [jpeg(image[: h - d, d:], 90) for d in (4, 8, 16)]
        variants += [np.asarray(Image.fromarray(image).resize((int(w * s), int(h * s)))) for s in (0.5, 0.75, 0.9)]
        variants += [jpeg(np.asarray(Image.fromarray(image).resize((w // 2, h // 2))), q) for q in (60, 75, 90)]
        reports = run_and_check(variants + variants[:5])  # and exact copies of some
        assert not any(r.is_adversarial for r in reports), path.name
        assert max(len(r.matches) for r in reports) < CONFIG.min_matches


def test_a_shuffled_honest_stream_of_shared_photographs_is_not_flagged(assets_dir: Path) -> None:
    """The honest model in small: originals, re-encodings, re-shares, resizes and crops of a few
    shared photographs, shuffled across sources."""
    paths = sorted((assets_dir / "imagenet-sample").glob("*.JPEG"))[5::97]
    if not paths:
        pytest.skip(f"no photographs in {assets_dir / 'imagenet-sample'}")
    rng = np.random.default_rng(7)
    stream = []
    for path in paths:
        image = photo(path)
        h, w = image.shape[:2]
        stream += [image, image.copy(), jpeg(image, 60), jpeg(image, 85), jpeg(image, 86), jpeg(image, 95),
                   jpeg(jpeg(image, 80), 90), jpeg(np.asarray(Image.fromarray(image).resize((w // 2, h // 2))), 75),
                   jpeg(np.ascontiguousarray(image[h // 10:, : w - w // 10]), 90)]
    order = rng.permutation(len(stream))
    reports = run_and_check([stream[i] for i in order], sources=[f"user{int(rng.integers(0, 50))}" for _ in order])
    assert not any(r.is_adversarial for r in reports)
    assert sum(r.duplicate_of is not None for r in reports) == len(paths)  # the copies


def test_every_jpeg_reencoding_of_shared_photographs_stays_undetected(assets_dir: Path) -> None:
    """The honest worst case of one size: all 102 JPEG re-encodings (quality 50-100, 4:4:4 and
    4:2:0) of a shared photograph, shuffled, each from its own source: near-duplicates of each
    other, yet no query gathers min_matches matches or min_near near-duplicates."""
    paths = sorted((assets_dir / "imagenet-sample").glob("*.JPEG"))[3::331]
    if not paths:
        pytest.skip(f"no photographs in {assets_dir / 'imagenet-sample'}")
    rng = np.random.default_rng(9)
    for path in paths:
        image = photo(path)
        variants = [jpeg(image, q, sub) for q in range(50, 101) for sub in (0, 2)]
        detector = QueryDetector(CONFIG)
        reports = [detector.detect(variants[i], source=f"user{i}", query_id=f"v{i}")[0]
                   for i in rng.permutation(len(variants))]
        assert not any(r.is_adversarial for r in reports), path.name
        assert max(len(r.matches) for r in reports) < CONFIG.min_matches
        assert max(len(r.near) for r in reports) > 0  # near-duplicates of each other, not matches


def test_the_same_bytes_in_another_geometry_are_not_a_reupload() -> None:
    pixels = np.arange(2 * 6 * 3, dtype=np.uint8)
    detector = QueryDetector()
    detector.detect(pixels.reshape(2, 6, 3), query_id="wide")
    report, _ = detector.detect(pixels.reshape(3, 4, 3), query_id="tall")
    assert report.duplicate_of is None and len(detector.store) == 2


def test_the_window_is_bounded_by_count_and_by_age() -> None:
    config = QueryDetectorConfig(max_entries=3, max_age_s=10.0, min_matches=1)
    run = noise_run(photo(DEMO[4]), 6, seed=1)
    detector = QueryDetector(config)
    for i, image in enumerate(run[:5]):
        report, _ = detector.detect(image, query_id=f"q{i}", now=float(i))
        assert len(detector.store) == min(i + 1, 3)
        assert {m.query_id for m in report.matches} == {f"q{j}" for j in range(max(0, i - 3), i)}
    report, flagged = detector.detect(run[5], query_id="late", now=4.0 + 10.5)  # q2..q4 too old now
    assert (report.matches, flagged, len(detector.store)) == ((), False, 1)
    # a forgotten image is a new query again, not a duplicate
    report, _ = detector.detect(run[0], query_id="again", now=15.0)
    assert report.duplicate_of is None


def test_only_the_newest_candidates_are_verified() -> None:
    config = QueryDetectorConfig(max_candidates=2, min_matches=2)
    detector = QueryDetector(config)
    reports = [detector.detect(image, query_id=f"q{i}")[0] for i, image in enumerate(noise_run(photo(DEMO[5]), 6, seed=2))]
    assert [r.candidates for r in reports] == [0, 1, 2, 3, 4, 5]
    assert [sorted(m.query_id for m in r.matches) for r in reports] == [[], ["q0"]] + [[f"q{i - 2}", f"q{i - 1}"] for i in range(2, 6)]
    assert [r.is_adversarial for r in reports] == [False, False, True, True, True, True]


def test_refusals_name_the_input() -> None:
    detector = QueryDetector()
    with pytest.raises(ValueError, match=r"\(4, 4\) uint8"):
        detector.detect(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        detector.detect(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="min_matches=0"):
        QueryDetectorConfig(min_matches=0)
    with pytest.raises(ValueError, match="max_candidates=3"):
        QueryDetectorConfig(max_candidates=3)
    with pytest.raises(ValueError, match="min_source_near=0"):
        QueryDetectorConfig(min_source_near=0)
    store = MemoryStore()
    image = photo(DEMO[0])
    detector = QueryDetector(store=store)
    detector.detect(image, query_id="a")
    with pytest.raises(ValueError, match="'a' is already remembered"):
        detector.detect(noise_run(image, 1)[0], query_id="a")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 24), st.integers(2, 24), st.integers(2, 12))
def test_any_small_stream_agrees_with_the_reference(seed: int, h: int, w: int, n: int) -> None:
    """Random small images, drawn near each other or not, some repeated: the index and the rules
    give what the brute-force reference gives."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3))
    images = []
    for _ in range(n):
        kind = rng.integers(0, 3)
        if kind == 0 and images:
            images.append(images[int(rng.integers(0, len(images)))].copy())
        elif kind == 1:
            images.append(np.clip(base + rng.integers(-6, 7, size=base.shape), 0, 255).astype(np.uint8))
        else:
            images.append(rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8))
    run_and_check(images, QueryDetectorConfig(min_matches=2, min_shared=4))
