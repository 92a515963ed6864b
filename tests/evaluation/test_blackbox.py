"""The black-box harness (twostream/evaluation/blackbox.py): queries counted exactly by an oracle
that counts on its own, success only for accepted-with-a-wrong-label within the budget (hand-built
oracles), identities rotating as declared, and the in-process oracle's Algorithm 2 and detector."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from twostream.core.config import PrefixGrouping
from twostream.core.labels import CIFAR10_LABELS, Refusal
from twostream.core.reputation import reputation_key
from twostream.evaluation.blackbox import (
    Answer,
    Campaign,
    CampaignSettings,
    LocalOracle,
    RunResult,
    attack_image,
    attacker_scores,
    source_for,
    summarise,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAT, DOG, SHIP = (CIFAR10_LABELS.index(n) for n in ("cat", "dog", "ship"))


class CountingOracle:
    """Counts every upload itself and answers by a rule of the image (hand-built)."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.uploads: list[np.ndarray] = []
        self.sources: list[str] = []

    def ask(self, images, sources):
        self.uploads += [np.array(im) for im in images]
        self.sources += list(sources)
        return [self.rule(im) for im in images]


def photo(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, (size, size, 3)).astype(np.uint8)


def campaign(oracle, original, *, budget=100, identities="1", detail="label", project=False):
    result = RunResult("test", detail, identities, False, "img", CAT, budget)
    settings = CampaignSettings(detail=detail, identities=identities, budget=budget, eps=8 / 255, run="r",
                                project=project)
    return Campaign(oracle, original, CAT, settings, result=result), result


def test_success_needs_accepted_with_a_wrong_label_within_the_budget():
    original = photo()

    def rule(image):  # the mean shift of the upload decides the answer
        shift = int(np.round(image.astype(int).mean() - original.astype(int).mean()))
        return {0: Answer("cat"), 1: Answer(Refusal.ADVERSARIAL), 2: Answer(Refusal.QUERY_ATTACK),
                3: Answer(Refusal.BLOCKED)}.get(shift, Answer("dog"))

    oracle = CountingOracle(rule)
    camp, result = campaign(oracle, original)
    shifted = lambda d: np.clip(original.astype(int) + d, 0, 255).astype(np.uint8)  # noqa: E731
    # True label, every refusal, and a wrong label 9/255 away: none is a success.
    camp.send([original, shifted(1), shifted(2), shifted(3), shifted(9)])
    assert result.success_query is None and result.queries == 5
    assert result.first_detection == 3
    assert result.responses == {"cat": 1, "adversarial": 1, "query_attack": 1, "blocked": 1, "dog": 1}
    # A wrong label 5/255 away is one (query 7); the batch is answered and counted in full.
    from twostream.evaluation.blackbox import Succeeded

    with pytest.raises(Succeeded):
        camp.send([shifted(8 + 1), shifted(5), original])
    assert result.success_query == 7 and result.queries == 8 == len(oracle.uploads)


def test_attacker_scores_hand_worked():
    full = Answer(Refusal.ADVERSARIAL, high=(("dog", 0.6), ("other", 0.2), ("cat", 0.1)),
                  low=(("dog", 0.5), ("ship", 0.4)))
    scores = attacker_scores(full, "full", CAT)
    expected = np.zeros(10)
    expected[DOG] = 0.49 * 0.5 * (0.6 + 0.5)
    expected[SHIP] = 0.49 * 0.5 * 0.4
    expected[CAT] = 1 - expected[DOG] - expected[SHIP]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.argmax() == CAT  # a refusal is never progress
    # Accepted with the true label: the same shape; with a wrong label: that label.
    assert attacker_scores(Answer("cat", full.high, full.low), "full", CAT).argmax() == CAT
    assert attacker_scores(Answer("dog", full.high, full.low), "full", CAT).tolist() == np.eye(10)[DOG].tolist()
    assert attacker_scores(Answer("dog"), "label", CAT).tolist() == np.eye(10)[DOG].tolist()
    assert attacker_scores(Answer(Refusal.BLOCKED), "label", CAT).tolist() == np.eye(10)[CAT].tolist()
    # At verdict the label is hidden: every acceptance looks like progress, every refusal not.
    assert attacker_scores(Answer("cat"), "verdict", CAT).argmax() != CAT
    assert attacker_scores(Answer(Refusal.QUERY_ATTACK), "verdict", CAT).argmax() == CAT


@pytest.mark.parametrize("attack, budget", [("square", 37), ("hsj", 150), ("simba", 23), ("boundary", 90)])
def test_a_run_on_a_tiny_budget_counts_its_queries_exactly(attack, budget):
    original = photo(1)
    start = photo(2)

    def rule(image):  # the start photograph is a dog; everything else is refused
        return Answer("dog") if np.array_equal(image, start) else Answer(Refusal.ADVERSARIAL,
                                                                          (("cat", 0.5),), (("dog", 0.3),))

    oracle = CountingOracle(rule)
    detail = "full" if attack in ("square", "simba") else "label"
    result = attack_image(attack, oracle, original, CAT, image_id="img", detail=detail, identities="10",
                          budget=budget, eps=8 / 255, run="r", detector=False,
                          candidates=[(photo(3), CAT), (start, DOG)],
                          params={"max_iter": 5} if attack == "boundary" else None)
    assert result.queries == len(oracle.uploads) <= budget
    assert result.stopped in ("budget", "attack")
    if result.stopped == "budget":
        assert result.queries == budget
    assert not result.success and sum(result.responses.values()) == result.queries
    # The same-class candidate is skipped, the dog is queried first; score-based attacks never leave the ball.
    if detail == "label":
        assert np.array_equal(oracle.uploads[0], start)
    else:
        assert max(int(np.abs(u.astype(int) - original).max()) for u in oracle.uploads) <= 8


def test_identities_rotate_as_declared():
    oracle = CountingOracle(lambda image: Answer(Refusal.ADVERSARIAL))
    for identities, distinct in (("1", 1), ("10", 10), ("1000", 25)):
        oracle.sources.clear()
        camp, result = campaign(oracle, photo(), identities=identities)
        camp.send([photo()] * 25)
        assert oracle.sources == [f"bb-r-{k % int(identities)}" for k in range(25)]
        assert result.distinct_sources == distinct
    oracle.sources.clear()
    camp, result = campaign(oracle, photo(), identities="ipv6-64")
    camp.send([photo()] * 25)
    addresses = [ipaddress.IPv6Address(s) for s in oracle.sources]
    assert len(set(addresses)) == 25 == result.distinct_sources
    assert {ipaddress.IPv6Network(f"{a}/64", strict=False) for a in addresses} == {
        ipaddress.IPv6Network(reputation_key(oracle.sources[0], PrefixGrouping()))}
    assert source_for("ipv6-64", "other", 0) != source_for("ipv6-64", "r", 0)
    grouping = PrefixGrouping(ipv4=24, ipv6=64)
    assert reputation_key("192.0.2.77", grouping) == "192.0.2.0/24" and reputation_key("user-17", grouping) == "user-17"


@pytest.fixture(scope="module")
def rejecting_scorer(tmp_path_factory):
    """Tiny random models; thresholds no probability meets, so every image is rejected."""
    from twostream.core.config import load_config
    from twostream.core.scoring import Scorer

    config = load_config(None, ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20",
                                "low.weights=random", "thresholds.p1=1.0", "thresholds.p2=1.0"])
    return Scorer(config)


def test_local_oracle_counts_per_network_with_prefix_grouping(rejecting_scorer):
    images = [photo(k, 40) for k in range(6)]
    sources = [source_for("ipv6-64", "g", k) for k in range(6)]
    # Algorithm 2 by hand (threshold 3, step 1): one network: CC 1, 2, 3 -> blocked from the third on.
    grouped = LocalOracle(rejecting_scorer, group_prefix=True).ask(images, sources)
    assert [a.response for a in grouped] == ["adversarial", "adversarial"] + ["blocked"] * 4
    # Without grouping each address is a fresh source.
    plain = LocalOracle(rejecting_scorer).ask(images, sources)
    assert [a.response for a in plain] == ["adversarial"] * 6


def test_local_oracle_answers_query_attack_for_a_near_duplicate_run(rejecting_scorer):
    from twostream.core.query_detector import QueryDetector

    original = photo(5, 64)
    rng = np.random.default_rng(0)
    walk = [np.clip(original.astype(int) + rng.integers(-2, 3, original.shape), 0, 255).astype(np.uint8)
            for _ in range(14)]
    oracle = LocalOracle(rejecting_scorer, detector=QueryDetector())
    camp, result = campaign(oracle, original, identities="1000")
    answers = camp.send(walk)
    flagged = [k + 1 for k, a in enumerate(answers) if a.response == Refusal.QUERY_ATTACK]
    # The k-th distinct near-duplicate has k-1 earlier matches: min_matches 8 flags from the 9th on.
    assert flagged == list(range(9, 15)) and result.first_detection == 9
    assert result.distinct_sources == 14


def test_summarise_rows():
    runs = [RunResult("square", "full", "1", True, f"i{k}", CAT, 100, queries=q, success_query=s,
                      first_detection=d, responses={"query_attack": 3, "cat": 1}, wall_s=1.0)
            for k, (q, s, d) in enumerate([(100, None, 9), (40, 40, 11), (100, None, None)])]
    (row,) = summarise(runs)
    assert row["success"] == 1 and row["median_queries_to_success"] == 40
    assert row["detected"] == 2 and row["median_first_detection"] == 10
    assert row["queries"] == 240 and row["refusals"] == {"query_attack": 9}


def test_the_jpeg_like_adaptive_attacker_is_answered_query_attack(rejecting_scorer):
    """``--adaptive jpeg:4`` (a fresh +-4 offset per 8x8 block, equal on R, G and B, on every
    query) evaded the detector's JPEG veto: 0 detections in 4,400 queries. The offsets are
    constant inside each block, which no re-encode's error is, so the pairs match as noise does:
    the k-th query has k-1 matches and min_matches 8 flags from the 9th on; under the old rules
    (no inside-block test) none is flagged."""
    from twostream.attacks.blackbox import adaptive_perturbation
    from twostream.core.query_detector import QueryDetector, QueryDetectorConfig

    original = photo(5, 64)
    for config, expected in ((QueryDetectorConfig(), list(range(9, 15))),
                             (QueryDetectorConfig(jpeg_min_inner=0.0, min_source_near=None), [])):
        oracle = LocalOracle(rejecting_scorer, detector=QueryDetector(config))
        camp, result = campaign(oracle, original, identities="1000")
        camp.perturb = adaptive_perturbation("jpeg:4", np.random.default_rng(1))[0]
        answers = camp.send([camp.upload(original / 255.0) for _ in range(14)])
        assert [k + 1 for k, a in enumerate(answers) if a.response == Refusal.QUERY_ATTACK] == expected
