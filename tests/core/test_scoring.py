"""The scoring path on real weights: verdicts, error rows, batching, and the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from twostream.cli import main as cli_main
from twostream.core.comparator import compare_one
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.config import TwoStreamConfig
from twostream.core.mapping import load_mapping
from twostream.core.scoring import Scorer

ACCEPTED, ADVERSARIAL, ERROR = "accepted", "adversarial", "error"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(TwoStreamConfig())


def test_real_cat_photograph_is_accepted_as_cat(scorer):
    [result] = scorer.score_batch([png(skdata.chelsea())], ids=["chelsea"])
    assert result.verdict == ACCEPTED and result.label == "cat"
    assert result.imagenet_index in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert result.high_labels[0] == "cat" and CIFAR10_LABELS[result.low_idx[0]] == "cat"
    assert (result.width, result.height) == (451, 300)


def test_errors_are_rows_and_do_not_disturb_the_others(scorer):
    good = png(skdata.chelsea())
    results = scorer.score_batch([b"", good, b"garbage", good[:100]], ids=["a", "b", "c", "d"])
    assert [r.image_id for r in results] == ["a", "b", "c", "d"]
    assert [r.verdict for r in results] == [ERROR, ACCEPTED, ERROR, ERROR]
    assert "empty" in results[0].error and "not a recognised" in results[2].error
    assert results[1].label == "cat"


def test_verdicts_follow_the_reference_comparator(scorer):
    # Independent path: each image alone through each stream, softmax top-k by hand, then the
    # plain per-image reference comparator.
    rng = np.random.default_rng(1)
    images = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(),
              rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)]
    results = scorer.score_batch(images, ids=list("wxyz"))
    mapping = load_mapping().array
    for image, result in zip(images, results):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            hp, hi = torch.softmax(scorer.high.classify(x), 1)[0].topk(5)
            lp, li = torch.softmax(scorer.low.classify(x), 1)[0].topk(2)
        assert result.high_idx == hi.tolist() and result.low_idx == li.tolist()
        np.testing.assert_allclose(result.high_prob, hp.numpy(), rtol=1e-4, atol=1e-6)
        expected = compare_one(list(zip(hi.tolist(), hp.tolist())), list(zip(li.tolist(), lp.tolist())), mapping)
        if expected is None:
            assert result.verdict == ADVERSARIAL and result.label is None
        else:
            assert result.verdict == ACCEPTED and result.label == CIFAR10_LABELS[expected[2]]
            assert result.agreement == pytest.approx(expected[3], rel=1e-4)


def test_batch_size_does_not_change_results(scorer):
    images = [skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    one_by_one = TwoStreamConfig.model_validate({"high": {"batch_size": 1}, "low": {"batch_size": 1}})
    small = Scorer(one_by_one, high=scorer.high, low=scorer.low)
    for a, b in zip(small.score_batch(images), scorer.score_batch(images)):
        assert (a.verdict, a.label, a.high_idx, a.low_idx) == (b.verdict, b.label, b.high_idx, b.low_idx)
        np.testing.assert_allclose(a.high_prob, b.high_prob, rtol=1e-4, atol=1e-6)


def test_classify_cli_prints_verdicts(tmp_path, capsys):
    cat = tmp_path / "chelsea.png"
    cat.write_bytes(png(skdata.chelsea()))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert cli_main(["classify", "--json", str(cat), str(bad)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in rows] == [ACCEPTED, ERROR]
    assert rows[0]["label"] == "cat"
    assert "corrupt" in rows[1]["error"] or "not a recognised" in rows[1]["error"]


def test_cli_bad_config_names_the_field(tmp_path, capsys):
    cat = tmp_path / "c.png"
    cat.write_bytes(png(skdata.chelsea()))
    assert cli_main(["classify", str(cat), "--set", "thresholds.p2=2"]) == 2
    assert "thresholds.p2" in capsys.readouterr().err
