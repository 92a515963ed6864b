"""Algorithm 2: hand-worked sequences, order independence, snapshots."""

from __future__ import annotations

import random

import pytest

from twostream.core.config import ReputationConfig
from twostream.core.reputation import ReputationLedger, Upload, replay

BLOCKED = "blocked"  # Algorithm 2's response to a blacklisted source (SPEC 3)


def uploads(pattern: str, source: str = "10.0.0.1") -> list[Upload]:
    """'R' = rejected image, 'A' = accepted (as cat); one second apart."""
    return [
        Upload(source, float(t), f"img{t:03d}", ch == "R", "adversarial" if ch == "R" else "cat")
        for t, ch in enumerate(pattern)
    ]


def run(pattern: str, **cfg) -> tuple[list[str], list[int], ReputationLedger]:
    responses, ledger = replay(uploads(pattern), ReputationConfig(**cfg))
    return [r.response for r in responses], [r.cc for r in responses], ledger


def test_blacklisted_at_third_net_reject():
    resp, cc, ledger = run("RRR")
    assert resp == ["adversarial", "adversarial", BLOCKED]
    assert cc == [1, 2, 3]
    assert ledger.blacklisted() == ["10.0.0.1"]


def test_accepts_in_between_delay_the_blacklist():
    # CC: 1 0 1 0 1 2 3 -> listed on the seventh image only.
    resp, cc, _ = run("RARARRR")
    assert cc == [1, 0, 1, 0, 1, 2, 3]
    assert resp == ["adversarial", "cat", "adversarial", "cat", "adversarial", "adversarial", BLOCKED]


def test_leaves_the_blacklist_when_cc_returns_to_zero():
    # Listed at CC 3; accepted images are blocked at CC 2 and 1, answered at CC 0.
    resp, cc, ledger = run("RRRAAAA")
    assert cc == [1, 2, 3, 2, 1, 0, 0]
    assert resp == ["adversarial", "adversarial", BLOCKED, BLOCKED, BLOCKED, "cat", "cat"]
    state = ledger.get("10.0.0.1")
    assert not state.blacklisted
    assert state.intervals == [[2.0, 5.0]]
    assert (state.images, state.rejected, state.blocked) == (7, 3, 3)


def test_rejected_image_while_listed_is_blocked():
    resp, cc, _ = run("RRRAR")
    assert cc == [1, 2, 3, 2, 3]
    assert resp[3:] == [BLOCKED, BLOCKED]


def test_counter_is_capped_at_15():
    resp, cc, _ = run("R" * 20 + "A" * 15)
    assert max(cc) == 15 and cc[19] == 15
    # From 15, fourteen accepts leave CC at 1 (still blocked); the fifteenth frees the source.
    assert cc[20 + 13] == 1 and resp[20 + 13] == BLOCKED
    assert cc[20 + 14] == 0 and resp[20 + 14] == "cat"


def test_counter_never_below_zero():
    _, cc, _ = run("AAAR")
    assert cc == [0, 0, 0, 1]


def test_configurable_threshold_cap_and_steps():
    resp, cc, _ = run("RRAR", threshold=2, cap=4, step_up=2, step_down=1)
    # CC: 2 (listed) 4 (cap) 3 4
    assert cc == [2, 4, 3, 4]
    assert resp == [BLOCKED] * 4


def test_sources_are_independent():
    events = uploads("RRR", "a") + uploads("AAA", "b")
    responses, ledger = replay(events)
    assert [r.response for r in responses] == ["adversarial", "adversarial", BLOCKED, "cat", "cat", "cat"]
    assert ledger.blacklisted() == ["a"]


def test_replay_is_order_independent():
    rng = random.Random(7)
    events = []
    for source in ("s1", "s2", "s3"):
        pattern = "".join(rng.choice("RRA") for _ in range(40))
        events += uploads(pattern, source)
    base, base_ledger = replay(events)
    for seed in range(5):
        shuffled = list(range(len(events)))
        random.Random(seed).shuffle(shuffled)
        responses, ledger = replay([events[k] for k in shuffled])
        assert [responses[shuffled.index(k)] for k in range(len(events))] == base
        assert ledger.snapshot() == base_ledger.snapshot()


def test_equal_timestamps_are_ordered_by_image_id():
    # Same timestamp: image ids order them ("a" < "b" < "c"): R, R, A -> no listing.
    same_time = [
        Upload("s", 5.0, "c", False, "cat"),
        Upload("s", 5.0, "a", True, "adversarial"),
        Upload("s", 5.0, "b", True, "adversarial"),
    ]
    responses, _ = replay(same_time)
    assert [r.cc for r in responses] == [1, 1, 2]


def test_snapshot_round_trip_and_continue():
    ledger = ReputationLedger()
    for u in uploads("RRRA"):
        ledger.observe(u)
    restored = ReputationLedger.restore(ledger.snapshot())
    assert restored.get("10.0.0.1") == ledger.get("10.0.0.1")
    nxt = Upload("10.0.0.1", 10.0, "z", False, "cat")
    assert restored.observe(nxt) == ledger.observe(nxt)


def test_restore_rejects_garbage():
    with pytest.raises(ValueError, match="snapshot"):
        ReputationLedger.restore(b"not a snapshot")


def test_reset_forgets_a_source():
    ledger = ReputationLedger()
    for u in uploads("RRR"):
        ledger.observe(u)
    ledger.reset("10.0.0.1")
    assert ledger.get("10.0.0.1").cc == 0 and ledger.blacklisted() == []
