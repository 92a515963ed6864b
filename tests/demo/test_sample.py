"""The demo sample: shipped photographs with their licences, the senders' plan (roles, patterns,
time order), and a generated sample (layout, manifest with the roles, attacked copies within eps)."""

from __future__ import annotations

import csv
import re
import tarfile
from collections import Counter
from importlib import resources

import numpy as np
import pytest

SMALL = ["high.model=mobilenetv3_small_050", "high.weights=random",
         "low.model=cifar_resnet20", "low.weights=random"]


def test_photographs_shipped_with_their_licences():
    from twostream.core.labels import CIFAR10_LABELS
    from twostream.demo import photos

    data = resources.files("twostream.demo").joinpath("data")
    shipped = sorted(p.name[:-4] for p in data.iterdir() if p.name.endswith(".jpg"))
    assert shipped == sorted(photos.PHOTOS)
    licences = data.joinpath("LICENSES.md").read_text()
    listed = sorted(re.findall(r"^\| (\w+)\.jpg \|", licences, re.M))
    assert listed == shipped
    for p in photos.PHOTOS.values():
        assert p.category in CIFAR10_LABELS or p.category == "other"
        assert p.license.startswith(("CC0", "public domain", "released by Eastman Kodak"))
    # by category: scikit-image's cat and the six in-scope Kodak photographs (four ships, an
    # airplane, a bird); four CC0 / public-domain photographs of other things
    assert Counter(photos.PHOTOS[n].category for n in photos.in_scope()) == {"ship": 4, "cat": 1, "airplane": 1,
                                                                             "bird": 1}
    assert len(photos.out_of_scope()) == 4
    image = photos.load("kodim20")
    assert image.dtype == np.uint8 and image.shape == (341, 512, 3)


def test_variants_are_real_and_deterministic():
    from twostream.demo import photos

    photo = photos.load("chelsea")
    assert max(photos.variant(photo, 0, 320).shape[:2]) == 320
    a, b = photos.variant(photo, 3, 320), photos.variant(photo, 3, 320)
    assert np.array_equal(a, b)
    assert not np.array_equal(photos.variant(photo, 4, 320)[:50, :50], a[:50, :50])
    assert max(a.shape[:2]) <= 320


def test_demo_plan():
    """Hand count of DEMO: 3 honest x 6, 6 out-of-scope, 6 + 6 attacked, 5 attacked + 5 clean."""
    from twostream.demo import photos
    from twostream.demo.sample import DEMO, plan

    uploads = plan(DEMO)
    assert len(uploads) == 46 and sum(bool(u.attack) for u in uploads) == 17
    by_source = {s.source: [u for u in uploads if u.source == s.source] for s in DEMO}
    roles = Counter(s.role for s in DEMO)
    assert roles == {"honest": 3, "honest-out-of-scope": 1, "attacker-t2-ifgsm": 1, "attacker-adaptive-8": 1,
                     "attacker-strategic": 1}
    for s in DEMO:
        mine = by_source[s.source]
        assert [u.timestamp for u in mine] == sorted(u.timestamp for u in mine)  # pattern order = time order
        assert ["a" if u.attack else ("o" if photos.PHOTOS[u.photo].category == "other" else "c")
                for u in mine] == list(s.pattern)
        assert all(u.role == s.role for u in mine)
    strategic = [bool(u.attack) for u in by_source["198.51.100.9"]]
    assert strategic == [True, False] * 5  # clean between attacks: CC never reaches 3 if those pass
    assert len({(u.photo, u.k) for u in uploads}) == len(uploads)  # no two uploads the same image
    assert [u.timestamp for u in uploads] == sorted(u.timestamp for u in uploads)


def test_generate_small_sample(tmp_path):
    from twostream.core.config import load_config
    from twostream.core.preprocess import decode_image
    from twostream.demo import photos
    from twostream.demo.sample import Sender, generate

    senders = [Sender("h", "honest", "cc"), Sender("o", "honest-out-of-scope", "o"),
               Sender("x", "attacker-t2-ifgsm", "aca", "t2-ifgsm")]
    info = generate(tmp_path / "s", senders, shards=1, max_side=64, config=load_config(None, SMALL), progress=False)
    rows = list(csv.DictReader(open(info.manifest)))
    assert (info.uploads, info.attacked, info.sources) == (6, 2, 3)
    assert list(rows[0]) == ["key", "image_id", "source", "timestamp", "role", "attack", "category", "photo"]
    assert Counter(r["role"] for r in rows) == {"honest": 2, "honest-out-of-scope": 1, "attacker-t2-ifgsm": 3}
    assert [r["attack"] for r in rows if r["source"] == "x"] == ["t2-ifgsm", "", "t2-ifgsm"]
    assert {r["category"] for r in rows if r["source"] == "o"} == {"other"}
    files = {str(p.relative_to(info.input_dir))[:-4]: p.read_bytes()
             for p in (info.input_dir / "loose").iterdir() if p.suffix in (".jpg", ".png")}
    tars = list((info.input_dir / "shards").glob("*.tar"))
    assert len(tars) == 1
    with tarfile.open(tars[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {n[:-5] for n in members if n.endswith(".json")} == {n[:-4] for n in members if not n.endswith(".json")}
    files.update({n[:-4]: blob for n, blob in members.items() if not n.endswith(".json")})
    assert sorted(files) == sorted(r["key"] for r in rows)  # loose and tar together, each once
    for r in rows:
        data = files[r["key"]]
        photo, k = r["photo"].split("#")
        clean = photos.variant(photos.load(photo), int(k), 64)
        image = decode_image(data)
        if r["attack"]:  # PNG, within eps = 8/255 of its clean variant, and changed
            assert data[:4] == b"\x89PNG"
            diff = np.abs(image.astype(int) - clean.astype(int))
            assert diff.max() <= 9 and diff.mean() > 0.5
        else:
            assert data[:2] == b"\xff\xd8" and image.shape == clean.shape
    assert "kodim20.jpg" in (info.root / "LICENSES.md").read_text()


def test_cached_reuses(tmp_path, monkeypatch):
    from twostream.demo import sample

    monkeypatch.setattr(sample, "CACHE", tmp_path)
    senders = [sample.Sender("h", "honest", "cc")]
    first = sample.cached(senders, shards=0, max_side=48, progress=False)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = sample.cached(senders, shards=0, max_side=48, progress=False)
    assert again.root == first.root and (again.uploads, again.attacked, again.sources) == (2, 0, 1)
