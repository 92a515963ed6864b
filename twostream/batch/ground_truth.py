"""Ground truth beside the outcome: when the manifest names each source's role (a ``role``
column, as ``twostream sample`` writes), what happened to each source and to each role.

The section goes into ``summary.json`` as ``ground_truth`` and is printed by the one-screen
summary. Per source: its role, images (scored), accepted, rejected, blocked, errors, whether it is
blacklisted at the end, and the images that put it on the list (``joined_at``: 1-based positions
among its scored images in ``(timestamp, image_id)`` order, read from the ``images/`` output's
``blacklisted`` column). With a ``category`` column (the true CIFAR-10 class, ``other`` outside
the ten) the accepted images with another label are counted too; with an ``attack`` column
(empty for a clean upload) attacked and clean uploads are counted apart.

A source's role is that of its manifest rows (several distinct ones are joined with ``+``). Roles
are free text; three kinds get a headline: ``honest`` (in-scope photographs),
``honest-out-of-scope``, and any role starting with ``attacker``. "Caught" and "blacklisted" in
the headline mean blacklisted at some point of the run (the paper counts users ever listed).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa

from twostream import storage
from twostream.core.records.columns import FIELDS
from twostream.core.records.formats import decompress, detect_format
from twostream.core.records.reader import read_chunks
from twostream.core.labels import Verdict

HONEST, OUT_OF_SCOPE, ATTACKER = "honest", "honest-out-of-scope", "attacker"


def read_truth(manifest_uri: str) -> pa.Table | None:
    """The manifest's ``image_id, source, role[, category, attack]`` as text (None without ``role``),
    read through the one reader of upload records (the manifest was checked by then)."""
    data = storage.read_bytes(manifest_uri)
    blocks = [chunk.table for chunk in read_chunks(decompress(data, manifest_uri), detect_format(manifest_uri) or "csv")
              if chunk.table is not None]
    if not blocks:
        return None
    lower = {n.lower().strip(): n for n in blocks[0].column_names}
    found = {target: next((lower[a] for a in aliases if a in lower), None)
             for target, aliases in (("image_id", FIELDS["image_id"] + ("key",)), ("source", FIELDS["source"]),
                                     ("role", ("role",)), ("category", ("category",)), ("attack", ("attack",)))}
    if found["role"] is None or found["source"] is None or found["image_id"] is None:
        return None
    return pa.concat_tables([pa.table({k: block.column(v).cast(pa.string()) for k, v in found.items() if v is not None})
                             for block in blocks])


def _read_folder(output: str, folder: str, columns: list[str]) -> pa.Table:
    files = storage.list_files(storage.join(output, folder), (".parquet",))
    if not files:  # a run without inputs
        return pa.table({c: pa.nulls(0) for c in columns})
    return pa.concat_tables([storage.read_parquet(f).select(columns) for f in files])


def kind(role: str) -> str | None:
    """Which headline a role counts in: honest, honest-out-of-scope, attacker, or none."""
    if role in (HONEST, OUT_OF_SCOPE):
        return role
    return ATTACKER if role.startswith(ATTACKER) else None


def _order(role: str) -> tuple[int, str]:
    """Honest senders first, then out-of-scope ones, then attackers, then any other role."""
    return [HONEST, OUT_OF_SCOPE, ATTACKER, None].index(kind(role)), role


def summarise(truth: pa.Table, images: pa.Table, sources: pa.Table) -> dict:
    """The ``ground_truth`` section from the manifest's truth, the ``images/`` rows (image_id,
    source, timestamp, verdict, label, blacklisted) and the ``sources/`` rows."""
    roles: dict[str, set[str]] = defaultdict(set)
    for row in truth.select(["source", "role"]).to_pylist():
        if row["role"]:
            roles[row["source"]].add(row["role"])
    extra = [c for c in ("category", "attack") if c in truth.column_names]
    per_id = {r["image_id"]: r for r in truth.select(["image_id", *extra]).to_pylist()}
    per_image: dict[str, list[dict]] = defaultdict(list)
    for row in images.to_pylist():
        per_image[row["source"]].append(row)
    by_source = {r["source"]: r for r in sources.to_pylist()}
    out = []
    for source in sorted(roles, key=lambda s: _order("+".join(sorted(roles[s]))) + (s,)):
        rows = per_image.get(source, [])
        st = by_source.get(source, {})
        accepted = [r for r in rows if r["verdict"] == str(Verdict.ACCEPTED)]
        scored = sorted((r for r in rows if r["blacklisted"] is not None),  # errors are not Algorithm-2 events
                        key=lambda r: (r["timestamp"], r["image_id"]))
        listed = [bool(r["blacklisted"]) for r in scored]
        joined_at = [k + 1 for k, now in enumerate(listed) if now and (k == 0 or not listed[k - 1])]
        entry = {
            "source": source, "role": "+".join(sorted(roles[source])),
            "images": st.get("images", 0), "accepted": len(accepted), "rejected": st.get("rejected", 0),
            "blocked": st.get("blocked", 0), "errors": st.get("errors", 0),
            "blacklisted": bool(st.get("blacklisted", False)), "joined_at": joined_at,
            "since_image": joined_at[-1] if st.get("blacklisted") and joined_at else None,
        }
        truth_of = [per_id.get(r["image_id"], {}) for r in accepted]
        wrong = [r["label"] != t.get("category") for r, t in zip(accepted, truth_of)]
        attacked = [bool(t.get("attack")) for t in truth_of]
        if "category" in extra:
            entry["accepted_wrong_label"] = sum(wrong)
        if "attack" in extra:
            entry["attacked"] = sum(bool(per_id.get(r["image_id"], {}).get("attack")) for r in scored)
            entry["attacked_accepted"] = sum(attacked)
        if len(extra) == 2:
            entry["attacked_wrong_label"] = sum(w and a for w, a in zip(wrong, attacked))
        out.append(entry)
    per_role: dict[str, dict] = {}
    for entry in out:
        agg = per_role.setdefault(entry["role"], Counter())
        agg["sources"] += 1
        agg["ever_blacklisted"] += bool(entry["joined_at"])
        for field, value in entry.items():
            if field not in ("source", "role", "joined_at", "since_image", "errors"):
                agg[field] += int(value)
    per_role = {role: dict(agg) for role, agg in per_role.items()}
    return {"sources": out, "roles": per_role, "lines": _lines(per_role)}


def _role_line(role: str, agg: dict) -> str:
    n, ever = agg["sources"], agg["ever_blacklisted"]

    def accepted(what: str, of: int, took: int, wrong: str) -> str:
        text = f"{took} of {of} {what} accepted"
        return text + (f", {agg[wrong]} with a wrong label" if took and wrong in agg else "")

    images = accepted("images", agg["images"], agg["accepted"], "accepted_wrong_label")
    if kind(role) == ATTACKER:
        if "attacked" in agg:  # attacked and clean uploads apart
            images = accepted("attacked images", agg["attacked"], agg["attacked_accepted"], "attacked_wrong_label")
            if agg["images"] > agg["attacked"]:
                images += (f"; {agg['accepted'] - agg['attacked_accepted']} of {agg['images'] - agg['attacked']}"
                           " clean ones accepted")
        return f"{role}: caught {ever} of {n}; {images}"
    note = ""
    if kind(role) == OUT_OF_SCOPE and ever:
        note = " (outside the ten categories: rejected by design)"
    return f"{role}: blacklisted {ever} of {n}{note}; {images}"


def _lines(per_role: dict[str, dict]) -> list[str]:
    """One line per role, then the headline over the three kinds of role."""
    lines = [_role_line(role, agg) for role, agg in per_role.items()]
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for role, agg in per_role.items():
        if kind(role):
            totals[kind(role)][0] += agg["ever_blacklisted"]
            totals[kind(role)][1] += agg["sources"]
    parts = []
    if ATTACKER in totals:
        parts.append("attackers caught: {} of {}".format(*totals[ATTACKER]))
    if HONEST in totals:
        parts.append("honest in-scope senders blacklisted: {} of {}".format(*totals[HONEST]))
    if OUT_OF_SCOPE in totals:
        ever, n = totals[OUT_OF_SCOPE]
        if n == 1:
            was = "was" if ever else "was not"
            parts.append(f"the out-of-scope sender {was} blacklisted"
                         + (": the defence covers ten categories only" if ever else ""))
        else:
            parts.append(f"out-of-scope senders blacklisted: {ever} of {n}"
                         + (" (the defence covers ten categories only)" if ever else ""))
    if parts:
        lines.append("; ".join(parts))
    return lines


def from_output(manifest_uri: str | None, output: str) -> dict | None:
    """The ``ground_truth`` section of a finished run (None when the manifest has no roles)."""
    truth = read_truth(manifest_uri) if manifest_uri else None
    if truth is None:
        return None
    images = _read_folder(output, "images", ["image_id", "source", "timestamp", "verdict", "label", "blacklisted"])
    sources = _read_folder(output, "sources", ["source", "images", "rejected", "blocked", "errors", "blacklisted"])
    return summarise(truth, images, sources)


def format_lines(section: dict) -> list[str]:
    """The section as lines of the one-screen summary: a table of sources, then the role lines."""
    lines = ["ground truth (the manifest's roles):",
             f"  {'source':<16}{'role':<22}{'images':>7}{'accepted':>9}{'rejected':>9}{'blocked':>8}  blacklisted"]
    for s in section["sources"]:
        listed = f"yes, since image {s['since_image']}" if s["blacklisted"] else "no"
        if not s["blacklisted"] and s["joined_at"]:
            listed += f" (was listed at image {', '.join(map(str, s['joined_at']))})"
        lines.append(f"  {s['source']:<16}{s['role']:<22}{s['images']:>7}{s['accepted']:>9}{s['rejected']:>9}"
                     f"{s['blocked']:>8}  {listed}")
    lines += [f"  {line}" for line in section["lines"]]
    return lines
