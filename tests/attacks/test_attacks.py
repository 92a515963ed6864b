"""The evaluation's attacks on the real default streams (EfficientNet-Lite0, bundled ResNet-32).

Each attack must raise the loss of the stream it targets (cross-entropy against that stream's
own clean prediction, the label the untargeted attacks move away from) and stay within its
budget; the Fig. 4 wrapper's full-resolution perturbation must be the upsampled 32x32
difference; the adaptive attack's success flag must agree with the comparator on its output.
Images are real photographs shipped by scikit-image, at a small working size to keep CI fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twostream.attacks import ATTACKS
from twostream.attacks.run import attack_params, run_attack
from twostream.attacks.adaptive import success_at
from twostream.attacks.fig4 import fig4_attack
from twostream.core.comparator import compare
from twostream.core.config import HighStreamConfig, LowStreamConfig
from twostream.evaluation.datasets import from_batch, to_batch, to_working_size
from twostream.core.mapping import load_mapping
from twostream.core.models import build_stream

SIZE = 96  # working resolution of the "full-size" test images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def streams():
    high = build_stream(HighStreamConfig(), "high").eval()
    low = build_stream(LowStreamConfig(), "low").eval()
    return high, low


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    images = [skdata.chelsea(), skdata.astronaut(), skdata.coffee()]
    return to_batch(np.stack([to_working_size(np.asarray(im)[..., :3], SIZE) for im in images]))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _own_labels(stream, x: torch.Tensor, small: bool) -> torch.Tensor:
    with torch.no_grad():
        return (stream(x) if small else stream.classify(x)).argmax(1)


@pytest.mark.parametrize("name, params", [
    ("t1-fgsm", {}),
    ("t1-ifgsm", {"max_iter": 4}),
    ("t1-mifgsm", {"max_iter": 4}),
    ("t1-deepfool", {"max_iter": 3}),
    ("t1-universal", {"max_iter": 1, "fit_images": 3, "attacker_params": {"max_iter": 3}}),
])
def test_type1_raises_high_loss_within_budget(streams, photos, name, params) -> None:
    high, low = streams
    labels = _own_labels(high, photos, small=False)
    result = run_attack(name, photos, np.zeros(len(photos), np.int64), high, low, params=params, seed=3)
    adv = result.x_adv
    assert adv.shape == photos.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        before = _loss(high.classify(photos), labels)
        after = _loss(high.classify(adv), labels)
    assert float(after.mean()) > float(before.mean())
    full = attack_params(name, params)
    if full["norm"] == "inf":
        assert float((adv - photos).abs().max()) <= full["eps"] + 1e-6
    if name == "t1-universal":  # one perturbation for all images
        delta = adv - photos
        inside = ((photos > 0.05) & (photos < 0.95)).all(0)  # pixels no image clips
        assert torch.allclose(delta[0][inside], delta[1][inside], atol=1e-6)
    assert result.params == full and result.seed == 3


@pytest.mark.parametrize("name, params", [
    ("t2-fgsm", {}),
    ("t2-ifgsm", {"max_iter": 5}),
    ("t2-cw", {"binary_search_steps": 2, "max_iter": 5}),
    ("t2-pixel1", {"max_iter": 3}),
    ("t2-pixel3", {"max_iter": 3}),
])
def test_type2_raises_low_loss_within_budget(streams, photos, name, params) -> None:
    high, low = streams
    small = low.resize(photos)
    labels = _own_labels(low, small, small=True)
    result = run_attack(name, photos, np.zeros(len(photos), np.int64), high, low, params=params, seed=5)
    adv = result.x_adv
    with torch.no_grad():
        before = _loss(low(small), labels)
        after = _loss(low(low.resize(adv)), labels)
    full = attack_params(name, params)
    if name.startswith("t2-pixel"):
        # DE keeps the clean image where it finds nothing better: never worse, <= k pixels at 32x32
        assert bool((after >= before - 1e-4).all())
        changed = (result.info["diff_small"].abs().amax(1) > 1e-4).flatten(1).sum(1)  # > float noise
        assert int(changed.max()) <= full["pixels"]
    else:
        assert float(after.mean()) > float(before.mean())
    if full["norm"] == "inf":  # bilinear upsampling cannot exceed the 32x32 budget
        assert float((adv - photos).abs().max()) <= full["eps"] + 1e-6


def test_fig4_perturbation_is_the_upsampled_difference(streams) -> None:
    """On a mid-grey image nothing clips, so x_adv - x must equal the upsampled 32x32 difference,
    computed here independently: each 32x32 pixel of the difference is a constant block when
    upsampled by an integer factor with nearest neighbour."""
    _, low = streams
    x = torch.full((1, 3, 64, 64), 0.5)
    rng = np.random.default_rng(0)
    diff = torch.from_numpy(rng.uniform(-0.03, 0.03, (1, 3, 32, 32)).astype(np.float32))
    x_adv, parts = fig4_attack(x, low, lambda small: small + diff, mode="nearest")
    expected = np.kron(diff.numpy(), np.ones((1, 1, 2, 2), np.float32))  # block upsampling by 2
    np.testing.assert_allclose((x_adv - x).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(parts["diff"].numpy(), diff.numpy(), atol=1e-6)
    # bilinear: the same difference, F.interpolate's bilinear at align_corners=False
    x_adv_b, _ = fig4_attack(x, low, lambda small: small + diff, mode="bilinear")
    ref = F.interpolate(diff, size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose((x_adv_b - x).numpy(), ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("targeted", [True, False])
def test_adaptive_attack_budget_and_success_flag(streams, photos, targeted) -> None:
    high, low = streams
    truth = np.array([3, 0, 8])  # cat, airplane, ship: a claimed truth per photo
    result = run_attack("adaptive-8", photos, truth, high, low, params={"steps": 6, "targeted": targeted},
                        seed=1)
    adv = result.x_adv
    assert float((adv - photos).abs().max()) <= 8 / 255 + 1e-6
    assert torch.equal(adv, torch.round(adv * 255) / 255)  # 8-bit pixels, as an upload carries
    mapping = load_mapping().array
    with torch.no_grad():
        ph = torch.softmax(high.classify(adv), 1).topk(5)
        pl = torch.softmax(low.classify(adv), 1).topk(2)
    cmp = compare(ph.indices.numpy(), ph.values.numpy(), pl.indices.numpy(), pl.values.numpy(), mapping)
    wrong_accept = cmp.accepted & (cmp.label != truth)
    np.testing.assert_array_equal(result.info["success"], wrong_accept)
    assert result.params["eps"] == pytest.approx(8 / 255) and result.params["steps"] == 6
    won = result.info["success_step"]
    assert ((won >= 0) == result.info["success"]).all() and (won <= 6).all()
    assert (result.info["target"] >= 0).all() == targeted  # untargeted: no fixed target (-1)


@pytest.mark.parametrize("more", [{"restarts": 3}, {"targets": 3}])
def test_adaptive_more_runs_never_lose_a_success(streams, photos, more) -> None:
    """The first run of a multi-run attack is the single-run attack (same random start), later
    runs attack only the images still unsolved: every image the single run wins is won the same
    way, and every unsolved image went through all runs (steps_used = runs * steps)."""
    high, low = streams
    truth = np.array([3, 0, 8])
    base = {"steps": 2}
    one = run_attack("adaptive-4", photos, truth, high, low, params=base, seed=1)
    many = run_attack("adaptive-4", photos, truth, high, low, params={**base, **more}, seed=1)
    won = one.info["success"]
    assert 0 < won.sum() < len(won)  # a case with something left for the extra runs
    assert (many.info["success"] >= won).all()
    np.testing.assert_array_equal(many.info["success_step"][won], one.info["success_step"][won])
    assert (many.info["success_run"][won] == 0).all()
    assert torch.equal(many.x_adv[won], one.x_adv[won])
    lost = ~many.info["success"]
    assert (many.info["steps_used"][lost] == 3 * 2).all()
    assert float((many.x_adv - photos).abs().max()) <= 4 / 255 + 1e-6


def test_success_at_counts_wins_within_each_checkpoint() -> None:
    """Five images won at steps -1 (never), 0, 20, 21, 150 of a 200-step attack: within 20 steps
    2 of 5, within 50 and 100 3 of 5, within 200 4 of 5."""
    rates = success_at(np.array([-1, 0, 20, 21, 150]), 200)
    assert rates == {"success_at_20": 0.4, "success_at_50": 0.6, "success_at_100": 0.6, "success_at_200": 0.8}
    assert success_at(np.array([3, -1]), 30) == {"success_at_20": 0.5, "success_at_30": 0.5}


def test_clean_is_identity_and_names_are_checked(photos, streams) -> None:
    high, low = streams
    assert torch.equal(run_attack("clean", photos, np.zeros(3, np.int64), high, low).x_adv, photos)
    assert torch.equal(to_batch(from_batch(photos)), photos)  # 8-bit round trip of 8-bit pixels
    with pytest.raises(KeyError, match="unknown attack"):
        attack_params("t3-magic")
    with pytest.raises(KeyError, match="no parameter"):
        attack_params("t1-fgsm", {"epsilon": 0.1})
    assert set(ATTACKS) >= {"t1-universal", "t2-pixel3", "adaptive-16"}
