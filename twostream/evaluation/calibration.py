"""Operating points: the comparator's thresholds and Algorithm 2's threshold from scored rows.

An evaluation row keeps both streams' top-k (H-Net top-5, L-Net top-2), which is all Algorithm 1
looks at, so the verdict under any other ``(p1, p2)`` is recomputed exactly by
:func:`twostream.core.results.score_rows`, without the models. On the in-scope rows:

* :func:`sweep`: per ``(p1, p2)`` and attack (``clean`` included), the shares rejected, accepted
  with the true label (right) and accepted with another (wrong);
* :func:`blacklisting`: per ``(p1, p2)`` and reputation threshold, the share of honest senders
  (normal users) ever blacklisted in the Fig. 5 setting (:func:`twostream.evaluation.simulation.
  simulate` with the clean pool those thresholds give), and the share of the worst attack's
  senders blacklisted at the end;
* :func:`choose`: among the ``(p1, p2)`` whose clean reject rate is at most the target, the one
  with the lowest worst-case wrong-accept rate over the attacks (ties: lower clean reject, then
  larger p1, then larger p2); then the smallest reputation threshold that lists at most
  ``max_honest_blacklisted`` of the honest senders (else the largest one swept).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.core.config import ReputationConfig, SimulationSettings, ThresholdsConfig
from twostream.core.labels import CIFAR10_LABELS, Verdict
from twostream.core.results import score_rows

log = logging.getLogger(__name__)

P1_GRID = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50)
P2_GRID = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)
REPUTATION_GRID = (2, 3, 4, 5, 6, 8)
RATES = ("reject", "right", "wrong")


def _topk(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list column of equal-length lists as an (N, k) array."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(values)
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


@dataclass
class ScoredRows:
    """In-scope scored rows reduced to what the comparator needs."""

    attack: np.ndarray  # (N,) str
    truth: np.ndarray  # (N,) CIFAR-10 index
    high_idx: np.ndarray  # (N, 5)
    high_prob: np.ndarray
    low_idx: np.ndarray  # (N, 2)
    low_prob: np.ndarray

    @classmethod
    def from_table(cls, rows: pa.Table, dataset: str | None = None) -> "ScoredRows":
        """The in-scope rows with a verdict (of ``dataset`` when given) of ``twostream eval``'s rows."""
        from twostream.evaluation.metrics import scored_mask

        mask = scored_mask(rows, in_scope=True)
        if dataset is not None:
            mask &= pc.equal(rows["dataset"].cast(pa.string()), dataset).to_numpy(zero_copy_only=False)
        rows = rows.filter(pa.array(mask))
        if not rows.num_rows:
            raise ValueError("no in-scope scored rows" + (f" of dataset {dataset!r}" if dataset else ""))
        return cls(attack=rows["attack"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(str),
                   truth=rows["truth"].to_numpy().astype(np.int64),
                   high_idx=_topk(rows["high_idx"]), high_prob=_topk(rows["high_prob"]),
                   low_idx=_topk(rows["low_idx"]), low_prob=_topk(rows["low_prob"]))

    @property
    def attacks(self) -> list[str]:
        """``clean`` first, then the other attacks in the order they appear."""
        names = list(dict.fromkeys(self.attack.tolist()))
        return (["clean"] if "clean" in names else []) + [a for a in names if a != "clean"]

    def verdicts(self, p1: float, p2: float) -> tuple[np.ndarray, np.ndarray]:
        """(accepted, right) per row under thresholds ``(p1, p2)``."""
        n = len(self.truth)
        batch = score_rows([str(k) for k in range(n)], [None] * n, [None] * n, self.high_idx, self.high_prob,
                           self.low_idx, self.low_prob, ThresholdsConfig(p1=p1, p2=p2))
        accepted = batch.verdict == Verdict.ACCEPTED
        truth_names = np.array(CIFAR10_LABELS, dtype=object)[self.truth]
        return accepted, accepted & (batch.label == truth_names)


def sweep(rows: ScoredRows, p1_grid: Sequence[float] = P1_GRID, p2_grid: Sequence[float] = P2_GRID) -> pa.Table:
    """One row per ``(p1, p2, attack)``: ``n``, ``reject``, ``right``, ``wrong`` (shares)."""
    out: list[dict[str, Any]] = []
    for p1 in p1_grid:
        for p2 in p2_grid:
            accepted, right = rows.verdicts(p1, p2)
            for attack in rows.attacks:
                keep = rows.attack == attack
                n = int(keep.sum())
                acc, ok = int(accepted[keep].sum()), int(right[keep].sum())
                out.append({"p1": float(p1), "p2": float(p2), "attack": attack, "n": n,
                            "reject": (n - acc) / n, "right": ok / n, "wrong": (acc - ok) / n})
    return pa.Table.from_pylist(out)


def operating_points(table: pa.Table, attacks: Sequence[str] | None = None) -> pa.Table:
    """Per ``(p1, p2)`` of a :func:`sweep`: ``clean_reject``, ``clean_wrong``, ``worst_wrong``
    (the largest wrong-accept rate over ``attacks``, default every attack but clean) and
    ``worst_attack``, plus ``wrong:<attack>`` and ``reject:<attack>`` per attack."""
    data = table.to_pylist()
    names = list(dict.fromkeys(r["attack"] for r in data if r["attack"] != "clean"))
    chosen = list(attacks) if attacks else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"no rows of attack(s) {', '.join(unknown)} (attacks in the rows: {', '.join(names)})")
    if "clean" not in {r["attack"] for r in data}:
        raise ValueError("the rows hold no clean in-scope images (the clean reject rate)")
    points: dict[tuple[float, float], dict[str, Any]] = {}
    for r in data:
        point = points.setdefault((r["p1"], r["p2"]), {"p1": r["p1"], "p2": r["p2"]})
        if r["attack"] == "clean":
            point["clean_reject"], point["clean_wrong"] = r["reject"], r["wrong"]
        else:
            point[f"wrong:{r['attack']}"], point[f"reject:{r['attack']}"] = r["wrong"], r["reject"]
    for point in points.values():
        worst = max(chosen, key=lambda a: point[f"wrong:{a}"]) if chosen else None
        point["worst_attack"] = worst
        point["worst_wrong"] = point[f"wrong:{worst}"] if worst else float("nan")
    order = ["p1", "p2", "clean_reject", "clean_wrong", "worst_wrong", "worst_attack"]
    columns = order + [k for k in next(iter(points.values())) if k not in order]
    return pa.Table.from_pylist([{k: p[k] for k in columns} for p in points.values()])


def _pool(share: float, n: int) -> np.ndarray:
    """A pool of ``n`` verdicts with ``round(share * n)`` rejected (what the rows gave)."""
    return np.arange(n) < round(share * n)


def blacklisting(points: pa.Table, clean_n: int, attack_n: dict[str, int], thresholds: Sequence[int],
                 settings: SimulationSettings, reputation: ReputationConfig) -> pa.Table:
    """Per operating point and reputation threshold: ``honest_blacklisted`` (share of normal users
    ever listed) and ``worst_attack_blacklisted`` (the worst attack's senders listed at the end),
    from :func:`~twostream.evaluation.simulation.simulate` on the pools the point gives."""
    from twostream.evaluation.simulation import simulate

    out: list[dict[str, Any]] = []
    users = settings.normal_users * settings.runs
    done: dict[tuple, dict[str, Any]] = {}  # points with the same pools simulate alike
    for point in points.to_pylist():
        attack = point["worst_attack"]
        clean = _pool(point["clean_reject"], clean_n)
        pools = {attack: _pool(point[f"reject:{attack}"], attack_n[attack])}
        for threshold in thresholds:
            key = (int(clean.sum()), attack, int(pools[attack].sum()), int(threshold))
            if key not in done:
                rep = reputation.model_copy(update={"threshold": int(threshold),
                                                    "cap": max(reputation.cap, int(threshold))})
                done[key] = simulate(clean, pools, settings, rep)[1].to_pylist()[0]
            row = done[key]
            out.append({"p1": point["p1"], "p2": point["p2"], "reputation_threshold": int(threshold),
                        "honest_blacklisted": row["normal_ever_blacklisted"] / users,
                        "worst_attack": attack,
                        "worst_attack_blacklisted": row["adversarial_blacklisted_final_share"]})
    return pa.Table.from_pylist(out)


@dataclass
class Choice:
    p1: float
    p2: float
    reputation_threshold: int
    point: dict[str, Any]
    honest_blacklisted: float
    meets_blacklist_target: bool


def choose(points: pa.Table, blacklist: pa.Table, target_clean_reject: float,
           max_honest_blacklisted: float) -> Choice:
    """The operating point for a clean reject rate of at most ``target_clean_reject`` (module
    docstring); raises ValueError when no swept ``(p1, p2)`` reaches it."""
    rows = points.to_pylist()
    ok = [r for r in rows if r["clean_reject"] <= target_clean_reject + 1e-12]
    if not ok:
        low = min(rows, key=lambda r: r["clean_reject"])
        raise ValueError(f"no swept (p1, p2) has a clean reject rate <= {target_clean_reject:.3f}; the lowest is "
                         f"{low['clean_reject']:.3f} at p1={low['p1']:g}, p2={low['p2']:g}")
    best = min(ok, key=lambda r: (r["worst_wrong"], r["clean_reject"], -r["p1"], -r["p2"]))
    here = sorted((r for r in blacklist.to_pylist() if (r["p1"], r["p2"]) == (best["p1"], best["p2"])),
                  key=lambda r: r["reputation_threshold"])
    meeting = [r for r in here if r["honest_blacklisted"] <= max_honest_blacklisted]
    pick = meeting[0] if meeting else here[-1]
    return Choice(best["p1"], best["p2"], pick["reputation_threshold"], best, pick["honest_blacklisted"],
                  bool(meeting))


def config_yaml(choice: Choice, reputation: ReputationConfig, note: str) -> str:
    """The chosen thresholds as a config file (``thresholds:`` and ``reputation:`` sections)."""
    import yaml

    rep = reputation.model_copy(update={"threshold": choice.reputation_threshold,
                                        "cap": max(reputation.cap, choice.reputation_threshold)})
    body = {"thresholds": {"p1": choice.p1, "p2": choice.p2}, "reputation": rep.model_dump()}
    header = "".join(f"# {line}\n" for line in note.splitlines())
    return header + yaml.safe_dump(body, sort_keys=False)


def pareto(points: pa.Table) -> list[dict[str, Any]]:
    """The points no other point beats on both clean reject and worst wrong-accept, by clean reject
    (of equal points the one :func:`choose` would take: larger p1, then larger p2)."""
    rows = sorted(points.to_pylist(), key=lambda r: (r["clean_reject"], r["worst_wrong"], -r["p1"], -r["p2"]))
    front, best = [], float("inf")
    for r in rows:
        if r["worst_wrong"] < best - 1e-12:
            front.append(r)
            best = r["worst_wrong"]
    return front


def plot(points: pa.Table, attacks: Sequence[str], choice: Choice | None, path: str,
         default: tuple[float, float] = (0.10, 0.20)) -> None:
    """Clean reject rate against each attack's wrong-accept rate over the grid (PNG at ``path``)."""
    from matplotlib.figure import Figure

    from twostream import storage

    rows = points.to_pylist()
    figure = Figure(figsize=(9, 6), layout="constrained")
    axes = figure.subplots()
    x = np.array([r["clean_reject"] for r in rows])
    for k, attack in enumerate(attacks):
        axes.scatter(x, [r[f"wrong:{attack}"] for r in rows], s=12, alpha=0.5, color=f"C{k % 10}",
                     marker="o" if k < 10 else "^", label=attack)
    front = pareto(points)
    axes.plot([r["clean_reject"] for r in front], [r["worst_wrong"] for r in front], "k-",
              label="worst case, Pareto front")
    for (p1, p2), marker, label in ((default, "s", "default"),) + (
            (((choice.p1, choice.p2), "*", "chosen"),) if choice else ()):
        r = next((r for r in rows if (r["p1"], r["p2"]) == (p1, p2)), None)
        if r is not None:
            axes.scatter([r["clean_reject"]], [r["worst_wrong"]], s=160, marker=marker, facecolors="none",
                         edgecolors="black", label=f"{label} p1={p1:g}, p2={p2:g} (worst case)")
    axes.set(xlabel="clean in-scope reject rate", ylabel="attack wrong-accept rate",
             xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="Operating points over (p1, p2)")
    axes.legend(fontsize="small", loc="upper right")
    sink = io.BytesIO()
    figure.savefig(sink, format="png", dpi=110)
    storage.write_bytes(path, sink.getvalue())


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def markdown(points: pa.Table, blacklist: pa.Table, choice: Choice | None, attacks: Sequence[str],
             target: float | None) -> str:
    """The Pareto front with each point's honest-sender blacklisting, and the chosen point."""
    thresholds = sorted({r["reputation_threshold"] for r in blacklist.to_pylist()})
    listed = {(r["p1"], r["p2"], r["reputation_threshold"]): r["honest_blacklisted"] for r in blacklist.to_pylist()}
    lines = ["| p1 | p2 | clean reject | worst wrong-accept | attack | "
             + " | ".join(f"honest blacklisted (threshold {t})" for t in thresholds) + " |",
             "|---:|---:|---:|---:|---|" + "---:|" * len(thresholds)]
    for r in pareto(points):
        lines.append(f"| {r['p1']:g} | {r['p2']:g} | {_pct(r['clean_reject'])} | {_pct(r['worst_wrong'])} | "
                     f"{r['worst_attack']} | " + " | ".join(_pct(listed[(r['p1'], r['p2'], t)]) for t in thresholds)
                     + " |")
    if choice is not None:
        p = choice.point
        lines += ["", f"Chosen for a clean reject rate <= {_pct(target)}: **p1 = {choice.p1:g}, p2 = {choice.p2:g}, "
                  f"reputation threshold {choice.reputation_threshold}**: clean reject {_pct(p['clean_reject'])}, "
                  f"clean wrong {_pct(p['clean_wrong'])}, honest senders blacklisted "
                  f"{_pct(choice.honest_blacklisted)}"
                  + ("" if choice.meets_blacklist_target else " (no swept threshold meets the blacklist target)"),
                  "", "| attack | reject | wrong-accept |", "|---|---:|---:|"]
        lines += [f"| {a} | {_pct(p[f'reject:{a}'])} | {_pct(p[f'wrong:{a}'])} |" for a in attacks]
    return "\n".join(lines) + "\n"
