"""The L-Net robustness measures on a linear model whose robust accuracy is known in closed form.

Model: 8x8 RGB images (192 values; ART's Square attack needs more than 4x4), logit 0 = sum(x) - 96,
logit 1 = 0, logits 2..9 = -1000 (never in play). An image filled with the value 0.5 + d has
margin 192 d for class 0. An L-inf attack of
size eps moves every pixel by eps against the margin, so an image of class 0 stays right iff
d > eps, one of class 1 iff -d > eps (no clipping: all values stay inside [0, 1]).

Images (d in 1/255 units, true class): (+2, 0) (+6, 0) (+10, 0) (-2, 0: wrong when clean)
(-6, 1). Right when clean: 4 of 5. Robust at 4/255: +6, +10, -6 -> 3. At 8/255: +10 -> 1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twostream.evaluation.robustness import RobustnessSettings, autoattack_robust, markdown, measure, pgd_robust

D = [2, 6, 10, -2, -6]
LABELS = torch.tensor([0, 0, 0, 0, 1])
ROBUST = {4: [False, True, True, False, True], 8: [False, False, True, False, False]}  # per image


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(192, 10)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0] = 1.0
            self.fc.bias.fill_(-1000.0)
            self.fc.bias[0], self.fc.bias[1] = -96.0, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def case() -> tuple[nn.Module, torch.Tensor]:
    x = torch.stack([torch.full((3, 8, 8), 0.5 + d / 255, dtype=torch.float64) for d in D]).float()
    return Linear().eval(), x


@pytest.mark.parametrize("eps", [4, 8])
def test_pgd_finds_exactly_the_non_robust_images(case, eps) -> None:
    model, x = case
    robust = pgd_robust(model, x, LABELS, eps / 255, steps=20, restarts=2, seed=0)
    assert robust.tolist() == ROBUST[eps]


def test_eps_zero_leaves_the_clean_accuracy(case) -> None:
    model, x = case
    assert pgd_robust(model, x, LABELS, 0.0, steps=3, restarts=1).tolist() == [True, True, True, False, True]


def test_autoattack_agrees_with_the_closed_form(case) -> None:
    model, x = case
    robust = autoattack_robust(model, x, LABELS, 8 / 255, iters=10, restarts=1, square_queries=20)
    assert robust.tolist() == ROBUST[8]


def test_measure_rows_and_table(case) -> None:
    model, x = case
    x8 = (x * 255).round().to(torch.uint8)  # the loader's form: 8-bit pixels (exact here)
    settings = RobustnessSettings(eps=(4 / 255, 8 / 255), pgd_n=None, pgd_steps=20, pgd_restarts=1, aa_n=0)
    table = measure(model, x8, LABELS, settings, weights="toy", model_name="linear")
    got = [(r["attack"], r["eps_255"], r["n"], r["correct"]) for r in table.to_pylist()]
    assert got == [("clean", "0", 5, 4), ("pgd", "4/255", 5, 3), ("pgd", "8/255", 5, 1)]
    text = markdown(table)
    assert "| toy | 80.0% (n=5) | 60.0% (n=5) | 20.0% (n=5) |" in text


@pytest.mark.assets
def test_cli_tta_flip_measures_the_averaged_stream(assets_dir, tmp_path, one_torch_thread) -> None:
    """``twostream robustness --tta flip`` scores the mean of the logits of each image and its
    mirror: its clean count equals the one computed here from the plain network on the same JPEGs."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from twostream.cli import main
    from twostream.core.config import LowStreamConfig
    from twostream.core.labels import CIFAR10_LABELS
    from twostream.core.models import build_stream

    data = tmp_path / "data"
    for label in CIFAR10_LABELS:
        (data / label).mkdir(parents=True)
        for path in sorted((assets_dir / "cifar10-jpeg" / "test" / label).glob("*.jpg"))[:4]:
            shutil.copy(path, data / label / path.name)
    weights = "bundled:airbench94_std"
    assert main(["robustness", "--model", "airbench94", "--tta", "flip", "--weights", weights, "--data", str(data),
                 "--pgd-n", "0", "--aa-n", "0", "--no-progress", "--output", str(tmp_path / "out")]) == 0
    (row,) = pq.read_table(tmp_path / "out" / "robustness.parquet").to_pylist()
    assert (row["model"], row["attack"], row["n"]) == ("airbench94+flip", "clean", 40)
    plain = build_stream(LowStreamConfig(model="airbench94", weights=weights, tta="none"), "low")
    files = sorted(data.glob("*/*.jpg"))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]))
    x = x.permute(0, 3, 1, 2).float().div(255.0)
    y = torch.tensor([CIFAR10_LABELS.index(p.parent.name) for p in files])
    with torch.no_grad():
        averaged = 0.5 * (plain(x) + plain(x.flip(-1)))
    assert row["correct"] == int((averaged.argmax(1) == y).sum())
