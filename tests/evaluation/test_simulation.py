"""Vectorised Algorithm 2 and the Fig. 5 simulation, against ReputationLedger replayed by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostream.cli import main
from twostream.core.config import ReputationConfig
from twostream.core.config import SimulationSettings
from twostream.evaluation.simulation import (
    bernoulli_pool,
    plot_fig5,
    pools_from_rows,
    simulate,
)
from twostream.core.reputation import ReputationLedger, Upload, advance

BLOCKED = "blocked"  # Algorithm 2's response to a blacklisted source (SPEC 3)


def observe(ledger: ReputationLedger, source: int, step: int, rejected: bool):
    verdict = "adversarial" if rejected else "cat"
    return ledger.observe(Upload(str(source), float(step), f"img{step:04d}", bool(rejected), verdict))


# ---------------------------------------------------------------------------------------------
# advance
# ---------------------------------------------------------------------------------------------
def test_advance_hand_worked():
    cfg = ReputationConfig()  # threshold 3, cap 15, +1/-1
    cc = np.array([0, 2, 2, 1, 15, 2])
    listed = np.array([False, False, True, True, True, False])
    rejected = np.array([True, True, False, False, True, False])
    new_cc, new_listed, blocked = advance(cc, listed, rejected, cfg)
    # 0->1 stays off; 2->3 joins (blocked); listed 2->1 stays (blocked); listed 1->0 leaves
    # (answered); listed 15 capped at 15 (blocked); 2->1 stays off.
    assert new_cc.tolist() == [1, 3, 1, 0, 15, 1]
    assert new_listed.tolist() == [False, True, True, False, True, False]
    assert blocked.tolist() == [False, True, True, False, True, False]
    assert cc.tolist() == [0, 2, 2, 1, 15, 2] and listed.tolist()[2] is True  # inputs untouched


@st.composite
def reputation_configs(draw) -> ReputationConfig:
    cap = draw(st.integers(1, 8))
    return ReputationConfig(threshold=draw(st.integers(1, cap)), cap=cap,
                            step_up=draw(st.integers(1, 3)), step_down=draw(st.integers(1, 3)))


@settings(max_examples=150, deadline=None)
@given(config=reputation_configs(), flags=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), max_size=40))
def test_advance_equals_ledger(config, flags):
    ledger = ReputationLedger(config)
    cc, listed = np.zeros(4, np.int64), np.zeros(4, bool)
    for step, rejected in enumerate(flags):
        cc, listed, blocked = advance(cc, listed, np.array(rejected), config)
        expected = [observe(ledger, s, step, r) for s, r in enumerate(rejected)]
        assert cc.tolist() == [e.cc for e in expected]
        assert listed.tolist() == [e.blacklisted for e in expected]
        assert blocked.tolist() == [e.response == BLOCKED for e in expected]


# ---------------------------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------------------------
def curve(curves: pa.Table, attack: str, run: int, group: str, column: str = "blacklisted_share") -> list:
    rows = [r for r in curves.to_pylist() if (r["attack"], r["run"], r["group"]) == (attack, run, group)]
    assert [r["images_sent"] for r in rows] == list(range(1, len(rows) + 1))
    return [r[column] for r in rows]


def test_degenerate_pools_hand_worked():
    config = SimulationSettings(normal_users=2, adversarial_users=1, images_per_user=5, runs=1)
    curves, summary = simulate(np.array([False]), {"x": np.array([True])}, config)
    assert curve(curves, "x", 0, "normal") == [0, 0, 0, 0, 0]
    # Adversary: CC 1, 2, 3 -> listed from the third image on.
    assert curve(curves, "x", 0, "adversarial") == [0, 0, 1, 1, 1]
    assert curve(curves, "x", 0, "adversarial", "ever_blacklisted") == [0, 0, 1, 1, 1]
    # Strategic: adv (CC 1), adv (CC 2), clean (2 + 1 would reach 3; CC 1), adv (CC 2), clean (CC 1).
    assert curve(curves, "x", 0, "strategic") == [0, 0, 0, 0, 0]
    assert summary.to_pylist() == [{
        "attack": "x", "normal_ever_blacklisted": 0, "adversarial_blacklisted_final_share": 1.0,
        "strategic_adv_sent": 3, "strategic_adv_answered_share": 1.0, "strategic_adv_accepted_share": 0.0,
        "strategic_blacklisted_final_share": 0.0,
    }]


def reference_user(ledger, user, primary, fallback, config):
    """One user by hand with the ledger; strategic (fallback given) tracks CC from the responses only."""
    cc, listed, sent_adv, answered, accepted, history = 0, False, 0, 0, 0, []
    for step in range(len(primary)):
        adv = fallback is None or (not listed and cc + config.step_up < config.threshold)
        rejected = primary[step] if adv else fallback[step]
        response = observe(ledger, user, step, rejected).response
        if response == BLOCKED:
            listed = True
        elif listed:
            listed, cc = False, 0  # the server lets a source go only at CC == 0
        else:
            cc = min(cc + config.step_up, config.cap) if rejected else max(cc - config.step_down, 0)
        history.append(ledger.get(str(user)).blacklisted)
        sent_adv += adv and fallback is not None
        answered += adv and fallback is not None and response != BLOCKED
        accepted += adv and fallback is not None and response == "cat"
    return history, sent_adv, answered, accepted


def reference_group(flags, fallback, config):
    """(rounds, users) draws -> per-round share listed, ever listed, and strategic counts."""
    ledger = ReputationLedger(config)
    results = [reference_user(ledger, u, flags[:, u], None if fallback is None else fallback[:, u], config)
               for u in range(flags.shape[1])]
    listed = np.array([r[0] for r in results]).T  # (rounds, users)
    ever = [len({u for u in range(flags.shape[1]) if listed[: t + 1, u].any()}) for t in range(len(listed))]
    counts = [sum(r[k] for r in results) for k in (1, 2, 3)]
    return listed.mean(axis=1).tolist(), ever, counts, listed


def test_mixed_pools_match_a_replay_with_the_ledger():
    clean = np.array([False, False, False, True])  # 1 in 4 clean images rejected
    pools = {"weak": np.array([True, False, False]), "strong": np.array([True, True, True, False])}
    config = SimulationSettings(normal_users=6, adversarial_users=5, images_per_user=20, runs=2, seed=7)
    rep = ReputationConfig(threshold=3, cap=5)
    curves, summary = simulate(clean, pools, config, rep)
    rounds = config.images_per_user
    for k, (attack, pool) in enumerate(pools.items()):
        expected = {"normal_ever_blacklisted": 0, "adv_final": [], "strat_final": [], "counts": np.zeros(3)}
        for run in range(config.runs):
            # The documented draw order: normal, adversarial, strategic attack, strategic clean.
            rng = np.random.default_rng([7, run, k])
            normal = clean[rng.integers(0, 4, size=(rounds, 6))]
            adversarial = pool[rng.integers(0, len(pool), size=(rounds, 5))]
            strat_attack = pool[rng.integers(0, len(pool), size=(rounds, 5))]
            strat_clean = clean[rng.integers(0, 4, size=(rounds, 5))]
            for group, flags, fallback in (("normal", normal, None), ("adversarial", adversarial, None),
                                           ("strategic", strat_attack, strat_clean)):
                share, ever, counts, listed = reference_group(flags, fallback, rep)
                assert curve(curves, attack, run, group) == pytest.approx(share)
                assert curve(curves, attack, run, group, "ever_blacklisted") == ever
                if group == "normal":
                    expected["normal_ever_blacklisted"] += ever[-1]
                elif group == "adversarial":
                    expected["adv_final"].append(share[-1])
                else:
                    expected["strat_final"].append(share[-1])
                    expected["counts"] += counts
        row = summary.to_pylist()[k]
        sent, answered, accepted = expected["counts"]
        assert row["attack"] == attack
        assert row["normal_ever_blacklisted"] == expected["normal_ever_blacklisted"]
        assert row["adversarial_blacklisted_final_share"] == pytest.approx(np.mean(expected["adv_final"]))
        assert row["strategic_blacklisted_final_share"] == pytest.approx(np.mean(expected["strat_final"]))
        assert row["strategic_adv_sent"] == sent > 0
        assert row["strategic_adv_answered_share"] == pytest.approx(answered / sent)
        assert row["strategic_adv_accepted_share"] == pytest.approx(accepted / sent)


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError, match="'x' is empty"):
        simulate(np.array([False]), {"x": np.array([], bool)}, SimulationSettings(runs=1))


def test_config_forbids_unknown_fields():
    with pytest.raises(ValueError, match="users"):
        SimulationSettings(users=10)


def test_bernoulli_pool():
    assert bernoulli_pool(0.13).tolist() == [True] * 13 + [False] * 87
    assert bernoulli_pool(0.0).tolist() == [False]
    assert bernoulli_pool(1.0).tolist() == [True]
    assert bernoulli_pool(0.5).tolist() == [True, False]
    with pytest.raises(ValueError, match="1.5"):
        bernoulli_pool(1.5)


def test_pools_from_rows():
    rows = pa.table({
        "dataset": ["a", "a", "a", "a", "a", "b", "a", "a"],
        "attack": ["clean", "fgsm", "clean", "fgsm", "cw", "clean", "clean", "fgsm"],
        "truth": pa.array([1, 2, 3, 4, 5, 6, -1, 2], pa.int8()),
        "verdict": ["accepted", "adversarial", "adversarial", "accepted", "adversarial", "adversarial",
                    "adversarial", "error"],
    })
    clean, pools = pools_from_rows(rows, "a")  # out of scope (row 6) and error (row 7) left out
    assert clean.tolist() == [False, True]
    assert list(pools) == ["fgsm", "cw"]
    assert pools["fgsm"].tolist() == [True, False] and pools["cw"].tolist() == [True]
    clean, _ = pools_from_rows(rows)
    assert clean.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="'c'.*a, b"):
        pools_from_rows(rows, "c")
    with pytest.raises(ValueError, match="clean"):
        pools_from_rows(rows.filter(pa.compute.not_equal(rows["attack"], "clean")))


def test_plot_fig5_writes_a_png(tmp_path):
    config = SimulationSettings(normal_users=3, adversarial_users=2, images_per_user=4, runs=2)
    curves, _ = simulate(bernoulli_pool(0.25), {"x": bernoulli_pool(0.75)}, config)
    plot_fig5(curves, str(tmp_path / "fig5.png"))
    assert (tmp_path / "fig5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# twostream simulate
# ---------------------------------------------------------------------------------------------
SMALL = ["--normal-users", "2", "--adversarial-users", "1", "--images", "5", "--runs", "2"]


def test_cli_degenerate_rates(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--rate", "clean=0", "--rate", "x=1", *SMALL, "--output", str(out)]) == 0
    for name in ("fig5.png", "fig5_curves.parquet", "fig5_summary.parquet", "fig5_summary.md"):
        assert (out / name).is_file(), name
    curves = pq.read_table(out / "fig5_curves.parquet")
    for run in (0, 1):
        assert curve(curves, "x", run, "adversarial") == [0, 0, 1, 1, 1]
        assert curve(curves, "x", run, "normal") == [0] * 5
        assert curve(curves, "x", run, "strategic") == [0] * 5
    summary = pq.read_table(out / "fig5_summary.parquet").to_pylist()
    # Two runs of the strategic alternation adv, adv, clean, adv, clean: 3 attack images each.
    assert summary == [{
        "attack": "x", "normal_ever_blacklisted": 0, "adversarial_blacklisted_final_share": 1.0,
        "strategic_adv_sent": 6, "strategic_adv_answered_share": 1.0, "strategic_adv_accepted_share": 0.0,
        "strategic_blacklisted_final_share": 0.0,
    }]
    printed = capsys.readouterr().out
    assert "| x | 0 | 100.0% | 6 | 100.0% | 0.0% | 0.0% |" in printed
    assert printed.startswith((out / "fig5_summary.md").read_text())


def test_cli_threshold_from_set(tmp_path):
    out = tmp_path / "sim"
    args = ["simulate", "--rate", "clean=0", "--rate", "x=1", *SMALL, "--set", "reputation.threshold=2"]
    assert main([*args, "--output", str(out)]) == 0
    # Threshold 2: listed from the second image on.
    assert curve(pq.read_table(out / "fig5_curves.parquet"), "x", 0, "adversarial") == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("args, message", [
    (["--rate", "x=1"], "clean=P is required"),
    (["--rate", "clean=0"], "at least one attack"),
    (["--rate", "clean=2", "--rate", "x=1"], "'clean=2'"),
    (["--rate", "clean=zero", "--rate", "x=1"], "'clean=zero'"),
    (["--rate", "clean=0", "--rate", "x=1", "--runs", "0"], "runs"),
    (["--rate", "clean=0", "--rate", "x=1", "--dataset", "a"], "--dataset"),
    (["--rows", "/no/such/rows"], "/no/such/rows"),
])
def test_cli_bad_input(args, message, capsys):
    assert main(["simulate", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_rows(tmp_path, capsys):
    rows = pa.table({
        "dataset": ["a"] * 4, "attack": ["clean", "clean", "fgsm", "fgsm"],
        "truth": pa.array([1, 2, 3, 4], pa.int8()), "verdict": ["accepted"] * 2 + ["adversarial"] * 2,
    })
    (tmp_path / "rows").mkdir()
    pq.write_table(rows, tmp_path / "rows" / "part-0.parquet")
    assert main(["simulate", "--rows", str(tmp_path / "rows"), "--dataset", "a", *SMALL]) == 0
    assert "| fgsm | 0 | 100.0% | 6 | 100.0% | 0.0% | 0.0% |" in capsys.readouterr().out
    pq.write_table(rows.drop_columns(["verdict"]), tmp_path / "rows" / "part-0.parquet")
    assert main(["simulate", "--rows", str(tmp_path / "rows"), *SMALL]) == 2
    assert "verdict" in capsys.readouterr().err
