"""Operating points on a constructed case whose verdicts are worked out by hand.

ImageNet classes used (the project's table): 281 tabby -> cat (3), 151 Chihuahua -> dog (5),
0..3 (fish) -> other. Every row's truth is cat. Top-5 H-Net and top-2 L-Net per row:

clean
  c1: H (281 .60, 0 .10, 1 .05, 2 .03, 3 .02)  L (cat .70, dog .20)   cat passes p1, p2 at every point
  c2: H (0 .50, 281 .08, 1 .05, 2 .03, 3 .02)  L (cat .90, dog .05)   281 passes p1 = .05 only
  c3: H (281 .50, 0 .30, 151 .05, 1 .03, 2 .02) L (dog .60, cat .15)  cat needs p2 <= .15; dog needs p1 <= .05
attacked (t2-x)
  a1: H (151 .70, 0 .10, 1 .05, 2 .03, 3 .02)  L (dog .80, cat .10)   dog at every point (wrong)
  a2: H (151 .50, 281 .12, 0 .10, 1 .05, 2 .03) L (cat .50, dog .15)  dog .075 beats cat .06 when p2 <= .15

By hand, (p1, p2) -> clean verdicts; attack verdicts:
  (.05, .10): c1 cat, c2 cat, c3 cat (.075 > dog .03)   | a1 dog, a2 dog     reject 0/3, wrong 2/2
  (.05, .20): c1 cat, c2 cat, c3 dog (wrong)            | a1 dog, a2 cat     reject 0/3, wrong 1/2
  (.10, .10): c1 cat, c2 rejected, c3 cat               | a1 dog, a2 dog     reject 1/3, wrong 2/2
  (.10, .20): c1 cat, c2 rejected, c3 rejected          | a1 dog, a2 cat     reject 2/3, wrong 1/2
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from twostream.core.config import ReputationConfig, SimulationSettings, load_config
from twostream.evaluation import calibration as cal

CAT, DOG = 3, 5
ROWS = [  # attack, high (idx, prob) x5, low (idx, prob) x2
    ("clean", [(281, .60), (0, .10), (1, .05), (2, .03), (3, .02)], [(CAT, .70), (DOG, .20)]),
    ("clean", [(0, .50), (281, .08), (1, .05), (2, .03), (3, .02)], [(CAT, .90), (DOG, .05)]),
    ("clean", [(281, .50), (0, .30), (151, .05), (1, .03), (2, .02)], [(DOG, .60), (CAT, .15)]),
    ("t2-x", [(151, .70), (0, .10), (1, .05), (2, .03), (3, .02)], [(DOG, .80), (CAT, .10)]),
    ("t2-x", [(151, .50), (281, .12), (0, .10), (1, .05), (2, .03)], [(CAT, .50), (DOG, .15)]),
]
GRID = dict(p1_grid=(0.05, 0.10), p2_grid=(0.10, 0.20))


def _table() -> pa.Table:
    return pa.table({
        "dataset": ["toy"] * len(ROWS),
        "attack": [r[0] for r in ROWS],
        "truth": pa.array([CAT] * len(ROWS), pa.int8()),
        "high_idx": pa.array([[i for i, _ in r[1]] for r in ROWS], pa.list_(pa.int32())),
        "high_prob": pa.array([[p for _, p in r[1]] for r in ROWS], pa.list_(pa.float32())),
        "low_idx": pa.array([[i for i, _ in r[2]] for r in ROWS], pa.list_(pa.int8())),
        "low_prob": pa.array([[p for _, p in r[2]] for r in ROWS], pa.list_(pa.float32())),
        "verdict": ["accepted"] * len(ROWS),  # as scored at the defaults; recomputed per point
    })


@pytest.fixture(scope="module")
def points() -> pa.Table:
    return cal.operating_points(cal.sweep(cal.ScoredRows.from_table(_table()), **GRID))


def test_rates_per_point_are_the_hand_computed_ones(points) -> None:
    # as counts: clean rejected and clean wrong of 3, attack wrong and attack rejected of 2
    got = {(r["p1"], r["p2"]): (round(3 * r["clean_reject"]), round(3 * r["clean_wrong"]),
                                round(2 * r["wrong:t2-x"]), round(2 * r["reject:t2-x"]))
           for r in points.to_pylist()}
    assert got == {
        (0.05, 0.10): (0, 0, 2, 0),
        (0.05, 0.20): (0, 1, 1, 0),
        (0.10, 0.10): (1, 0, 2, 0),
        (0.10, 0.20): (2, 0, 1, 0),
    }
    assert {r["worst_attack"] for r in points.to_pylist()} == {"t2-x"}


def test_choice_and_config_file(points, tmp_path) -> None:
    settings = SimulationSettings(normal_users=50, adversarial_users=10, images_per_user=10, runs=1)
    blacklist = cal.blacklisting(points, 3, {"t2-x": 2}, (2, 4), settings, ReputationConfig())
    listed = {(r["p1"], r["p2"], r["reputation_threshold"]): r["honest_blacklisted"] for r in blacklist.to_pylist()}
    assert listed[(0.05, 0.10, 2)] == 0.0  # no clean image rejected: nobody listed
    assert listed[(0.10, 0.20, 2)] > 0.0  # 2 in 3 rejected: listed within 10 images
    # clean reject <= 1/3: (.05, .10), (.05, .20), (.10, .10); the lowest worst wrong-accept is (.05, .20)
    choice = cal.choose(points, blacklist, 0.34, max_honest_blacklisted=0.0)
    assert (choice.p1, choice.p2) == (0.05, 0.20)
    assert choice.reputation_threshold == 2 and choice.meets_blacklist_target  # nobody listed at threshold 2
    path = tmp_path / "thresholds.yaml"
    path.write_text(cal.config_yaml(choice, ReputationConfig(cap=15), "test"))
    config = load_config(path)
    assert (config.thresholds.p1, config.thresholds.p2) == (0.05, 0.20)
    assert config.reputation.threshold == 2 and config.reputation.cap == 15
    with pytest.raises(ValueError, match="lowest is 0.000"):
        cal.choose(points, blacklist, -0.1, 0.05)
