"""The L-Net weight files shipped in the package (``bundled:``): strict loading by name, refusal
of a mismatched model or a tampered file, the flip test-time augmentation on the real weights,
and each file's recorded held-out accuracy recomputed from the CIFAR-10 training JPEGs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from twostream.core.config import LowStreamConfig
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models import WeightsError, build_stream
from twostream.core.models.weights import WEIGHTS_DIR, load_weights_file, resolve_weights_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AIRBENCH_FILE = "airbench94_std-382c0d1b.pt"
# (bundled name, model) of every shipped file that records a held-out split of the training JPEGs
TRAINED_HERE = [("airbench94_std", "airbench94"), ("cifar10_resnet32_robust", "cifar_resnet32"),
                ("airbench94_robust", "airbench94")]
HELD_OUT_CHECKED = 1000  # a seeded subset of the held-out split: the whole takes ~40 s on 2 cores


def _airbench(tta: str = "none"):
    return build_stream(LowStreamConfig(model="airbench94", weights="bundled:airbench94_std", tta=tta), "low")


def test_airbench94_std_loads_strictly_by_name() -> None:
    path = resolve_weights_file("bundled:airbench94_std")
    assert path.parent == WEIGHTS_DIR and path.name == AIRBENCH_FILE
    license_text = (WEIGHTS_DIR / "LICENSE.airbench94_std").read_text()
    assert "Krizhevsky" in license_text and "twostream train-low" in license_text
    state, meta = load_weights_file(path)
    assert meta["architecture"] == "airbench94" and meta["init"] == "random"
    assert meta["data"]["images"] == 50_000 and meta["epochs"] == 12
    stream = _airbench()
    loaded = stream.net.state_dict()
    assert set(loaded) == set(state)  # strict: every key of the file, nothing else
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert (stream.name, stream.weights) == ("airbench94", "bundled:airbench94_std")


def test_airbench94_robust_loads_strictly_by_name() -> None:
    """The robust file: its licence names the data and the command; its metadata the PGD-3 training
    at 8/255 from random with whitening eps 1; every tensor loads, nothing else."""
    path = resolve_weights_file("bundled:airbench94_robust")
    assert path.parent == WEIGHTS_DIR and path.name == "airbench94_robust-07564dd0.pt"
    license_text = (WEIGHTS_DIR / "LICENSE.airbench94_robust").read_text()
    assert "Krizhevsky" in license_text and "--whiten-eps 1.0" in license_text
    state, meta = load_weights_file(path)
    assert (meta["architecture"], meta["init"], meta["attack"], meta["pgd_steps"]) == ("airbench94", "random", "pgd", 3)
    assert meta["epsilon"] == pytest.approx(8 / 255) and meta["whiten_eps"] == 1.0
    stream = build_stream(LowStreamConfig(model="airbench94", weights="bundled:airbench94_robust"), "low")
    loaded = stream.net.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # the whitening gain bound 1 / sqrt(eps) holds on the shipped first layer
    assert float(stream.net.whiten.weight.reshape(24, 12).norm(dim=1).max()) <= 1.0 + 1e-6


def test_mismatched_or_tampered_airbench94_std_is_refused(tmp_path) -> None:
    with pytest.raises(WeightsError, match="architecture 'airbench94' in the file, but the configured model "
                                           "is 'cifar_resnet32'"):
        build_stream(LowStreamConfig(model="cifar_resnet32", weights="bundled:airbench94_std"), "low")
    state, _ = load_weights_file(resolve_weights_file("bundled:airbench94_std"))
    bare = tmp_path / "bare.pt"  # no metadata: the strict load itself names the keys
    torch.save(state, bare)
    with pytest.raises(WeightsError, match=r"does not fit CifarResNet: missing keys \[conv1.weight.*unexpected keys "
                                           r"\[whiten.weight"):
        build_stream(LowStreamConfig(model="cifar_resnet32", weights=str(bare)), "low")
    tampered = tmp_path / AIRBENCH_FILE
    shutil.copyfile(WEIGHTS_DIR / AIRBENCH_FILE, tampered)
    with tampered.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        build_stream(LowStreamConfig(model="airbench94", weights=str(tampered)), "low")


def test_flips_on_the_shipped_weights() -> None:
    """A mirror-symmetric image gives the same logits with and without flips; otherwise flips give
    the mean of both logits, and the gradient reaches the input through both halves."""
    plain, flip = _airbench("none"), _airbench("flip")
    half = torch.rand(4, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(flip(symmetric), plain(symmetric), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(flip(x), plain(x), atol=1e-3)
        torch.testing.assert_close(flip(x), 0.5 * (plain(x) + plain(x.flip(-1))), atol=1e-5, rtol=1e-5)
    xa = x.clone().requires_grad_(True)
    F.cross_entropy(flip(xa), torch.tensor([0, 3, 5, 8])).backward()
    xb = x.clone().requires_grad_(True)
    F.cross_entropy(0.5 * (plain(xb) + plain(xb.flip(-1))), torch.tensor([0, 3, 5, 8])).backward()
    assert float(xa.grad.abs().sum()) > 0
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.assets
@pytest.mark.parametrize(("name", "model"), TRAINED_HERE)
def test_recorded_held_out_accuracy_is_recomputed_from_the_jpegs(assets_dir, name, model) -> None:
    """The held-out split is rebuilt from the file's metadata as ``train-low`` draws it (files in
    sorted order, a ``torch.randperm`` of the seed, the first ``round(fraction * n)`` held out),
    decoded here with Pillow and classified through the stream; the first 1,000 of the split's
    seeded order must agree with the recorded accuracy of the whole split within 4 standard errors."""
    _, meta = load_weights_file(resolve_weights_file(f"bundled:{name}"))
    data = meta["data"]
    assert data["limit"] is None and data["images"] == 50_000
    root = assets_dir / "cifar10-jpeg" / "train"
    files = sorted(p for p in root.glob("*/*.jpg"))
    assert len(files) == data["images"]
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(meta["seed"]))
    held = perm[: round(data["holdout_fraction"] * len(files))]
    assert len(held) == data["holdout_images"]
    chosen = [files[int(i)] for i in held[:HELD_OUT_CHECKED]]
    labels = torch.tensor([CIFAR10_LABELS.index(p.parent.name) for p in chosen])
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in chosen])  # (n, 32, 32, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    stream = build_stream(LowStreamConfig(model=model, weights=f"bundled:{name}"), "low")
    with torch.no_grad():
        correct = sum(int((stream.classify(x[i : i + 250]).argmax(1) == labels[i : i + 250]).sum())
                      for i in range(0, len(x), 250))
    recorded = meta["holdout_clean_accuracy"]
    stderr = math.sqrt(recorded * (1 - recorded) / len(chosen))
    assert abs(correct / len(chosen) - recorded) <= 4 * stderr, (name, correct, recorded)
