"""A rerun on the same output is refused, saying what changed, for each kind of change: an input
file's contents or time, files added or removed, the manifest, a threshold, a model or its
weights. ``run_job`` checks before it touches Ray, so these tests need no cluster; settings that
do not change results (batch sizes) are accepted."""

from __future__ import annotations

import os

import pytest

from jobs.score import run_job
from twostream.batch import planning, resume
from twostream.batch.manifest import read_manifest
from twostream.core.config import load_config

BASE = ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random",
        "thresholds.p1=0.1"]


@pytest.fixture()
def run(tmp_path):
    """An input of three files, a manifest, and an output recording a first run's fingerprint."""
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / name).write_bytes(b"12345")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,key,source\nA,a.jpg,s1\n")
    weights = tmp_path / "high.pt"
    weights.write_bytes(b"abc")
    out = tmp_path / "out"
    cfg = load_config(None, BASE)
    plan = planning.plan_input(str(root), cfg.job.files_per_shard)
    _, digest = read_manifest(str(manifest))
    resume.check_or_record(str(out), resume.fingerprint(plan, str(root), digest, cfg), plan)
    return {"root": root, "manifest": manifest, "out": out, "weights": weights}


def _refusal(run, overrides=(), manifest=None) -> str:
    cfg = load_config(None, BASE + list(overrides))
    with pytest.raises(resume.ResumeRefused) as info:
        run_job(cfg, str(run["root"]), str(run["out"]), str(manifest or run["manifest"]), progress=False)
    return str(info.value).split("Changed: ", 1)[1]


def test_same_run_is_accepted_and_other_batch_sizes_too(run):
    cfg = load_config(None, BASE + ["high.batch_size=3", "low.pool_size=2", "job.decode_batch_size=7"])
    plan = planning.plan_input(str(run["root"]), cfg.job.files_per_shard)
    _, digest = read_manifest(str(run["manifest"]))
    resume.check_or_record(str(run["out"]), resume.fingerprint(plan, str(run["root"]), digest, cfg), plan)


def test_input_file_changed(run):
    (run["root"] / "b.jpg").write_bytes(b"123456")
    assert _refusal(run) == "input: 1 object changed (b.jpg: size 5 -> 6)"


def test_input_file_touched(run):
    path = run["root"] / "c.jpg"
    before = os.stat(path).st_mtime_ns
    os.utime(path, ns=(before + 10**9, before + 10**9))
    assert _refusal(run) == f"input: 1 object changed (c.jpg: modified ({before} -> {before + 10**9}))"


def test_input_files_added_and_removed(run):
    (run["root"] / "a.jpg").unlink()
    (run["root"] / "d.jpg").write_bytes(b"1")
    (run["root"] / "e.jpg").write_bytes(b"1")
    assert _refusal(run) == "input: 2 objects added (d.jpg, e.jpg); input: 1 object removed (a.jpg)"


def test_manifest_changed(run, tmp_path):
    other = tmp_path / "m2.csv"
    other.write_text("image_id,key,source\nA,a.jpg,s2\n")
    assert _refusal(run, manifest=other) == "manifest changed"


def test_threshold_changed(run):
    assert _refusal(run, ["thresholds.p1=0.2"]) == "thresholds.p1: 0.1 -> 0.2"


def test_model_and_weights_changed(run):
    assert _refusal(run, ["high.model=resnet18", "low.weights=bundled:cifar10_resnet20"]) == (
        "high.model: resnet10t -> resnet18; low.weights: random -> bundled:cifar10_resnet20")


def test_weights_file_contents_changed(run, tmp_path):
    path = run["weights"]
    cfg = load_config(None, BASE + [f"high.weights={path}"])
    out = tmp_path / "out-file"
    plan = planning.plan_input(str(run["root"]), cfg.job.files_per_shard)
    _, digest = read_manifest(str(run["manifest"]))
    resume.check_or_record(str(out), resume.fingerprint(plan, str(run["root"]), digest, cfg), plan)
    before = os.stat(path).st_mtime_ns
    path.write_bytes(b"abcd")
    after = os.stat(path).st_mtime_ns
    with pytest.raises(resume.ResumeRefused) as info:
        resume.check_or_record(str(out), resume.fingerprint(plan, str(run["root"]), digest, cfg), plan)
    assert str(info.value).endswith(
        f"Changed: high.weights_file: 3 bytes, mtime {before} -> 4 bytes, mtime {after}")


def test_prior_state_and_late_event_rule_changed(run, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert _refusal(run, [f"job.state={state}", "job.late_events=after"]) == (
        f"job.late_events: refuse -> after; job.state: None -> {state}")


def test_limits_and_reputation_changed(run):
    assert _refusal(run, ["limits.min_side=16", "reputation.threshold=5"]) == (
        "limits.min_side: 8 -> 16; reputation.threshold: 3 -> 5")


def test_jpeg_decoder_changed(run):
    """The device's JPEG decoder (nvJPEG on CUDA) may differ from Pillow by a level or two: a
    rerun with the other decoder is refused, whether named or chosen by ``auto`` from the GPUs."""
    assert _refusal(run, ["job.decode=device"]) == "job.decode: cpu -> device"
    assert _refusal(run, ["high.num_gpus=0.5"]) == "job.decode: cpu -> device"
