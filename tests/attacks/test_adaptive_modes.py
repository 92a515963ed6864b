"""The detector-aware attacker's per-query re-randomisation (attacks/blackbox.py
``adaptive_perturbation``): each mode's difference has the shape its declaration says, checked
on the uploads themselves; a real-JPEG query is one of PIL's own decodes; bad modes are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from twostream.attacks.blackbox import ADAPTIVE_MODES, adaptive_perturbation

IMAGE = np.random.default_rng(0).integers(20, 236, (40, 48, 3)).astype(np.uint8)  # nothing clips at A <= 5


def delta(mode: str, seed: int = 0) -> tuple[np.ndarray, int]:
    apply, margin = adaptive_perturbation(mode, np.random.default_rng(seed))
    return apply(IMAGE).astype(np.int16) - IMAGE, margin


def blocks_constant(d: np.ndarray, side: int) -> bool:
    h, w = d.shape[:2]
    return all((d[r:r + side, c:c + side] == d[r, c]).all() for r in range(0, h, side) for c in range(0, w, side))


@pytest.mark.parametrize("a", [1, 4])
def test_block_modes_are_constant_per_block_within_a(a: int) -> None:
    d, margin = delta(f"jpeg:{a}")
    assert margin == a and np.abs(d).max() <= a and (d == d[:, :, :1]).all() and blocks_constant(d, 8)
    assert not blocks_constant(d, 16)  # fresh offsets per 8x8 block, not per 16x16
    d16, _ = delta(f"grid16:{a}")
    assert blocks_constant(d16, 16) and (d16 == d16[:, :, :1]).all()
    rgb, _ = delta(f"blockrgb:{a}")
    assert blocks_constant(rgb, 8) and not (rgb == rgb[:, :, :1]).all()
    ac, margin = delta(f"blockac:{a}", seed=3)
    assert margin == a + 1 and (ac == ac[:, :, :1]).all() and np.abs(ac).max() <= a + 1 and not blocks_constant(ac, 8)


def test_two_queries_get_fresh_offsets_and_noise_stays_within_a() -> None:
    apply, margin = adaptive_perturbation("noise:3", np.random.default_rng(0))
    first, second = apply(IMAGE), apply(IMAGE)
    assert margin == 3 and not np.array_equal(first, second)
    assert np.abs(first.astype(int) - IMAGE).max() <= 3


def test_texture_mode_leaves_flat_blocks_alone() -> None:
    image = IMAGE.copy()
    image[:, :24] = 128  # the left three block columns are flat
    apply, _ = adaptive_perturbation("texture:4", np.random.default_rng(0))
    d = apply(image).astype(np.int16) - image
    assert (d[:, :16] == 0).all() and np.abs(d[:, 24:]).max() > 0


def test_realjpeg_queries_are_pil_decodes_at_a_quality_from_a_to_95() -> None:
    def decode(q: int, sub: int) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(IMAGE).save(buf, "JPEG", quality=q, subsampling=sub)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    options = [decode(q, sub) for q in range(90, 96) for sub in (0, 2)]
    apply, margin = adaptive_perturbation("realjpeg:90", np.random.default_rng(0))
    assert margin == 0
    for _ in range(4):
        out = apply(IMAGE)
        assert any(np.array_equal(out, o) for o in options)


@pytest.mark.parametrize("mode", ["jpeg", "jpeg:x", "blur:3", "noise:-1", "realjpeg:0", "realjpeg:96", ""])
def test_bad_modes_are_refused_by_name(mode: str) -> None:
    with pytest.raises(ValueError, match=f"adaptive mode {mode!r}"):
        adaptive_perturbation(mode, np.random.default_rng(0))
    assert set(ADAPTIVE_MODES) >= {"jpeg", "noise", "realjpeg"}
