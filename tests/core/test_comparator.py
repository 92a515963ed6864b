"""Algorithm 1: hand-worked cases and agreement of the vectorised and reference versions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostream.core.comparator import OTHER, compare, compare_one

CAT, DOG, AIRPLANE = 3, 5, 0
# A small hand-made table: three ImageNet classes are cats, two dogs, one airplane.
MAPPING = np.full(1000, OTHER, dtype=np.int8)
MAPPING[[281, 282, 285]] = CAT
MAPPING[[207, 208]] = DOG
MAPPING[404] = AIRPLANE


def one(high, low, p1=0.10, p2=0.20):
    """Run the vectorised comparator on a single image given as (index, prob) lists."""
    hi = np.array([[i for i, _ in high]])
    hp = np.array([[p for _, p in high]])
    li = np.array([[j for j, _ in low]])
    lp = np.array([[p for _, p in low]])
    return compare(hi, hp, li, lp, MAPPING, p1, p2)


def test_agreeing_top1_is_accepted_with_product_score():
    r = one([(281, 0.6), (207, 0.2), (1, 0.1), (2, 0.05), (3, 0.05)], [(CAT, 0.7), (DOG, 0.2)])
    assert r.accepted[0] and r.label[0] == CAT
    assert (r.high_rank[0], r.low_rank[0], r.imagenet_index[0]) == (0, 0, 281)
    assert r.score[0] == pytest.approx(0.42)


def test_largest_product_wins_not_the_top_rank():
    # (0, 1) dog: 0.5 * 0.15 fails p2; (1, 0) cat: 0.3 * 0.85 = 0.255 wins.
    r = one([(207, 0.5), (282, 0.3), (1, 0.1), (2, 0.05), (3, 0.05)], [(CAT, 0.85), (DOG, 0.15)])
    assert r.accepted[0] and r.label[0] == CAT and r.imagenet_index[0] == 282
    assert r.score[0] == pytest.approx(0.255)


def test_thresholds_are_inclusive():
    high = [(1, 0.5), (2, 0.2), (3, 0.1), (285, 0.10), (4, 0.1)]
    r = one(high, [(CAT, 0.20), (DOG, 0.1)])
    assert r.accepted[0] and (r.high_rank[0], r.low_rank[0]) == (3, 0)
    assert not one(high, [(CAT, 0.1999), (DOG, 0.1)]).accepted[0]
    assert not one(high, [(CAT, 0.20), (DOG, 0.1)], p1=0.1001).accepted[0]


def test_other_labels_never_match():
    # ImageNet class 1 maps to other (-1); even a confident L-Net cannot pair with it.
    r = one([(1, 0.9), (2, 0.05), (3, 0.03), (4, 0.01), (5, 0.01)], [(CAT, 0.9), (DOG, 0.1)])
    assert not r.accepted[0]
    assert (r.label[0], r.imagenet_index[0], r.score[0]) == (-1, -1, 0.0)


def test_no_candidate_when_streams_disagree():
    r = one([(404, 0.9), (2, 0.05), (3, 0.03), (4, 0.01), (5, 0.01)], [(CAT, 0.6), (DOG, 0.4)])
    assert not r.accepted[0] and r.label[0] == -1


def test_ties_go_to_smallest_i_then_smallest_j():
    # Two cat classes with equal probability: (0, 0) and (1, 0) tie; i = 0 wins.
    r = one([(281, 0.4), (282, 0.4), (1, 0.1), (2, 0.05), (3, 0.05)], [(CAT, 0.5), (DOG, 0.3)])
    assert (r.high_rank[0], r.low_rank[0], r.imagenet_index[0]) == (0, 0, 281)
    # (0, 1) cat = 0.5 * 0.4 and (1, 0) dog = 0.4 * 0.5 tie exactly; smallest i wins -> cat.
    r = one([(281, 0.5), (207, 0.4), (1, 0.05), (2, 0.03), (3, 0.02)], [(DOG, 0.5), (CAT, 0.4)])
    assert (r.high_rank[0], r.low_rank[0], r.label[0]) == (0, 1, CAT)


def test_batch_rows_are_independent():
    hi = np.array([[281, 1, 2, 3, 4], [404, 1, 2, 3, 4]])
    hp = np.array([[0.9, 0.04, 0.03, 0.02, 0.01]] * 2)
    li = np.array([[CAT, DOG], [CAT, DOG]])
    lp = np.array([[0.8, 0.2], [0.8, 0.2]])
    r = compare(hi, hp, li, lp, MAPPING)
    assert r.accepted.tolist() == [True, False]
    assert r.label.tolist() == [CAT, -1]


@st.composite
def probability_tables(draw):
    n = draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Draw from few classes and coarse probabilities so that matches, ties and exact
    # threshold hits are frequent.
    pool = np.array([281, 282, 285, 207, 208, 404, 1, 2, 3, 4, 5, 6])
    high_idx = np.stack([rng.choice(pool, 5, replace=False) for _ in range(n)])
    high_prob = np.sort(rng.choice(np.arange(0, 11) / 20, size=(n, 5)), axis=1)[:, ::-1]
    low_idx = np.stack([rng.choice(10, 2, replace=False) for _ in range(n)])
    low_prob = np.sort(rng.choice(np.arange(0, 11) / 10, size=(n, 2)), axis=1)[:, ::-1]
    p1 = draw(st.sampled_from([0.0, 0.05, 0.1, 0.25]))
    p2 = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    return high_idx, high_prob, low_idx, low_prob, p1, p2


@settings(max_examples=300, deadline=None)
@given(probability_tables())
def test_vectorised_equals_reference(table):
    high_idx, high_prob, low_idx, low_prob, p1, p2 = table
    r = compare(high_idx, high_prob, low_idx, low_prob, MAPPING, p1, p2)
    for n in range(len(high_idx)):
        expected = compare_one(
            list(zip(high_idx[n].tolist(), high_prob[n].tolist())),
            list(zip(low_idx[n].tolist(), low_prob[n].tolist())),
            MAPPING, p1, p2,
        )
        if expected is None:
            assert not r.accepted[n]
        else:
            i, j, label, score = expected
            assert r.accepted[n]
            assert (r.high_rank[n], r.low_rank[n], r.label[n]) == (i, j, label)
            assert r.imagenet_index[n] == high_idx[n, i]
            assert r.score[n] == pytest.approx(score, rel=1e-6)
