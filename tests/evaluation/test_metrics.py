"""Tables 1-2 from per-image rows: hand-worked fractions, the paper's numbers, rendering, writing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from twostream.attacks import PAPER_ROW
from twostream.evaluation.metrics import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    out_of_scope,
    paper_dataset,
    render_html,
    render_markdown,
    table1,
    table2,
    write_tables,
)

# A toy mapping: ImageNet 10 -> cat (3), 20 -> dog (5), 30 -> airplane (0); all else other.
MAPPING = np.full(1000, -1, np.int8)
MAPPING[[10, 20, 30]] = [3, 5, 0]
OTHERS = [1, 2, 4, 6]  # ImageNet classes mapped to "other"

# (attack, truth, high_idx, low_idx, verdict, label); dataset "imagenet-val" throughout.
ROWS = [
    ("t1-fgsm", 3, OTHERS + [5], [3, 2], "adversarial", None),    # H miss, L hit, reject
    ("clean", 3, [10] + OTHERS, [3, 5], "accepted", "cat"),        # H hit, L hit, right
    ("clean", 3, OTHERS + [10], [5, 3], "adversarial", None),      # H hit (5th), L miss, reject
    ("clean", 5, [10] + OTHERS, [5, 0], "accepted", "cat"),        # H miss (cat != dog), L hit, wrong
    ("clean", 0, [30] + OTHERS, [0, 1], "accepted", "airplane"),   # H hit, L hit, right
    ("clean", -1, [10] + OTHERS, [3, 1], "adversarial", None),     # out of scope, rejected
    ("t1-fgsm", 5, [20] + OTHERS, [5, 3], "accepted", "dog"),      # H hit, L hit, right
    ("t1-fgsm", 5, OTHERS + [5], [3, 5], "adversarial", None),     # H miss, L miss, reject
    ("t1-fgsm", -1, OTHERS + [5], [3, 5], "accepted", "cat"),      # out of scope, answered
    ("t1-fgsm", -1, OTHERS + [5], [3, 5], "adversarial", None),    # out of scope, rejected
    ("t1-fgsm", 3, None, None, "error", None),                     # unreadable: left out
]


def rows_table(rows=ROWS, dataset: str = "imagenet-val") -> pa.Table:
    attack, truth, high, low, verdict, label = zip(*rows)
    return pa.table({
        "dataset": [dataset] * len(rows),
        "attack": list(attack),
        "image_id": [f"img{k}" for k in range(len(rows))],
        "truth": pa.array(truth, pa.int8()),
        "high_idx": pa.array(high, pa.list_(pa.int32())),
        "low_idx": pa.array(low, pa.list_(pa.int8())),
        "verdict": list(verdict),
        "label": pa.array(label, pa.string()),
        "extra": [0.5] * len(rows),
    })


def test_table1_hand_worked():
    t1 = table1(rows_table(), MAPPING).to_pylist()
    # First-seen order: t1-fgsm (row 0) before clean.
    assert [(r["dataset"], r["attack"], r["n"]) for r in t1] == [
        ("imagenet-val", "t1-fgsm", 3), ("imagenet-val", "clean", 4)]
    # t1-fgsm in scope: H hits 1 of 3 (the dog row), L hits 2 of 3.
    assert t1[0]["h_net_top5"] == pytest.approx(1 / 3)
    assert t1[0]["l_net_top1"] == pytest.approx(2 / 3)
    # clean in scope: H hits rows 1, 2, 4 (3 of 4); L hits rows 1, 3, 4 (3 of 4).
    assert t1[1]["h_net_top5"] == pytest.approx(3 / 4)
    assert t1[1]["l_net_top1"] == pytest.approx(3 / 4)


def test_table2_hand_worked_and_sums_to_one():
    t2 = table2(rows_table()).to_pylist()
    # t1-fgsm: rejected 2, right 1 (dog as dog), wrong 0 -> of 3.
    assert (t2[0]["attack"], t2[0]["n"]) == ("t1-fgsm", 3)
    assert [t2[0][k] for k in ("reject", "right", "wrong")] == pytest.approx([2 / 3, 1 / 3, 0])
    # clean: rejected 1, right 2 (cat, airplane), wrong 1 (dog answered as cat) -> of 4.
    assert (t2[1]["attack"], t2[1]["n"]) == ("clean", 4)
    assert [t2[1][k] for k in ("reject", "right", "wrong")] == pytest.approx([1 / 4, 2 / 4, 1 / 4])
    for row in t2:
        assert row["reject"] + row["right"] + row["wrong"] == pytest.approx(1.0)


def test_out_of_scope_hand_worked():
    oos = out_of_scope(rows_table()).to_pylist()
    # t1-fgsm: two out-of-scope rows, one rejected; clean: one row, rejected. Order: as in all rows.
    assert [(r["attack"], r["n"], r["reject"]) for r in oos] == [("t1-fgsm", 2, 0.5), ("clean", 1, 1.0)]


def test_groups_keep_datasets_apart():
    rows = pa.concat_tables([rows_table(dataset="cars-test"), rows_table(dataset="imagenet-val")])
    t2 = table2(rows)
    assert t2.column("dataset").to_pylist() == ["cars-test", "cars-test", "imagenet-val", "imagenet-val"]
    assert t2.column("n").to_pylist() == [3, 4, 3, 4]


def test_paper_numbers_as_printed():
    assert PAPER_TABLE2["ImageNet"]["I-FGSM"]["reject"] == 98.5
    assert PAPER_TABLE1["Car196"]["Non Attack Data"]["h_net_top5"] == 95.6
    assert PAPER_TABLE1["Cifar-10"]["Non Attack Data"] == {"h_net_top5": None, "l_net_top1": 91.4}
    assert PAPER_TABLE1["ImageNet"]["Carlini"] == {"h_net_top5": 96.4, "l_net_top1": 0.0}
    assert PAPER_TABLE1["fgvc-aircraft"]["One-pixel"]["l_net_top1"] == 86.2
    assert PAPER_TABLE2["Car196"]["Three-pixel"] == {"reject": 67.7, "right": 31.9, "wrong": 0.4}
    assert PAPER_TABLE2["fgvc-aircraft"]["FGSM (II)"]["right"] == 74.6
    assert "Cifar-10" not in PAPER_TABLE2


def test_paper_tables_cover_every_paper_row_and_table2_rows_sum_to_100():
    rows = {name for name in PAPER_ROW.values() if name}
    for table in (PAPER_TABLE1, PAPER_TABLE2):
        for dataset in table.values():
            assert set(dataset) == rows
    for name, dataset in PAPER_TABLE2.items():
        for row, cell in dataset.items():
            if (name, row) == ("fgvc-aircraft", "MI-FGSM"):
                continue  # printed as 92.2 / 0.0 / 0.8 in the paper
            assert sum(cell.values()) == pytest.approx(100.0, abs=0.15), (name, row)


@pytest.mark.parametrize("name, paper", [
    ("imagenet-val", "ImageNet"), ("ImageNet", "ImageNet"), ("cars196", "Car196"),
    ("car196-test", "Car196"), ("stanford-cars", "Car196"), ("aircraft", "fgvc-aircraft"),
    ("fgvc-aircraft-2013b", "fgvc-aircraft"), ("cifar10-test", "Cifar-10"), ("mnist", None),
    ("my-imagenet", None),
])
def test_paper_dataset(name, paper):
    assert paper_dataset(name) == paper


def tables(rows: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    return table1(rows, MAPPING), table2(rows), out_of_scope(rows)


def test_markdown_puts_ours_beside_the_paper():
    text = render_markdown(*tables(rows_table()))
    assert "| H-Net top-5 (ours) | H-Net top-5 (paper) |" in text
    # clean on ImageNet: ours 75.0% / 75.0%, paper 96.7% / 87.1%; Table 2: 25.0% vs 13.3% etc.
    assert "| imagenet-val | clean | 4 | 75.0% | 96.7% | 75.0% | 87.1% |" in text
    assert "| imagenet-val | clean | 4 | 25.0% | 13.3% | 50.0% | 86.6% | 25.0% | 0.1% |" in text
    assert "| imagenet-val | t1-fgsm | 2 | 50.0% |" in text


def test_missing_paper_numbers_are_dashes():
    rows = rows_table(dataset="cifar10-test")
    text = render_markdown(*tables(rows))
    # Cifar-10 H-Net is N/A in Table 1; Cifar-10 is not in Table 2 at all.
    assert "| cifar10-test | clean | 4 | 75.0% | — | 75.0% | 91.4% |" in text
    assert "| cifar10-test | clean | 4 | 25.0% | — | 50.0% | — | 25.0% | — |" in text


def test_hostile_dataset_name_is_escaped():
    hostile = '<script>alert("x")</script>|x'
    t1, t2, oos = tables(rows_table(dataset=hostile))
    page = render_html(t1, t2, oos, {"command": "twostream eval <a&b>", "wall time": "12 s"})
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;|x" in page
    assert "twostream eval &lt;a&amp;b&gt;" in page and "12 s" in page
    assert "75.0%" in page and "96.7%" not in page  # not an ImageNet name: no paper numbers
    text = render_markdown(t1, t2, oos)
    assert '| <script>alert("x")</script>\\|x | clean | 4 |' in text


def test_write_tables(tmp_path):
    # Real mapping: ImageNet 281 (tabby) -> cat, 404 (airliner) -> airplane, 0 (tench) -> other.
    rows = rows_table([
        ("clean", 3, [281, 0, 0, 0, 0], [3, 0], "accepted", "cat"),
        ("clean", 0, [0, 0, 0, 0, 281], [3, 0], "accepted", "cat"),
        ("clean", 0, [0, 404, 0, 0, 0], [0, 3], "adversarial", None),
    ])
    uris = write_tables(rows, str(tmp_path / "out"), {"models": "test"})
    assert sorted(uris) == sorted(["table1.parquet", "table2.parquet", "out_of_scope.parquet",
                                   "changes.parquet", "tables.md", "tables.html"])
    t1 = pq.read_table(uris["table1.parquet"]).to_pylist()
    # H: rows 1 and 3 hit (2 of 3); L: rows 1 and 3 (2 of 3).
    assert t1 == [{"dataset": "imagenet-val", "attack": "clean", "n": 3,
                   "h_net_top5": pytest.approx(2 / 3), "l_net_top1": pytest.approx(2 / 3)}]
    assert pq.read_table(uris["out_of_scope.parquet"]).num_rows == 0
    assert "66.7%" in (tmp_path / "out" / "tables.md").read_text()
    assert "<dd>test</dd>" in (tmp_path / "out" / "tables.html").read_text()


def test_changes_against_the_clean_row_of_the_same_image():
    """Image a: clean H top-1 10 (cat), L 3; attacked -> H 11 (also mapped cat here), L 3: class
    changed, label not, L not. Image b: clean H 20 (dog), L 5; attacked -> H 1 (other), L 3: all
    three changed. Image c has no clean row: left out. Image d is out of scope: left out."""
    mapping = MAPPING.copy()
    mapping[11] = 3
    pad = OTHERS
    table = pa.table({
        "dataset": ["ds"] * 7,
        "attack": ["clean", "clean", "clean", "t1-x", "t1-x", "t1-x", "t1-x"],
        "image_id": ["a", "b", "d", "a", "b", "c", "d"],
        "truth": pa.array([3, 5, -1, 3, 5, 3, -1], pa.int8()),
        "high_idx": pa.array([[10] + pad, [20] + pad, [1] + pad, [11] + pad, [1] + pad, [10] + pad, [2] + pad],
                             pa.list_(pa.int32())),
        "low_idx": pa.array([[3, 0], [5, 0], [0, 1], [3, 0], [3, 5], [3, 0], [1, 0]], pa.list_(pa.int8())),
        "verdict": ["accepted", "accepted", "adversarial", "accepted", "adversarial", "accepted", "adversarial"],
        "label": ["cat", "dog", None, "cat", None, "cat", None],
    })
    from twostream.evaluation.metrics import changes

    got = {r["attack"]: r for r in changes(table, mapping).to_pylist()}
    assert got["clean"]["n"] == 2 and got["clean"]["h_top1_changed"] == 0.0
    assert got["t1-x"]["n"] == 2
    assert got["t1-x"]["h_top1_changed"] == pytest.approx(1.0)
    assert got["t1-x"]["h_top1_label_changed"] == pytest.approx(0.5)
    assert got["t1-x"]["l_top1_changed"] == pytest.approx(0.5)
    # a grid run without the clean attack (e.g. only the untargeted adaptive cells): nothing to
    # compare with, so no row; it used to raise IndexError and lose the run's tables
    attacked = table.filter(pc.not_equal(table["attack"], "clean"))
    assert changes(attacked, mapping).num_rows == 0
