"""The shipped ImageNet -> CIFAR-10 table: pinned counts, hand-checked classes, validation."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from timm.data import ImageNetInfo

from twostream.core.mapping import load_mapping, parse_mapping

# Decided and documented in docs/mapping.md; a change to the table must change this on purpose.
EXPECTED_COUNTS = {
    "airplane": 2, "automobile": 9, "bird": 59, "cat": 5, "deer": 0, "dog": 118,
    "frog": 3, "horse": 1, "ship": 15, "truck": 5, "other": 783,
}

# (index, wnid, expected label), each checked by hand against the class's WordNet gloss.
HAND_CHECKED = [
    (281, "n02123045", "cat"),  # tabby (SPEC example)
    (285, "n02124075", "cat"),  # Egyptian cat (SPEC example)
    (282, "n02123159", "cat"),  # tiger cat: a domestic cat, not a tiger
    (249, "n02110063", "dog"),  # malamute (SPEC example)
    (253, "n02110806", "dog"),  # basenji (SPEC example)
    (18, "n01582220", "bird"),  # magpie (SPEC example)
    (20, "n01601694", "bird"),  # water ouzel (SPEC example)
    (31, "n01644373", "frog"),  # tree frog (SPEC example)
    (32, "n01644900", "frog"),  # tailed frog (SPEC example)
    (726, "n03954731", "other"),  # plane: a carpenter's tool
    (408, "n02704792", "other"),  # amphibian: an amphibious vehicle
    (383, "n02497673", "other"),  # Madagascar cat: a lemur
    (705, "n03895866", "other"),  # passenger car: a railway car
    (565, "n03393912", "other"),  # freight car: a railway car
    (829, "n04335435", "other"),  # streetcar
    (717, "n03930630", "other"),  # pickup: neither automobile nor truck in CIFAR-10
    (404, "n02690373", "airplane"),  # airliner
    (895, "n04552348", "airplane"),  # warplane
    (405, "n02692877", "other"),  # airship: not an aeroplane
    (812, "n04266014", "other"),  # space shuttle
    (817, "n04285008", "automobile"),  # sports car
    (656, "n03770679", "automobile"),  # minivan
    (867, "n04467665", "truck"),  # trailer truck
    (555, "n03345487", "truck"),  # fire engine
    (866, "n04465501", "other"),  # tractor: not a truck
    (339, "n02389026", "horse"),  # sorrel
    (340, "n02391049", "other"),  # zebra: an equine, not a horse
    (510, "n03095699", "ship"),  # container ship
    (780, "n04147183", "ship"),  # schooner
    (693, "n03873416", "other"),  # paddle: an oar, not a boat
    (269, "n02114367", "other"),  # timber wolf: a canine, not a dog
    (291, "n02129165", "other"),  # lion: a big cat, not a house cat
    (352, "n02422699", "other"),  # impala: an antelope, not a deer
]


def test_per_label_counts_are_pinned():
    counts = load_mapping().counts()
    assert counts == EXPECTED_COUNTS
    assert sum(v for k, v in counts.items() if k != "other") == 217  # the paper's count


@pytest.mark.parametrize("index, wnid, label", HAND_CHECKED)
def test_hand_checked_classes(index, wnid, label):
    mapping = load_mapping()
    assert mapping.wnids[index] == wnid
    assert mapping.label_of(index) == label


def test_rows_follow_timm_imagenet_order():
    info = ImageNetInfo()
    assert load_mapping().wnids == tuple(info.index_to_label_name(i) for i in range(1000))


def test_rows_follow_the_sample_labels(assets_dir):
    with open(assets_dir / "imagenet-sample" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wnids = load_mapping().wnids
    assert len(rows) == 1000
    assert all(wnids[int(r["imagenet_index"])] == r["wnid"] for r in rows)


def test_array_matches_labels():
    mapping = load_mapping()
    from twostream.core.labels import CIFAR10_LABELS

    for index in (7, 281, 404, 510, 726):
        value = int(mapping.array[index])
        assert (CIFAR10_LABELS[value] if value >= 0 else "other") == mapping.labels[index]


def _table(rows):
    return "imagenet_index,wnid,name,cifar10_label\n" + "".join(f"{r}\n" for r in rows)


@pytest.mark.parametrize(
    "text, message",
    [
        ("index,wnid\n", "header"),
        (_table([f"{i},n{i:08d},x,other" for i in range(999)]), "999 rows"),
        (_table([f"{i},n{i:08d},x,other" for i in range(999)] + ["999,n1,x,lion"]), "unknown label"),
        (_table(["1,n1,x,other"]), "index"),
    ],
)
def test_malformed_tables_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mapping(text)


def _build_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "build_mapping.py"
    if not path.exists():
        pytest.skip("tools/build_mapping.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("build_mapping", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_agrees_with_every_written_decision():
    """Each override and each confirmed borderline class in the build script is in the table."""
    script = _build_script()
    mapping = load_mapping()
    row = {wnid: k for k, wnid in enumerate(mapping.wnids)}
    decisions = {**script.CONFIRMED, **script.OVERRIDES}
    assert len(decisions) == len(script.CONFIRMED) + len(script.OVERRIDES)  # no class in both
    for wnid, (label, reason) in decisions.items():
        assert mapping.label_of(row[wnid]) == label, (wnid, reason)


def test_array_shape_dtype_and_cache():
    mapping = load_mapping()
    assert mapping.array.shape == (1000,) and mapping.array.dtype == np.int8
    assert set(np.unique(mapping.array)) <= set(range(-1, 10))
    assert load_mapping() is mapping
    assert mapping.version == "1"
