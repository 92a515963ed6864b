"""Ground truth beside the outcome: the summary's per-source and per-role lines, on hand-made outputs
(every count worked out by hand) and on the demo's own pipeline (``twostream score`` with no input:
local S3 server, local Ray, the cached demo sample), checked against the manifest's roles and the
``sources/`` output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["high.model=mobilenetv3_small_050", "high.weights=random", "low.model=cifar_resnet20",
         "low.weights=random", "job.files_per_shard=16", "job.reputation_shards=2"]


def test_ground_truth_by_hand(tmp_path: Path) -> None:
    """x (attacker) sends 5 rejected images (4 attacked, 1 clean): CC 1 2 3 4 5, listed from its
    3rd. y (attacker) sends 2 attacked ships accepted as cats. o (out of scope): R R R A A A:
    CC 1 2 3 2 1 0, listed at its 3rd, released at its 6th; its accepted images are wrong
    (category other). h (honest): 2 accepted + 1 unreadable. u has no role: not listed."""
    from twostream.batch import ground_truth

    (tmp_path / "images").mkdir()
    (tmp_path / "sources").mkdir()
    rows = []  # (image_id, source, timestamp, verdict, label, blacklisted), written out of time order

    def add(source: str, ts: list[float], verdicts: str, listed: str, label: str | None = None) -> None:
        for k, (t, v, b) in enumerate(zip(ts, verdicts, listed)):
            verdict = {"R": "adversarial", "A": "accepted", "E": "error"}[v]
            rows.append((f"{source}{k}", source, t, verdict, label if v == "A" else None,
                         None if v == "E" else b == "T"))

    add("x", [50, 10, 40, 20, 30], "RRRRR", "TFTFT")  # time order: 10 20 30 40 50 -> F F T T T
    add("o", [1, 2, 3, 4, 5, 6], "RRRAAA", "FFTTTF", label="ship")
    add("h", [7, 8, 9], "AAE", "FF-", label="cat")
    add("y", [3, 4], "AA", "FF", label="cat")
    add("u", [1], "R", "F")
    rows.reverse()
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(
        ["image_id", "source", "timestamp", "verdict", "label", "blacklisted"])}), tmp_path / "images" / "a.parquet")
    pq.write_table(pa.table({"source": ["x", "o", "h", "u", "y"], "images": [5, 6, 2, 1, 2],
                             "rejected": [5, 3, 0, 1, 0], "blocked": [3, 3, 0, 0, 0], "errors": [0, 0, 1, 0, 0],
                             "blacklisted": [True, False, False, False, False]}),
                   tmp_path / "sources" / "part-0.parquet")
    category = {"x": "ship", "o": "other", "h": "cat", "u": "dog", "y": "ship"}
    role = {"x": "attacker-t2-ifgsm", "o": "honest-out-of-scope", "h": "honest", "u": "", "y": "attacker-adaptive-8"}
    attacked = {"x1", "x2", "x3", "x4", "y0", "y1"}
    with open(tmp_path / "manifest.csv", "w") as handle:
        handle.write("image_id,source,timestamp,role,category,attack\n")
        for r in rows:
            handle.write(f"{r[0]},{r[1]},{r[2]},{role[r[1]]},{category[r[1]]},{'a' if r[0] in attacked else ''}\n")
    section = ground_truth.from_output(str(tmp_path / "manifest.csv"), str(tmp_path))
    got = {s["source"]: s for s in section["sources"]}
    assert list(got) == ["h", "o", "y", "x"]  # honest, out of scope, attackers (by role); u has no role
    assert got["x"] == {"source": "x", "role": "attacker-t2-ifgsm", "images": 5, "accepted": 0, "rejected": 5,
                        "blocked": 3, "errors": 0, "blacklisted": True, "joined_at": [3], "since_image": 3,
                        "accepted_wrong_label": 0, "attacked": 4, "attacked_accepted": 0, "attacked_wrong_label": 0}
    assert (got["y"]["attacked_accepted"], got["y"]["attacked_wrong_label"], got["y"]["joined_at"]) == (2, 2, [])
    assert (got["o"]["accepted"], got["o"]["accepted_wrong_label"], got["o"]["joined_at"],
            got["o"]["since_image"], got["o"]["blacklisted"]) == (3, 3, [3], None, False)
    assert (got["h"]["accepted"], got["h"]["errors"], got["h"]["joined_at"]) == (2, 1, [])
    assert section["lines"] == [
        "honest: blacklisted 0 of 1; 2 of 2 images accepted, 0 with a wrong label",
        "honest-out-of-scope: blacklisted 1 of 1 (outside the ten categories: rejected by design); "
        "3 of 6 images accepted, 3 with a wrong label",
        "attacker-adaptive-8: caught 0 of 1; 2 of 2 attacked images accepted, 2 with a wrong label",
        "attacker-t2-ifgsm: caught 1 of 1; 0 of 4 attacked images accepted; 0 of 1 clean ones accepted",
        "attackers caught: 1 of 2; honest in-scope senders blacklisted: 0 of 1; the out-of-scope sender was "
        "blacklisted: the defence covers ten categories only",
    ]
    printed = "\n".join(ground_truth.format_lines(section))
    assert "yes, since image 3" in printed and "no (was listed at image 3)" in printed
    # no role column: no section
    (tmp_path / "plain.csv").write_text("image_id,source,timestamp\nx0,x,1\n")
    assert ground_truth.from_output(str(tmp_path / "plain.csv"), str(tmp_path)) is None


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_demo_pipeline_ground_truth(tmp_path: Path) -> None:
    """``twostream score`` with no input and no output, as ``make demo`` runs it (small random-weight
    models so the sample is quick to make): the ground-truth lines against the manifest and ``sources/``."""
    env = dict(os.environ, TWOSTREAM_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    sets = [a for s in SMALL for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "twostream.cli", "score", "--no-progress", *sets],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out,) = (tmp_path / "out").glob("demo-*")  # the default output, relative to the working directory
    (manifest,) = (tmp_path / "cache" / "samples").glob("*/manifest.csv")
    rows = list(csv.DictReader(open(manifest)))
    role = {r["source"]: r["role"] for r in rows}
    sources = {r["source"]: r for r in pq.read_table(out / "sources").to_pylist()}
    images = pq.read_table(out / "images").to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    got = {s["source"]: s for s in summary["ground_truth"]["sources"]}
    assert set(got) == set(role) == set(sources)
    uploads = Counter(r["source"] for r in rows)
    accepted = Counter(r["source"] for r in images if r["verdict"] == "accepted")
    for source, s in got.items():
        src = sources[source]
        assert s["role"] == role[source] and s["images"] == uploads[source] == src["images"]
        assert (s["rejected"], s["blocked"], s["blacklisted"]) == (src["rejected"], src["blocked"], src["blacklisted"])
        assert s["accepted"] == accepted[source] == src["images"] - src["rejected"]
        # the image that put it on the list: the one whose timestamp opened its last interval
        times = sorted(float(r["timestamp"]) for r in rows if r["source"] == source)
        joined = [times.index(iv["joined"]) + 1 for iv in src["blacklist_intervals"]]
        assert s["joined_at"] == joined
        assert s["since_image"] == (joined[-1] if src["blacklisted"] else None)
    ever = defaultdict(lambda: [0, 0])  # kind -> [ever blacklisted, sources]
    for source, r in role.items():
        k = "attacker" if r.startswith("attacker") else r
        ever[k][0] += sources[source]["times_blacklisted"] > 0
        ever[k][1] += 1
    assert dict(Counter(role.values())) == {"honest": 3, "honest-out-of-scope": 1, "attacker-t2-ifgsm": 1,
                                            "attacker-adaptive-8": 1, "attacker-strategic": 1}
    oos = "was" if ever["honest-out-of-scope"][0] else "was not"
    headline = (f"attackers caught: {ever['attacker'][0]} of 3; honest in-scope senders blacklisted: "
                f"{ever['honest'][0]} of 3; the out-of-scope sender {oos} blacklisted")
    assert summary["ground_truth"]["lines"][-1].startswith(headline)
    screen = proc.stdout
    assert "ground truth (the manifest's roles):" in screen and headline in screen
    for source, s in got.items():
        line = next(x for x in screen.splitlines() if x.strip().startswith(source))
        assert line.split()[1:6] == [role[source], *map(str, (uploads[source], accepted[source],
                                                              sources[source]["rejected"], sources[source]["blocked"]))]
