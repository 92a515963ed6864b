"""The black-box harness (twostream/evaluation/blackbox.py): queries counted exactly by an oracle
that counts on its own, success only for accepted-with-a-wrong-label within the budget (hand-built
oracles), identities rotating as declared, and the in-process oracle's Algorithm 2 and detector."""

from __future__ import annotations

import ipaddress
import json

import numpy as np
import pytest

from conftest import texture_run
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


def test_local_oracle_groups_the_detectors_rule_3_with_algorithm_2(rejecting_scorer):
    """``group_prefix`` decides what one identity is for Algorithm 2 and for the detector's
    rule 3 alike: the texture-hidden run (only rule 3 catches it: query k has k near-duplicates,
    no match) from a fresh address of one /64 per query (``ipv6-64``) is flagged from query
    min_source_near (16) on when grouped (its answers stay ``blocked``: the network is
    blacklisted at its third rejection, but the detections are counted), never otherwise."""
    from twostream.core.query_detector import QueryDetectorConfig

    n = QueryDetectorConfig().min_source_near + 3
    sources = [source_for("ipv6-64", "t", k) for k in range(n)]
    grouped = LocalOracle(rejecting_scorer, detector=QueryDetectorConfig(), group_prefix=True)
    answers = grouped.ask(texture_run(n), sources)
    assert grouped.detections == n - 16
    assert [a.response for a in answers] == ["adversarial"] * 2 + ["blocked"] * (n - 2)
    plain = LocalOracle(rejecting_scorer, detector=QueryDetectorConfig())
    assert [a.response for a in plain.ask(texture_run(n), sources)] == ["adversarial"] * n
    assert plain.detections == 0


def test_local_oracle_answers_query_attack_for_a_near_duplicate_run(rejecting_scorer):
    from twostream.core.query_detector import QueryDetectorConfig

    original = photo(5, 64)
    rng = np.random.default_rng(0)
    walk = [np.clip(original.astype(int) + rng.integers(-2, 3, original.shape), 0, 255).astype(np.uint8)
            for _ in range(14)]
    oracle = LocalOracle(rejecting_scorer, detector=QueryDetectorConfig())
    camp, result = campaign(oracle, original, identities="1000")
    answers = camp.send(walk)
    flagged = [k + 1 for k, a in enumerate(answers) if a.response == Refusal.QUERY_ATTACK]
    # The k-th distinct near-duplicate has k-1 earlier matches: min_matches 8 flags from the 9th on.
    assert flagged == list(range(9, 15)) and result.first_detection == 9
    assert result.distinct_sources == 14
    assert oracle.detections == 6
    # From one source Algorithm 2 blocks it at its third rejection: the detector still flags the
    # same six images (the endpoint's detections counter), but they are answered ``blocked``.
    single = LocalOracle(rejecting_scorer, detector=QueryDetectorConfig())
    answers = single.ask(walk, ["one"] * len(walk))
    assert [a.response for a in answers] == ["adversarial"] * 2 + ["blocked"] * 12 and single.detections == 6


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
    from twostream.core.query_detector import QueryDetectorConfig

    original = photo(5, 64)
    for config, expected in ((QueryDetectorConfig(), list(range(9, 15))),
                             (QueryDetectorConfig(jpeg_min_inner=0.0, min_source_near=None), [])):
        oracle = LocalOracle(rejecting_scorer, detector=config)
        camp, result = campaign(oracle, original, identities="1000")
        camp.perturb = adaptive_perturbation("jpeg:4", np.random.default_rng(1))[0]
        answers = camp.send([camp.upload(original / 255.0) for _ in range(14)])
        assert [k + 1 for k, a in enumerate(answers) if a.response == Refusal.QUERY_ATTACK] == expected


def test_grid_runs_image_by_image_and_shards_cover_every_run_once():
    from twostream.evaluation.blackbox import Grid, run_grid

    grid = Grid(attacks=("square",), details=("full",), identities=("1", "10"), detector=(False,), budget=12)
    images = np.stack([photo(k) for k in range(3)])
    refuse = lambda image: Answer(Refusal.ADVERSARIAL)  # noqa: E731
    whole = run_grid(grid, lambda on: CountingOracle(refuse), images, np.full(3, CAT), ["a", "b", "c"], [])
    # Image-major: every cell of the first image before the second image.
    assert [(r.image_id, r.identities) for r in whole] == [(i, n) for i in "abc" for n in ("1", "10")]
    assert all(r.queries == 12 and r.stopped == "budget" for r in whole)
    parts = [run_grid(grid, lambda on: CountingOracle(refuse), images, np.full(3, CAT), ["a", "b", "c"], [],
                      shard=(i, 4)) for i in range(4)]
    assert sorted(r.key() for part in parts for r in part) == sorted(r.key() for r in whole)
    assert [len(p) for p in parts] == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="shard"):
        run_grid(grid, lambda on: CountingOracle(refuse), images, np.full(3, CAT), ["a"], [], shard=(2, 2))


def test_an_interrupted_campaign_records_the_partial_run_and_resumes_without_rerunning_finished_ones():
    from twostream.evaluation.blackbox import Grid, one_per_run, read_runs, run_grid

    grid = Grid(attacks=("square",), details=("full",), identities=("1", "10"), detector=(False,), budget=20)
    images = np.stack([photo(k) for k in range(2)])
    sent = []

    def make_oracle(stop_at):
        def rule(image):
            sent.append(1)
            if len(sent) == stop_at:  # SIGTERM arrives while this query is being answered
                raise KeyboardInterrupt
            return Answer(Refusal.ADVERSARIAL)
        return lambda on: CountingOracle(rule)

    recorded = []
    with pytest.raises(KeyboardInterrupt):  # runs 1 and 2 finish (40 queries); run 3 stops at its 7th
        run_grid(grid, make_oracle(47), images, np.full(2, CAT), ["a", "b"], [], on_result=recorded.append)
    assert [(r.image_id, r.identities, r.stopped, r.queries) for r in recorded] == [
        ("a", "1", "budget", 20), ("a", "10", "budget", 20), ("b", "1", "interrupted", 6)]
    stored = read_runs([json.dumps(r.to_dict()) for r in recorded])
    sent.clear()
    resumed = run_grid(grid, make_oracle(0), images, np.full(2, CAT), ["a", "b"], [], done=stored)
    assert len(sent) == 40  # only image b's two runs again
    assert [(r.image_id, r.identities, r.stopped) for r in resumed] == [
        ("a", "1", "budget"), ("a", "10", "budget"), ("b", "1", "budget"), ("b", "10", "budget")]
    # The campaign's file now holds both of b/1's runs: the finished one counts, once.
    everything = one_per_run(stored + resumed[2:])
    assert len(everything) == 4 and all(r.stopped == "budget" for r in everything)
    one_id, ten_ids = summarise(stored)
    assert (one_id["n"], one_id["interrupted"], one_id["queries"]) == (2, 1, 26)
    assert (ten_ids["n"], ten_ids["interrupted"], ten_ids["queries"]) == (1, 0, 20)


def test_server_agreement_hand_worked():
    from collections import Counter

    from twostream.evaluation.blackbox import server_agreement

    tally = {"s1": Counter({"cat": 2, "adversarial": 1, "query_attack": 2, "blocked": 3}),
             "s2": Counter({"dog": 1}), "s3": Counter({"cat": 1})}
    rows = [{"source": "s1", "images": 8, "rejected": 4, "blocked": 3},  # 3 refused + 1 blocked image rejected
            {"source": "s2", "images": 2, "rejected": 0, "blocked": 0}]
    assert server_agreement(tally, rows) == ["s2: server counts 2 images, harness 1",
                                             "s3: 1 answers, but the server lists no such source"]
    rows[0]["rejected"] = 7  # more than refused + blocked
    assert server_agreement({"s1": tally["s1"]}, rows) == [
        "s1: server counts 7 rejected, harness saw 3 refused and 3 blocked"]


@pytest.mark.parametrize("attack", ["boundary", "simba"])
def test_restart_spends_the_whole_budget_when_the_attack_gives_up(attack):
    original, start = photo(1), photo(2)

    def rule(image):
        return Answer("dog") if np.array_equal(image, start) else Answer(Refusal.ADVERSARIAL, (("cat", 0.5),), ())

    detail = "full" if attack == "simba" else "label"
    params = {"max_iter": 2, "num_trial": 2, "sample_size": 2} if attack == "boundary" else {"max_iter": 5}
    runs = {}
    for restart in (False, True):
        oracle = CountingOracle(rule)
        runs[restart] = attack_image(attack, oracle, original, CAT, image_id="img", detail=detail, identities="1",
                                     budget=60, eps=8 / 255, run="r", detector=False, params=params,
                                     candidates=[(start, DOG)], restart=restart)
        assert runs[restart].queries == len(oracle.uploads)
    assert runs[False].stopped == "attack" and runs[False].queries < 60 and runs[False].restarts == 0
    assert runs[True].stopped == "budget" and runs[True].queries == 60 and runs[True].restarts >= 1


def test_a_restart_without_an_accepted_start_ends_the_run_as_no_start():
    original, start = photo(1), photo(2)
    seen = []

    def rule(image):  # the start photograph is accepted once, then refused (its sources blacklisted)
        if np.array_equal(image, start):
            seen.append(1)
            return Answer("dog") if len(seen) == 1 else Answer(Refusal.BLOCKED)
        return Answer(Refusal.ADVERSARIAL)

    oracle = CountingOracle(rule)
    result = attack_image("boundary", oracle, original, CAT, image_id="img", detail="label", identities="1",
                          budget=500, eps=8 / 255, run="r", detector=False,
                          params={"max_iter": 2, "num_trial": 2, "sample_size": 2},
                          candidates=[(start, DOG)], restart=True)
    assert (result.stopped, result.restarts) == ("no-start", 1)
    assert result.queries == len(oracle.uploads) < 500
