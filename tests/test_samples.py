"""The sample generator: real redistributable photos, FGSM copies that change the pixels within
eps, both layouts (loose + tar shards) and a manifest whose attackers send the perturbed copies."""

from __future__ import annotations

import csv
import tarfile

import numpy as np

SMALL = ["high.model=mobilenetv3_small_050", "high.weights=random",
         "low.model=cifar_resnet20", "low.weights=random"]


def test_generate_sample(tmp_path):
    from twostream import samples
    from twostream.batch import planning
    from twostream.core.config import load_config
    from twostream.core.models import build_stream
    from twostream.core.preprocess import decode_image

    cfg = load_config(None, SMALL)
    info = samples.generate(tmp_path / "s", n=10, adversarial_fraction=0.3, sources=4, attackers=1,
                            shards=2, config=cfg)
    rows = list(csv.DictReader(open(info.manifest)))
    assert len(rows) == 10 and sum(int(r["adversarial"]) for r in rows) == 3
    assert {r["source"] for r in rows if r["adversarial"] == "1"} == {"src-00"}
    shards = planning.plan_input(str(info.input_dir), 100).shards
    assert sum(s.kind == "tar" for s in shards) == 2
    read = [r for u in planning.work_units(shards, 100) for r in planning.read_unit(u, 10**9)]
    assert sorted(r["key"].rsplit(".", 1)[0] for r in read) == sorted(r["key"] for r in rows)
    for s in shards:
        if s.kind == "tar":
            with tarfile.open(s.uri) as tar:
                assert any(m.name.endswith(".json") for m in tar.getmembers())
    # the FGSM copy differs from its clean base by at most eps (8/255) per pixel, and does differ
    photo = samples.photographs()["chelsea"]
    base = samples.variant(photo, 1000)
    adv = samples.fgsm(build_stream(cfg.high, "high").eval(), base, 8 / 255)
    diff = np.abs(adv.astype(int) - base.astype(int))
    assert diff.max() <= 9 and diff.mean() > 1
    png = next(info.input_dir.glob("loose/*-adv-*.png"), None)
    if png is not None:
        assert decode_image(png.read_bytes()).shape[2] == 3


def test_licences_listed():
    from twostream.samples import PHOTOS

    assert all(("CC0" in v) or ("public domain" in v) for v in PHOTOS.values())
