"""The paper's Tables 1 and 2 (SPEC 5) from per-image evaluation rows, beside the paper's numbers.

A row is one scored image: ``dataset``, ``attack``, ``image_id``, ``truth`` (CIFAR-10 index,
-1 = out of scope), ``high_idx`` (H-Net top-5 ImageNet indices), ``low_idx`` (L-Net top-2
CIFAR-10 indices), ``verdict`` (``accepted`` | ``adversarial``) and ``label`` (the CIFAR-10
name answered, or null). Rows with any other verdict (unreadable images) are left out.
Every table is per ``(dataset, attack)``, in the order the pair first appears in the rows;
measures are fractions in ``[0, 1]``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.attacks import PAPER_ROW
from twostream.core.labels import CIFAR10_LABELS, Verdict
KEYS = ("dataset", "attack")
MISSING = "—"

# Paper, Table 1, in percent, as laid out there: per row (H-Net, L-Net) for each dataset in
# _T1_DATASETS; None = N/A. The Type II FGSM and I-FGSM rows are "FGSM (II)", "I-FGSM (II)".
_T1_DATASETS = ("Cifar-10", "Car196", "fgvc-aircraft", "ImageNet")
_T1 = {
    "Non Attack Data": (None, 91.4, 95.6, 91.9, 98.9, 94.3, 96.7, 87.1),
    "FGSM": (None, 88.8, 29.1, 91.3, 40.9, 94.1, 27.7, 86.6),
    "I-FGSM": (None, 88.9, 0.0, 91.8, 0.0, 93.9, 0.0, 87.0),
    "MI-FGSM": (None, 88.8, 0.0, 92.2, 0.0, 94.0, 0.0, 86.5),
    "DeepFool": (None, 88.7, 66.8, 91.7, 79.3, 93.9, 67.6, 86.7),
    "Universal": (None, 88.6, 34.8, 91.8, 49.3, 94.2, 26.0, 86.8),
    "FGSM (II)": (None, 40.2, 95.3, 54.2, 98.7, 72.8, 96.6, 37.5),
    "I-FGSM (II)": (None, 11.4, 95.2, 13.4, 98.7, 25.1, 96.5, 11.0),
    "One-pixel": (None, 36.5, 95.5, 44.5, 99.1, 86.2, 96.4, 32.3),
    "Three-pixel": (None, 13.5, 95.5, 26.0, 99.1, 55.1, 96.4, 13.1),
    "Carlini": (None, 0.0, 95.1, 0.0, 98.3, 0.0, 96.4, 0.0),
}
# Paper, Table 2, in percent: per row (Reject, Right, Wrong) for each dataset in _T2_DATASETS.
# Printed as is, including fgvc-aircraft MI-FGSM (92.2 + 0.0 + 0.8, which does not sum to 100).
_T2_DATASETS = ("Car196", "fgvc-aircraft", "ImageNet")
_T2 = {
    "Non Attack Data": (11.0, 88.9, 0.1, 6.4, 93.6, 0.0, 13.3, 86.6, 0.1),
    "FGSM": (80.8, 18.6, 0.6, 70.8, 28.9, 0.3, 83.6, 15.5, 0.9),
    "I-FGSM": (99.1, 0.0, 0.9, 99.3, 0.0, 0.7, 98.5, 0.0, 1.5),
    "MI-FGSM": (99.1, 0.0, 0.9, 92.2, 0.0, 0.8, 98.5, 0.0, 1.5),
    "DeepFool": (41.1, 58.6, 0.3, 31.7, 68.2, 0.1, 46.4, 53.2, 0.4),
    "Universal": (79.9, 19.6, 0.5, 66.4, 33.3, 0.3, 83.7, 15.3, 1.0),
    "FGSM (II)": (42.9, 56.8, 0.3, 25.2, 74.6, 0.2, 61.4, 38.2, 0.4),
    "I-FGSM (II)": (84.3, 15.2, 0.5, 73.5, 26.1, 0.4, 88.1, 11.3, 0.6),
    "One-pixel": (49.9, 49.7, 0.3, 10.7, 89.2, 0.1, 65.5, 34.1, 0.4),
    "Three-pixel": (67.7, 31.9, 0.4, 35.9, 63.9, 0.2, 85.6, 13.9, 0.5),
    "Carlini": (99.1, 0.3, 0.6, 99.2, 0.4, 0.4, 98.9, 0.4, 0.7),
}

# (column, heading) of each table's measures.
T1_MEASURES = (("h_net_top5", "H-Net top-5"), ("l_net_top1", "L-Net top-1"))
T2_MEASURES = (("reject", "Reject"), ("right", "Right"), ("wrong", "Wrong"))
OOS_MEASURES = (("reject", "Reject"),)
CHANGE_MEASURES = (("h_top1_changed", "H-Net top-1 class changed"),
                   ("h_top1_label_changed", "H-Net top-1 CIFAR-10 label changed"),
                   ("l_top1_changed", "L-Net top-1 changed"))

PaperTable = dict[str, dict[str, dict[str, float | None]]]


def _paper_table(
    datasets: Sequence[str], rows: Mapping[str, tuple], measures: Sequence[tuple[str, str]]
) -> PaperTable:
    """``{dataset: {row: {measure: percent}}}`` from the paper's row-major layout."""
    k = len(measures)
    return {
        dataset: {
            row: {m: values[d * k + j] for j, (m, _) in enumerate(measures)} for row, values in rows.items()
        }
        for d, dataset in enumerate(datasets)
    }


PAPER_TABLE1: PaperTable = _paper_table(_T1_DATASETS, _T1, T1_MEASURES)
PAPER_TABLE2: PaperTable = _paper_table(_T2_DATASETS, _T2, T2_MEASURES)

_PAPER_DATASET_PREFIXES = (
    (("imagenet",), "ImageNet"),
    (("cars", "car196", "stanford-cars"), "Car196"),
    (("aircraft", "fgvc"), "fgvc-aircraft"),
    (("cifar",), "Cifar-10"),
)


def paper_dataset(name: str) -> str | None:
    """The paper's name for one of our datasets (by prefix, case-insensitive), or None."""
    lowered = name.lower()
    return next((paper for prefixes, paper in _PAPER_DATASET_PREFIXES if lowered.startswith(prefixes)), None)


def scored_mask(rows: pa.Table, in_scope: bool) -> np.ndarray:
    """Rows with a verdict (accepted or adversarial) whose truth is in scope (>= 0) or not (-1)."""
    scored = pc.is_in(rows["verdict"], value_set=pa.array([Verdict.ACCEPTED.value, Verdict.ADVERSARIAL.value]))
    verdict = scored.to_numpy(zero_copy_only=False)
    truth = rows["truth"].to_numpy(zero_copy_only=False)
    return verdict & ((truth >= 0) if in_scope else (truth < 0))


def _grouped(rows: pa.Table, mask: np.ndarray, measures: Mapping[str, np.ndarray]) -> pa.Table:
    """Per (dataset, attack) over the rows in ``mask``: ``n`` and each measure's mean.

    Groups are in the order their pair first appears in all of ``rows``, so every table agrees.
    """
    keys = {key: rows[key].cast(pa.string()) for key in KEYS}
    pairs = pc.binary_join_element_wise(*keys.values(), "\x00").to_numpy(zero_copy_only=False)
    _, first, inverse = np.unique(pairs.astype(str), return_index=True, return_inverse=True)
    columns = {key: values.filter(pa.array(mask)) for key, values in keys.items()}
    columns["_order"] = first[inverse][mask]
    columns.update({name: np.asarray(values, dtype=np.float64)[mask] for name, values in measures.items()})
    aggregates = [("_order", "min"), ("_order", "count")] + [(name, "mean") for name in measures]
    grouped = pa.table(columns).group_by(list(KEYS), use_threads=False).aggregate(aggregates)
    grouped = grouped.sort_by("_order_min")
    out = {key: grouped[key] for key in KEYS}
    out["n"] = grouped["_order_count"].cast(pa.int64())
    out.update({name: grouped[f"{name}_mean"] for name in measures})
    return pa.table(out)


def table1(rows: pa.Table, mapping: np.ndarray) -> pa.Table:
    """Table 1 over in-scope rows: ``n``, ``h_net_top5`` (any top-5 class maps to the truth), ``l_net_top1``.

    ``mapping``: ImageNet index -> CIFAR-10 index, (1000,) with -1 for other
    (``twostream.core.mapping.load_mapping().array``).
    """
    truth = rows["truth"].to_numpy(zero_copy_only=False)
    high = rows["high_idx"].combine_chunks()
    parent = pc.list_parent_indices(high).to_numpy()
    hits = np.asarray(mapping)[pc.list_flatten(high).to_numpy()] == truth[parent]
    h_net = np.bincount(parent[hits], minlength=rows.num_rows) > 0
    l_net = pc.list_element(rows["low_idx"], 0).to_numpy(zero_copy_only=False) == truth
    return _grouped(rows, scored_mask(rows, True), {"h_net_top5": h_net, "l_net_top1": l_net})


def table2(rows: pa.Table) -> pa.Table:
    """Table 2 over in-scope rows: ``n``, ``reject``, ``right`` and ``wrong`` (accepted as the truth or not)."""
    truth = rows["truth"].to_numpy(zero_copy_only=False)
    truth_name = np.asarray(CIFAR10_LABELS, dtype=object)[np.clip(truth, 0, None)]
    rejected = pc.equal(rows["verdict"], Verdict.ADVERSARIAL.value).to_numpy(zero_copy_only=False)
    right = ~rejected & (rows["label"].to_numpy(zero_copy_only=False) == truth_name)
    measures = {"reject": rejected, "right": right, "wrong": ~rejected & ~right}
    return _grouped(rows, scored_mask(rows, True), measures)


def out_of_scope(rows: pa.Table) -> pa.Table:
    """Rows whose truth is outside the ten classes (-1): ``n`` and ``reject`` (they should be rejected)."""
    rejected = pc.equal(rows["verdict"], Verdict.ADVERSARIAL.value).to_numpy(zero_copy_only=False)
    return _grouped(rows, scored_mask(rows, False), {"reject": rejected})


def changes(rows: pa.Table, mapping: np.ndarray) -> pa.Table:
    """What each attack changed, over in-scope rows with a clean row for the same image:
    ``h_top1_changed`` (H-Net's top-1 ImageNet class differs from its clean one),
    ``h_top1_label_changed`` (that class's mapped CIFAR-10 label, ``other`` included, differs)
    and ``l_top1_changed``. An untargeted Type I attack can change the ImageNet class without
    leaving the CIFAR-10 category (one dog breed for another); Table 1 cannot show that.
    """
    pairs = pc.binary_join_element_wise(rows["dataset"].cast(pa.string()), rows["image_id"].cast(pa.string()), "\x00")
    clean = pc.equal(rows["attack"], "clean").to_numpy(zero_copy_only=False)
    mask = scored_mask(rows, True)
    position = pc.index_in(pairs, value_set=pairs.filter(pa.array(clean & mask)))
    has_clean = position.is_valid().to_numpy(zero_copy_only=False)
    index = position.fill_null(0).to_numpy(zero_copy_only=False)
    high = pc.list_element(rows["high_idx"], 0).fill_null(0).to_numpy(zero_copy_only=False)
    low = pc.list_element(rows["low_idx"], 0).fill_null(0).to_numpy(zero_copy_only=False)
    refs = clean & mask
    # a grid without the clean attack has no reference: has_clean is all False, nothing is compared
    clean_high, clean_low = (high[refs][index], low[refs][index]) if refs.any() else (high, low)
    mapped = np.asarray(mapping)
    measures = {"h_top1_changed": high != clean_high,
                "h_top1_label_changed": mapped[high] != mapped[clean_high],
                "l_top1_changed": low != clean_low}
    return _grouped(rows, mask & has_clean, measures)


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}%"


def _section(
    table: pa.Table, measures: Sequence[tuple[str, str]], paper: PaperTable | None
) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of one table: ours (and the paper's, when ``paper`` is given) per measure."""

    header = ["Dataset", "Attack", "n"]
    for _, heading in measures:
        header += [f"{heading} (ours)", f"{heading} (paper)"] if paper is not None else [heading]
    body = []
    for row in table.to_pylist():
        cited = {}
        if paper is not None:
            by_row = paper.get(paper_dataset(row["dataset"]) or "", {})
            cited = by_row.get(PAPER_ROW.get(row["attack"]) or "", {})
        cells = [row["dataset"], row["attack"], str(row["n"])]
        for column, _ in measures:
            cells.append(_percent(100.0 * row[column]))
            if paper is not None:
                cells.append(_percent(cited.get(column)))
        body.append(cells)
    return header, body


def _sections(t1: pa.Table, t2: pa.Table, oos: pa.Table,
              changed: pa.Table | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of each table, in page order."""
    sections = [
        ("Table 1: H-Net top-5 and L-Net top-1 accuracy (in-scope images)",
         *_section(t1, T1_MEASURES, PAPER_TABLE1)),
        ("Table 2: reaction of the two-stream defence (in-scope images)",
         *_section(t2, T2_MEASURES, PAPER_TABLE2)),
        ("Out of scope: images of other categories (should be rejected)",
         *_section(oos, OOS_MEASURES, None)),
    ]
    if changed is not None:
        sections.append(("What the attacks changed (in-scope images, against the same image's clean scores)",
                         *_section(changed, CHANGE_MEASURES, None)))
    return sections


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(t1: pa.Table, t2: pa.Table, oos: pa.Table, changed: pa.Table | None = None) -> str:
    """The tables as Markdown, ours beside the paper's (``—`` where the paper has no number)."""
    parts = []
    for title, header, body in _sections(t1, t2, oos, changed):
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in cells) + " |" for cells in body]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def render_html(t1: pa.Table, t2: pa.Table, oos: pa.Table, meta: Mapping[str, Any],
                changed: pa.Table | None = None) -> str:
    """A self-contained HTML page: ``meta`` (models, command, hardware, wall time) then the three tables."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>twostream: Tables 1 and 2</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #bbb;padding:.25em .6em}td{text-align:right}"
        "td:nth-child(-n+2){text-align:left}</style></head><body>",
        "<h1>Tables 1 and 2: ours beside the paper's</h1>",
        "<dl>" + "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(str(v))}</dd>" for k, v in meta.items()) + "</dl>",
    ]
    for title, header, body in _sections(t1, t2, oos, changed):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in body]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_tables(
    rows: pa.Table, output_uri: str, meta: Mapping[str, Any], mapping: np.ndarray | None = None
) -> dict[str, str]:
    """Write Tables 1-2, the out-of-scope and changes tables (Parquet), ``tables.md`` and ``tables.html``.

    ``mapping`` defaults to the shipped ImageNet -> CIFAR-10 table. Returns file name -> URI.
    """
    if mapping is None:
        from twostream.core.mapping import load_mapping

        mapping = load_mapping().array
    t1, t2, oos, changed = table1(rows, mapping), table2(rows), out_of_scope(rows), changes(rows, mapping)
    uris = {name: storage.join(output_uri, name) for name in
            ("table1.parquet", "table2.parquet", "out_of_scope.parquet", "changes.parquet", "tables.md",
             "tables.html")}
    for name, table in (("table1.parquet", t1), ("table2.parquet", t2), ("out_of_scope.parquet", oos),
                        ("changes.parquet", changed)):
        storage.write_parquet(table, uris[name])
    storage.write_bytes(uris["tables.md"], render_markdown(t1, t2, oos, changed).encode())
    storage.write_bytes(uris["tables.html"], render_html(t1, t2, oos, meta, changed).encode())
    return uris
