"""``twostream train-low``: training lowers the loss, the perturbations stay within epsilon, the
weight file carries metadata and loads strictly, resume equals an uninterrupted run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from twostream.cli import main
from twostream.core.config import LowStreamConfig
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models import CIFAR10_MEAN, CIFAR10_STD, WeightsError, build_stream
from twostream.core.models.weights import check_metadata
from twostream.training.adversarial import fgsm_rs, parse_eps, pgd
from twostream.training.data import holdout_split
from twostream.training.loop import select_epoch, train
from twostream.training.options import TrainOptions

CLASSES = ("airplane", "cat", "frog")
PER_CLASS = 20


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 20 JPEGs of 32x32: a dominant colour per class plus noise (easy to learn)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for k in range(PER_CLASS):
            image = rng.integers(0, 90, (32, 32, 3))
            image[..., c] += 150
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{k:03d}.jpg", quality=95)
    return root


def _images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``root`` in [0, 1] with their CIFAR-10 indices, decoded independently (PIL)."""
    files = sorted(root.glob("*/*.jpg"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files]).float() / 255
    y = torch.tensor([CIFAR10_LABELS.index(f.parent.name) for f in files])
    return x, y


def _opts(folder: Path, tmp_path: Path, **kw) -> TrainOptions:
    base = dict(data=str(folder), out=str(tmp_path / "w.th"), arch="cifar_resnet20", epochs=2,
                attack="fgsm-rs", eps=8 / 255, lr=0.05, batch_size=16, holdout=0.2, seed=0,
                eval_pgd_steps=2, quick_eval=8, device="cpu")
    return TrainOptions(**{**base, **kw})


def test_training_lowers_the_loss(tiny_folder: Path, tmp_path: Path) -> None:
    x, y = _images(tiny_folder)
    torch.manual_seed(0)  # train() seeds the same way before building the random network
    before = build_stream(LowStreamConfig(model="cifar_resnet20", weights="random"), "low")
    train(_opts(tiny_folder, tmp_path, attack="none", epochs=3, holdout=0.0, augment=False))
    after = build_stream(LowStreamConfig(model="cifar_resnet20", weights=str(tmp_path / "w.th")), "low")
    with torch.no_grad():
        loss_before = float(F.cross_entropy(before(x), y))
        loss_after = float(F.cross_entropy(after(x), y))
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)


@pytest.mark.parametrize("attack", ["fgsm-rs", "pgd"])
def test_perturbation_stays_within_eps_and_range(attack: str) -> None:
    torch.manual_seed(0)
    model = build_stream(LowStreamConfig(model="cifar_resnet20", weights="random"), "low")
    x = torch.rand(8, 3, 32, 32)
    x[:, :, :4] = 0.0  # pixels at the bounds: the projection to [0, 1] must hold there too
    x[:, :, -4:] = 1.0
    y = torch.arange(8) % 10
    eps = 8 / 255
    gen = torch.Generator().manual_seed(0)
    adv = fgsm_rs(model, x, y, eps, gen) if attack == "fgsm-rs" else pgd(model, x, y, eps, 5, gen, restarts=2)
    delta = (adv - x).abs()
    assert float(delta.max()) <= eps + 1e-6
    assert float(delta.max()) > 0.9 * eps  # the attack moved the pixels, to the edge of the ball
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        assert float(F.cross_entropy(model(adv), y)) > float(F.cross_entropy(model(x), y))


def test_parse_eps() -> None:
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.03") == pytest.approx(0.03)
    for bad in ("eight", "1/0", "2"):
        with pytest.raises(ValueError, match="epsilon"):
            parse_eps(bad)


def test_weight_file_metadata_and_strict_loading(tiny_folder: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "net.th"
    rc = main(["train-low", "--data", str(tiny_folder), "--out", str(out), "--arch", "cifar_resnet20",
               "--epochs", "1", "--batch-size", "16", "--holdout", "0.25", "--eps", "4/255",
               "--eval-pgd-steps", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    blob = torch.load(out, weights_only=True)
    meta = blob["meta"]
    assert meta["architecture"] == "cifar_resnet20"
    assert meta["mean"] == list(CIFAR10_MEAN) and meta["std"] == list(CIFAR10_STD)
    assert meta["input_size"] == [32, 32]
    assert meta["classes"] == list(CIFAR10_LABELS)
    assert meta["data"]["images"] == 3 * PER_CLASS and meta["data"]["holdout_images"] == 15
    assert meta["data"]["class_counts"] == {name: PER_CLASS for name in CLASSES}
    assert (meta["epochs"], meta["attack"], meta["seed"]) == (1, "fgsm-rs", 0)
    assert meta["epsilon"] == pytest.approx(4 / 255)
    assert "train-low" in meta["command"] and str(out) in meta["command"]

    stream = build_stream(LowStreamConfig(model="cifar_resnet20", weights=str(out)), "low")
    for key, value in blob["state_dict"].items():
        assert torch.equal(stream.net.state_dict()[key], value), key
    # the metadata's clean accuracy is the loaded stream's accuracy on the held-out split
    x, y = _images(tiny_folder)
    _, held = holdout_split(len(y), 0.25, 0)
    with torch.no_grad():
        clean = float((stream(x[held]).argmax(1) == y[held]).float().mean())
    assert meta["holdout_clean_accuracy"] == pytest.approx(clean)
    assert 0.0 <= meta["holdout_pgd_accuracy"] <= meta["holdout_clean_accuracy"]

    with pytest.raises(WeightsError, match="architecture 'cifar_resnet20'.*configured model is 'cifar_resnet32'"):
        build_stream(LowStreamConfig(model="cifar_resnet32", weights=str(out)), "low")


def test_check_metadata_refuses_other_normalisation() -> None:
    meta = {"architecture": "cifar_resnet32", "mean": [0.5, 0.5, 0.5], "std": list(CIFAR10_STD)}
    with pytest.raises(WeightsError, match=r"mean \[0.5, 0.5, 0.5\] in the file"):
        check_metadata(meta, model="cifar_resnet32", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                       size=(32, 32), origin="f")
    check_metadata({**meta, "mean": list(CIFAR10_MEAN)}, model="cifar_resnet32", mean=CIFAR10_MEAN,
                   std=CIFAR10_STD, size=(32, 32), origin="f")


def test_resume_equals_uninterrupted_run(tiny_folder: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    full = train(_opts(tiny_folder, tmp_path, out=str(tmp_path / "full.th"), checkpoint_dir=str(ckpt)))
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-001.pt", "epoch-002.pt"]
    (ckpt / "epoch-002.pt").unlink()  # as if interrupted during epoch 2
    with caplog.at_level(logging.INFO, logger="twostream.training.loop"):
        resumed = train(_opts(tiny_folder, tmp_path, out=str(tmp_path / "resumed.th"),
                              checkpoint_dir=str(ckpt), resume=True))
    ran = [r.getMessage().split(":")[0] for r in caplog.records if "train loss" in r.getMessage()]
    assert ran == ["epoch 2/2"]
    assert any("epoch-001.pt (epoch 1 of 2)" in r.getMessage() for r in caplog.records)
    a = torch.load(tmp_path / "full.th", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed.th", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["holdout_clean_accuracy"] == full["holdout_clean_accuracy"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]

    with pytest.raises(ValueError, match="other options.*'lr'"):
        train(_opts(tiny_folder, tmp_path, lr=0.01, checkpoint_dir=str(ckpt), resume=True))


def test_holdout_split_is_a_partition_and_its_prefixes_are_random_samples() -> None:
    labels = torch.arange(1000) // 100  # a folder read class by class: 10 classes of 100
    train_idx, held = holdout_split(1000, 0.2, seed=0)
    assert len(held) == 200 and len(train_idx) == 800
    assert sorted(train_idx.tolist() + held.tolist()) == list(range(1000))
    # the first 50 held-out images span the classes (sorted indices would give 2-3 classes)
    assert len(set(labels[held[:50]].tolist())) >= 7
    assert torch.equal(holdout_split(1000, 0.2, seed=0)[1], held)  # seeded


def _history(*pairs: tuple[float, float]) -> list[dict]:
    return [{"epoch": k + 1, "holdout_clean": c, "holdout_pgd": r} for k, (c, r) in enumerate(pairs)]


def test_select_epoch_by_held_out_figures_and_collapse() -> None:
    # the run that overfit: PGD 0.219, 0.285, then 0.023; one standard error of 0.285 on 512
    # images is sqrt(0.285 * 0.715 / 512) = 0.020, so only epoch 2 is within it
    run = _history((0.766, 0.219), (0.723, 0.285), (0.561, 0.023))
    assert select_epoch(run[:2], adversarial=True, n=512) == (2, False)
    assert select_epoch(run, adversarial=True, n=512) == (2, True)  # 0.023 < 0.5 * 0.285
    # the shipped run: 0.3652 at epoch 3, 0.3633 at epoch 4, within sqrt(.3652 * .6348 / 512) = 0.021
    shipped = _history((0.691, 0.1465), (0.732, 0.2715), (0.822, 0.3652), (0.842, 0.3633))
    assert select_epoch(shipped, adversarial=True, n=512) == (4, False)
    assert select_epoch(shipped, adversarial=True, n=10**9) == (3, False)  # exact figures: the best
    assert select_epoch(_history((0.7, 0.30), (0.7, 0.16)), adversarial=True, n=512) == (1, False)
    assert select_epoch(_history((0.7, 0.30), (0.7, 0.14)), adversarial=True, n=512) == (1, True)
    assert select_epoch(_history((0.6, 0.2), (0.6, 0.2)), adversarial=True, n=512) == (2, False)
    assert select_epoch(_history((0.7, float("nan")), (0.6, float("nan"))), adversarial=True, n=0) == (2, False)
    # plain training: clean accuracy (0.766 - 0.723 > sqrt(.766 * .234 / 512) = 0.019), no collapse
    assert select_epoch(run, adversarial=False, n=512) == (1, False)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_written_weights_are_the_kept_epoch(tiny_folder: Path, tmp_path: Path, keep: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--keep best writes the checkpoint of the selected epoch and records the stop, --keep last
    the last epoch. The per-epoch held-out figures are scripted (PGD 4/8, 3/8, 1/8: a collapse at
    epoch 3, so best keeps epoch 2); the training, checkpoints and the file are real."""
    import twostream.training.loop as loop

    scripted = iter([(0.5, 0.5), (0.375, 0.375), (0.125, 0.125)])
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **kw: next(scripted, None) or real(*a, **kw))
    ckpt = tmp_path / "ckpt"
    meta = train(_opts(tiny_folder, tmp_path, epochs=3, keep=keep, checkpoint_dir=str(ckpt)))
    assert [h["holdout_pgd"] for h in meta["history"]] == [0.5, 0.375, 0.125]
    want = 2 if keep == "best" else 3
    assert meta["selected_epoch"] == want
    assert meta["stopped_after_epoch"] == (3 if keep == "best" else None)
    written = torch.load(tmp_path / "w.th", weights_only=True)["state_dict"]
    kept = torch.load(ckpt / f"epoch-{want:03d}.pt", weights_only=True)["state_dict"]
    last = torch.load(ckpt / "epoch-003.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(kept[k], last[k]) for k in kept) or keep == "last"  # epochs differ
    for key in written:
        assert torch.equal(written[key], kept[key]), key


def test_clear_errors(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    (bad / "kitten").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(bad / "kitten" / "0.jpg")
    cases = [
        (["--data", str(bad)], "folder 'kitten' is not a CIFAR-10 class"),
        (["--data", str(tmp_path / "missing")], "missing"),
        (["--data", str(tiny_folder), "--eps", "8/0"], "epsilon '8/0'"),
        (["--data", str(tiny_folder), "--arch", "resnet9"], "--arch 'resnet9'"),
        (["--data", str(tiny_folder), "--epochs", "0"], "--epochs must be positive"),
        (["--data", str(tiny_folder), "--resume"], "--resume needs --checkpoint-dir"),
    ]
    for extra, message in cases:
        assert main(["train-low", "--out", str(tmp_path / "x.th"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_shipped_robust_weights_load_with_their_metadata() -> None:
    from twostream.core.models import WEIGHTS_DIR, load_weights_file, resolve_weights_file

    path = resolve_weights_file("bundled:cifar10_resnet32_robust")
    assert path.parent == WEIGHTS_DIR and path.name == "cifar10_resnet32_robust-1561d5bf.th"
    assert (WEIGHTS_DIR / "LICENSE.cifar10_resnet32_robust").is_file()
    _, meta = load_weights_file(path)  # also checks the sha256 prefix in the name
    assert meta["architecture"] == "cifar_resnet32" and meta["init"] == "bundled:cifar10_resnet32"
    assert (meta["attack"], meta["epochs"], meta["selected_epoch"]) == ("fgsm-rs", 4, 4)
    assert meta["data"]["images"] == 50_000 and meta["data"]["holdout_images"] == 2_500
    assert meta["epsilon"] == pytest.approx(8 / 255)
    stream = build_stream(LowStreamConfig(weights="bundled:cifar10_resnet32_robust"), "low")
    assert stream.name == "cifar_resnet32"
    with pytest.raises(WeightsError, match="architecture 'cifar_resnet32'"):
        build_stream(LowStreamConfig(model="cifar_resnet20", weights="bundled:cifar10_resnet32_robust"), "low")
    assert LowStreamConfig().weights == "bundled:cifar10_resnet32"  # the standard weights stay the default


def test_shipped_robust_weights_score_their_held_out_split(assets_dir: Path) -> None:
    """The file's held-out clean accuracy, recomputed: its 2,500 held-out CIFAR-10 training JPEGs
    (the seeded split of the command in its metadata), decoded with PIL, at 32x32 already."""
    from twostream.core.models import load_weights_file, resolve_weights_file

    _, meta = load_weights_file(resolve_weights_file("bundled:cifar10_resnet32_robust"))
    root = assets_dir / "cifar10-jpeg" / "train"
    files = sorted(root.glob("*/*.jpg"), key=lambda f: (CIFAR10_LABELS.index(f.parent.name), f.name))
    assert len(files) == meta["data"]["images"]
    _, held = holdout_split(len(files), meta["data"]["holdout_fraction"], meta["seed"])
    x = torch.stack([torch.from_numpy(np.array(Image.open(files[k]).convert("RGB"))).permute(2, 0, 1)
                     for k in held.tolist()]).float() / 255
    y = torch.tensor([CIFAR10_LABELS.index(files[k].parent.name) for k in held.tolist()])
    stream = build_stream(LowStreamConfig(weights="bundled:cifar10_resnet32_robust"), "low").eval()
    with torch.no_grad():
        clean = float((stream(x).argmax(1) == y).float().mean())
    # to one image of 2,500: another thread count may round a near-tie's logits the other way
    assert clean == pytest.approx(meta["holdout_clean_accuracy"], abs=1.5 / len(held))


# --- issue 32: the airbench94 family and its recipe ---------------------------------------------

RECIPE = dict(arch="airbench94", attack="none", eps=0.0, label_smoothing=0.2, nesterov=True, ema=0.9,
              translate=2, jpeg=(40, 95), jpeg_p=0.5, rescale=0.5, rescale_max=4, color_jitter=0.2,
              crop_scale=0.7, momentum=0.85)


def test_recipe_training_lowers_the_loss(tiny_folder: Path, tmp_path: Path) -> None:
    """airbench94 from random, with every part of the recipe on: the written (averaged) weights fit
    the tiny folder better than the random network; the whitening layer was fitted (not random)."""
    x, y = _images(tiny_folder)
    torch.manual_seed(0)
    before = build_stream(LowStreamConfig(model="airbench94", weights="random"), "low")
    meta = train(_opts(tiny_folder, tmp_path, epochs=4, holdout=0.0, lr=0.4, **RECIPE))
    after = build_stream(LowStreamConfig(model="airbench94", weights=str(tmp_path / "w.th")), "low")
    with torch.no_grad():
        loss_before = float(F.cross_entropy(before(x), y))
        loss_after = float(F.cross_entropy(after(x), y))
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert not torch.equal(after.net.whiten.weight, before.net.whiten.weight)
    assert meta["optimizer"]["nesterov"] and meta["optimizer"]["label_smoothing"] == 0.2
    assert meta["augmentation"]["jpeg"] == [40, 95] and meta["optimizer"]["ema"] == 0.9


@pytest.mark.parametrize("whiten_eps", [5e-4, 1.0])
def test_whiten_eps_sets_the_first_layers_gain(tiny_folder: Path, tmp_path: Path, whiten_eps: float) -> None:
    """``--whiten-eps`` reaches the whitening layer: filter k of the written (frozen) first layer has
    norm ``1 / sqrt(lambda_k + eps)``, with ``lambda_k`` the eigenvalues of the 2x2-patch covariance
    of the normalised training images, computed here with numpy over every patch of every image
    (the tiny folder has fewer than 5,000 training images, so all of them fitted the layer)."""
    meta = train(_opts(tiny_folder, tmp_path, epochs=1, holdout=0.0, whiten_eps=whiten_eps, **RECIPE))
    net = build_stream(LowStreamConfig(model="airbench94", weights=str(tmp_path / "w.th")), "low")
    x, _ = _images(tiny_folder)
    z = ((x - net.mean) / net.std).double().numpy()
    patches = np.stack([z[:, c, i:i + 31, j:j + 31] for c in range(3) for i in (0, 1) for j in (0, 1)], -1)
    eigvals = np.linalg.eigvalsh(np.cov(patches.reshape(-1, 12).T, bias=True))
    norms = net.net.whiten.weight.detach().double().reshape(24, 12).norm(dim=1).numpy()
    expected = 1.0 / np.sqrt(np.clip(eigvals, 0, None) + whiten_eps)
    np.testing.assert_allclose(np.sort(norms[:12]), np.sort(expected), rtol=1e-4)
    np.testing.assert_allclose(norms[12:], norms[:12])  # the negated copies
    assert meta["whiten_eps"] == whiten_eps


def test_recipe_resume_equals_uninterrupted_run(tiny_folder: Path, tmp_path: Path) -> None:
    """With the weight average and every augmentation on, a run resumed from epoch 1's checkpoint
    writes the same tensors as an uninterrupted one (the average is in the checkpoint)."""
    ckpt = tmp_path / "ckpt"
    full = train(_opts(tiny_folder, tmp_path, out=str(tmp_path / "full.th"), checkpoint_dir=str(ckpt), **RECIPE))
    (ckpt / "epoch-002.pt").unlink()
    resumed = train(_opts(tiny_folder, tmp_path, out=str(tmp_path / "resumed.th"), checkpoint_dir=str(ckpt),
                          resume=True, **RECIPE))
    a = torch.load(tmp_path / "full.th", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed.th", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["history"] == [{**h, "seconds": r["seconds"]} for h, r in zip(full["history"], resumed["history"])]
    # what is written is the average, not the last step's weights
    last = torch.load(ckpt / "epoch-002.pt", weights_only=True)
    assert all(torch.equal(a[k], last["ema_state_dict"][k]) for k in a)
    assert any(not torch.equal(a[k], last["state_dict"][k]) for k in a)


def test_serving_augment_parts() -> None:
    from twostream.core.models import resize_image
    from twostream.training.data import jpeg_roundtrip, serving_augment

    spec = build_stream(LowStreamConfig(model="airbench94", weights="random"), "low").spec
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(serving_augment(x, gen(), spec), x)  # everything off: unchanged
    # JPEG of every image at quality 50: Pillow's own round trip, computed independently
    out = serving_augment(x, gen(), spec, jpeg=(50, 50), jpeg_p=1.0)
    for img, got in zip(x, out):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        import io
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=50)
        want = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1) / 255
        assert torch.equal(got, want.float())
        assert torch.equal(jpeg_roundtrip(img, 50), want.float())
    # the upscale round trip of a constant image is the same constant; of a random one, a blur
    grey = torch.full((2, 3, 32, 32), 0.25)
    torch.testing.assert_close(serving_augment(grey, gen(), spec, rescale=1.0), grey)
    up = serving_augment(x, gen(), spec, rescale=1.0, rescale_max=2)
    want = resize_image(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1), spec)
    torch.testing.assert_close(up, want)
    # crops and colour: same shape, in range, reproducible from the seed, and not the identity
    for kw in (dict(crop_scale=0.5), dict(color_jitter=0.4), dict(crop_scale=0.5, rescale=1.0, jpeg=(30, 90),
                                                                   color_jitter=0.3)):
        a, b = serving_augment(x, gen(), spec, **kw), serving_augment(x, gen(), spec, **kw)
        assert a.shape == x.shape and torch.equal(a, b), kw
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and not torch.equal(a, x), kw


def test_decoded_folder_cache(tiny_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from twostream.training.data import load_folder

    stream = build_stream(LowStreamConfig(model="airbench94", weights="random"), "low")
    first = load_folder(str(tiny_folder), stream, cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 1
    with caplog.at_level(logging.INFO, logger="twostream.training.data"):
        again = load_folder(str(tiny_folder), stream, cache_dir=str(tmp_path / "cache"))
    assert any("read from the cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    x, _ = _images(tiny_folder)  # decoded independently with PIL: 32x32 already, so exact
    assert torch.equal(again.x, (x * 255).round().to(torch.uint8))


def test_recipe_option_errors(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--jpeg", "95-40"], "--jpeg 95-40: qualities must be LOW-HIGH"),
        (["--jpeg", "high"], "--jpeg 'high': expected qualities LOW-HIGH"),
        (["--ema", "1.5"], "--ema must be a decay in [0, 1)"),
        (["--rescale", "2"], "--rescale is a probability in [0, 1], got 2.0"),
        (["--crop-scale", "0"], "--crop-scale must be in [0.05, 1]"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--whiten-eps", "0"], "--whiten-eps must be a positive finite number, got 0.0"),
        (["--whiten-eps", "inf"], "--whiten-eps must be a positive finite number, got inf"),
        (["--whiten-eps", "nan"], "--whiten-eps must be a positive finite number, got nan"),
    ]
    for extra, message in cases:
        assert main(["train-low", "--data", str(tiny_folder), "--out", str(tmp_path / "x.th"), *extra]) == 2
        assert message in capsys.readouterr().err
