"""The evaluation grid: cells attack, cache, score through the library's Scorer, and resume.

A small ImageFolder dataset of scikit-image photographs (``cat/`` in scope, ``other/`` out of
scope) on the real default streams at a small working size.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twostream import storage
from twostream.evaluation import runner
from twostream.core.config import EvalSettings, TwoStreamConfig
from twostream.evaluation.runner import Cell, run_cell
from twostream.core.scoring import Scorer

SIZE = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("ds")
    for cls, name, image in [("cat", "chelsea", skdata.chelsea()), ("cat", "cat", skdata.cat()),
                             ("other", "coffee", skdata.coffee()), ("other", "rocket", skdata.rocket())]:
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(np.asarray(image)[..., :3]).save(root / cls / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(TwoStreamConfig())


def _config(folder: Path, **settings) -> TwoStreamConfig:
    return TwoStreamConfig(eval=EvalSettings(datasets=[f"toy=folder:{folder}"], size=SIZE, **settings))


def test_clean_cell_rows_equal_the_scorer_on_the_cached_images(folder, scorer, tmp_path) -> None:
    config = _config(folder, out_of_scope=1, attacks=["clean"])
    rows = run_cell(Cell(config.eval.datasets[0], "clean"), config, str(tmp_path), scorer)
    # 2 in-scope cat photos + 1 of the 2 out-of-scope ones (seeded subset)
    assert rows.column("truth").to_pylist()[:2] == [3, 3] and rows.column("truth").to_pylist()[2] == -1
    assert rows.num_rows == 3
    with np.load(io.BytesIO(storage.read_bytes(str(tmp_path / "adv/toy/clean.npz")))) as data:
        images = data["images"]
    # the clean "attack" leaves the working-size images as they are: decode + resize by hand
    chelsea = np.asarray(Image.open(folder / "cat" / "chelsea.png").convert("RGB"))
    h, w = chelsea.shape[:2]
    scale = SIZE / min(h, w)
    resized = Image.fromarray(chelsea).resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))),
                                              Image.BICUBIC)
    left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
    expected = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)))
    ids = rows.column("image_id").to_pylist()
    np.testing.assert_array_equal(images[ids.index("cat/chelsea.png")], expected)
    direct = scorer.score_batch(list(images), ids)
    assert rows.column("verdict").to_pylist() == [r.verdict for r in direct]
    assert rows.column("label").to_pylist() == [r.label for r in direct]
    assert rows.column("high_idx").to_pylist() == [r.high_idx for r in direct]
    assert rows.column("low_idx").to_pylist() == [r.low_idx for r in direct]
    assert rows.column("linf").to_pylist() == [0.0, 0.0, 0.0]


def test_cells_resume_and_reuse_the_attack_cache(folder, scorer, tmp_path, monkeypatch) -> None:
    config = _config(folder, attacks=["t2-fgsm"])
    cell = Cell(config.eval.datasets[0], "t2-fgsm")
    first = run_cell(cell, config, str(tmp_path), scorer)
    linf = np.array(first.column("linf").to_pylist())
    assert (linf > 0).all() and (linf <= 8 / 255 + 1e-6).all()
    assert json.loads(first.column("params")[0].as_py())["eps"] == pytest.approx(8 / 255)

    def no_attack(*args, **kwargs):
        raise AssertionError("attacked again")

    monkeypatch.setattr(runner, "run_attack", no_attack)
    assert run_cell(cell, config, str(tmp_path), scorer).equals(first)  # rows exist: skipped
    (tmp_path / "rows" / "toy__t2-fgsm.parquet").unlink()
    assert run_cell(cell, config, str(tmp_path), scorer).equals(first)  # re-scored from the cache
    other = _config(folder, attacks=["t2-fgsm"], params={"t2-fgsm": {"eps": 4 / 255}})
    with pytest.raises(AssertionError, match="attacked again"):  # other settings: not the cache
        run_cell(cell, other, str(tmp_path), scorer)


def test_settings_are_checked() -> None:
    from twostream.core.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="eval.attacks"):
        build_config(TwoStreamConfig, {"eval": {"attacks": ["t9-nope"]}})
    with pytest.raises(ConfigError, match="eval.subset"):
        build_config(TwoStreamConfig, {"eval": {"subset": 0}})
    with pytest.raises(ValueError, match="at least one dataset"):
        runner.cells(EvalSettings())


@pytest.mark.ray
def test_eval_command_runs_the_grid_on_ray(folder, tmp_path) -> None:
    """`twostream eval` on a local Ray: rows for every cell, tables consistent with the rows.

    Run as its own process, as a user runs it: a Ray started and shut down inside the pytest
    process breaks later Ray Data jobs that connect this process to another cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "twostream.cli", "eval", "--dataset", f"toy=folder:{folder}", "--attack", "clean",
         "--attack", "t2-fgsm", "--output", str(tmp_path), "--set", f"eval.size={SIZE}",
         "--set", "eval.out_of_scope=2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 cells" in proc.stdout and "0 failed" in proc.stdout
    rows = runner.read_rows(str(tmp_path))
    assert sorted(set(rows.column("attack").to_pylist())) == ["clean", "t2-fgsm"]
    table2 = storage.read_parquet(str(tmp_path / "table2.parquet")).to_pylist()
    for entry in table2:  # Reject = share of in-scope rows the comparator rejected
        mine = [v for a, t, v in zip(rows.column("attack").to_pylist(), rows.column("truth").to_pylist(),
                                     rows.column("verdict").to_pylist()) if a == entry["attack"] and t >= 0]
        assert entry["n"] == len(mine) == 2
        assert entry["reject"] == pytest.approx(mine.count("adversarial") / len(mine))
    oos = storage.read_parquet(str(tmp_path / "out_of_scope.parquet")).to_pylist()
    assert [(r["attack"], r["n"]) for r in oos] == [("clean", 2)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["cells"]) == 2 and not summary["failed"]
