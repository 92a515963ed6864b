"""The airbench94 family (low stream): shapes, strict loading by name and refusals, the whitening
first layer, and the flip test-time augmentation of the stream (``low.tta``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twostream.core.config import ConfigError, LowStreamConfig, load_config
from twostream.core.models import AirbenchNet, Stream, WeightsError, available_models, build_stream


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random(tta: str = "none") -> Stream:
    torch.manual_seed(0)
    return build_stream(LowStreamConfig(model="airbench94", weights="random", tta=tta), "low")


def _params_by_hand() -> int:
    """airbench94's parameter count from its layer sizes."""
    whiten = 24 * 3 * 2 * 2 + 24
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 256 * 256 + 256 * 256 + 256 * 256)
    bns = 2 * 2 * (64 + 256 + 256)
    return whiten + convs + bns + 256 * 10


def test_registered_shapes_and_size() -> None:
    assert "airbench94" in available_models("low")
    stream = _random()
    assert (stream.name, stream.num_classes, stream.spec.size) == ("airbench94", 10, (32, 32))
    assert sum(p.numel() for p in stream.net.parameters()) == _params_by_hand() == 1_972_792
    assert not stream.net.whiten.weight.requires_grad  # frozen after its data-driven init
    with torch.no_grad():
        assert tuple(stream(torch.rand(5, 3, 32, 32)).shape) == (5, 10)
        assert tuple(stream.classify(torch.rand(2, 3, 71, 120)).shape) == (2, 10)


def test_strict_loading_by_name(tmp_path) -> None:
    torch.manual_seed(1)
    net = AirbenchNet()
    path = tmp_path / "airbench.pt"
    torch.save(net.state_dict(), path)
    stream = build_stream(LowStreamConfig(model="airbench94", weights=str(path)), "low")
    for key, value in net.state_dict().items():
        assert torch.equal(stream.net.state_dict()[key], value), key


def test_mismatched_weights_are_refused_with_the_keys(tmp_path) -> None:
    state = AirbenchNet().state_dict()
    no_head = tmp_path / "no-head.pt"
    torch.save({k: v for k, v in state.items() if k != "head.weight"}, no_head)
    with pytest.raises(WeightsError, match=r"does not fit AirbenchNet: missing keys \[head.weight\]"):
        build_stream(LowStreamConfig(model="airbench94", weights=str(no_head)), "low")
    narrow = tmp_path / "narrow.pt"
    torch.save(AirbenchNet((32, 128, 128)).state_dict(), narrow)
    with pytest.raises(WeightsError, match=r"shape mismatches.*layer1.conv1.weight: file \(32, 24, 3, 3\) "
                                           r"vs model \(64, 24, 3, 3\)"):
        build_stream(LowStreamConfig(model="airbench94", weights=str(narrow)), "low")
    resnet = tmp_path / "resnet.pt"
    torch.save(build_stream(LowStreamConfig(model="cifar_resnet20", weights="random"), "low").net.state_dict(),
               resnet)
    with pytest.raises(WeightsError, match=r"missing keys \[whiten.weight, whiten.bias.*unexpected keys \[conv1"):
        build_stream(LowStreamConfig(model="airbench94", weights=str(resnet)), "low")
    labelled = tmp_path / "labelled.pt"
    torch.save({"state_dict": state, "meta": {"architecture": "airbench94"}}, labelled)
    with pytest.raises(WeightsError, match="architecture 'airbench94' in the file, but the configured model "
                                           "is 'cifar_resnet32'"):
        build_stream(LowStreamConfig(model="cifar_resnet32", weights=str(labelled)), "low")
    with pytest.raises(WeightsError, match="'airbench94' has no published release"):
        build_stream(LowStreamConfig(model="airbench94", weights="pretrained"), "low")


def _correlated_images(n: int, seed: int) -> torch.Tensor:
    """Smooth, colour-correlated images (neighbouring pixels and channels strongly correlated)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(n, 1, 9, 9, generator=g), size=(32, 32), mode="bilinear")
    colour = F.interpolate(torch.randn(n, 3, 17, 17, generator=g), size=(32, 32), mode="bilinear")
    return base + 0.3 * colour + 0.05 * torch.randn(n, 3, 32, 32, generator=g)


def test_whitening_init_decorrelates_2x2_patches() -> None:
    x = _correlated_images(16, seed=0)
    net = AirbenchNet()
    net.whiten_init(x, eps=1e-10)
    with torch.no_grad():
        out = net.whiten(x).double().numpy()  # (16, 24, 31, 31): the layer's outputs, by torch's conv
    # the patches' covariance, independently: numpy, explicit 2x2 windows
    xs = x.double().numpy()
    windows = [xs[:, :, i : i + 2, j : j + 2].reshape(16, 12) for i in range(31) for j in range(31)]
    patches = np.stack(windows, axis=1).reshape(-1, 12)
    eigenvalues = np.linalg.eigvalsh(np.cov(patches.T, bias=True))
    assert eigenvalues.max() / eigenvalues.min() > 100  # the input is far from white
    first = out[:, :12].transpose(0, 2, 3, 1).reshape(-1, 12)
    np.testing.assert_allclose(first.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(first.T, bias=True), np.eye(12), atol=2e-3)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # the negated half
    # with the recipe's eps, each direction's variance is lambda / (lambda + eps)
    net.whiten_init(x, eps=0.05)
    with torch.no_grad():
        first = net.whiten(x)[:, :12].double().numpy().transpose(0, 2, 3, 1).reshape(-1, 12)
    variances = np.sort(np.diag(np.cov(first.T, bias=True)))
    np.testing.assert_allclose(variances, np.sort(eigenvalues / (eigenvalues + 0.05)), rtol=1e-3)


def test_flip_tta_on_a_mirror_symmetric_image_changes_nothing() -> None:
    plain, flip = _random("none"), _random("flip")
    assert flip.tta == "flip" and torch.equal(plain.net.whiten.bias, flip.net.whiten.bias)
    half = torch.rand(3, 3, 32, 16, generator=torch.Generator().manual_seed(2))
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(flip(symmetric), plain(symmetric), atol=1e-5, rtol=1e-5)


def test_flip_tta_is_the_mean_of_both_logits_and_gradients_flow() -> None:
    plain, flip = _random("none"), _random("flip")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = 0.5 * (plain(x) + plain(x.flip(-1)))
        assert not torch.allclose(plain(x), expected, atol=1e-3)  # the image is not symmetric
        torch.testing.assert_close(flip(x), expected, atol=1e-5, rtol=1e-5)
    y = torch.tensor([0, 1, 2, 3])
    xa = x.clone().requires_grad_(True)
    F.cross_entropy(flip(xa), y).backward()
    xb = x.clone().requires_grad_(True)
    F.cross_entropy(0.5 * (plain(xb) + plain(xb.flip(-1))), y).backward()
    assert xa.grad is not None and float(xa.grad.abs().sum()) > 0
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-4)


def test_tta_config_and_refusals(tmp_path) -> None:
    assert LowStreamConfig().tta == "none"
    yml = tmp_path / "c.yaml"
    yml.write_text("low:\n  model: airbench94\n  weights: random\n")
    cfg = load_config(str(yml), ["low.tta=flip"])
    assert build_stream(cfg.low, "low").tta == "flip"
    with pytest.raises(ConfigError, match="low.tta"):
        load_config(str(yml), ["low.tta=mirror"])
    with pytest.raises(ValueError, match="test-time augmentation 'mirror'"):
        Stream(AirbenchNet(), kind="low", name="airbench94", num_classes=10, spec=_random().spec, tta="mirror")


def test_flip_tta_reaches_the_scoring_core(tmp_path) -> None:
    """``StreamScorer`` (what the batch job, the endpoint and the audit call) with ``low.tta=flip``
    returns the top-2 softmax of the mean of both logits, computed here from the untouched network."""
    from twostream.core.scoring import StreamScorer

    yml = tmp_path / "c.yaml"
    yml.write_text("low:\n  model: airbench94\n  weights: random\n")
    cfg = load_config(str(yml), ["low.tta=flip"])
    stream = _random("flip")
    scorer = StreamScorer(cfg, "low", stream=stream)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    idx, prob = scorer.topk(images)
    plain = Stream(stream.net, kind="low", name="airbench94", num_classes=10, spec=stream.spec).eval()
    with torch.no_grad():
        for k, image in enumerate(images):
            x = plain.resize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
            p = torch.softmax(0.5 * (plain(x) + plain(x.flip(-1))), dim=1)[0]
            top = torch.topk(p, 2)
            assert idx[k].tolist() == top.indices.tolist()
            np.testing.assert_allclose(prob[k], top.values.numpy(), atol=1e-5)
