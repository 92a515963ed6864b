"""The Fig. 5 simulation (SPEC 5): users sending images to a server that applies Algorithm 2.

Each round every user sends one image; its verdict is drawn with replacement from a *pool* of
scored images (``True`` = rejected). Three groups per attack and run:

- ``normal`` users send clean images (the clean pool);
- ``adversarial`` users send images of the attack (that attack's pool);
- ``strategic`` users (as many as the adversarial ones) know Algorithm 2 and send an attack
  image only while they are off the blacklist and one more rejection cannot list them
  (``CC + step_up < threshold``); otherwise a clean image. They can follow their CC exactly:
  an answered image reveals its verdict, and a source leaves the list only at ``CC == 0``.
  Hence their attack images are always answered; the question is how many get a label.

Draw order, for attack number ``k`` (position in ``attack_pools``) of run ``r``: one generator
``np.random.default_rng([seed, r, k])`` then, each an index array of shape ``(rounds, users)``
drawn with ``rng.integers(0, len(pool), size=...)``: normal users from the clean pool,
adversarial users from the attack pool, strategic users from the attack pool, and strategic
users from the clean pool (both drawn; the strategy picks one per user and round).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.core.config import ReputationConfig, SimulationSettings
from twostream.core.labels import Verdict
from twostream.core.reputation import advance

GROUPS = ("normal", "adversarial", "strategic")


def bernoulli_pool(p: float) -> np.ndarray:
    """The smallest pool whose share of rejected flags is ``p`` (to 1/10,000): a Bernoulli(p) source."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a rejection rate must lie in [0, 1], got {p}")
    rate = Fraction(p).limit_denominator(10_000)
    return np.arange(rate.denominator) < rate.numerator


def pools_from_rows(rows: pa.Table, dataset: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rejected flags of in-scope scored rows: the ``clean`` attack's, and every other attack's.

    ``dataset`` keeps only that dataset's rows (None: all rows). Raises ValueError when the rows
    hold no clean images or no attack.
    """
    from twostream.evaluation.metrics import scored_mask

    mask = scored_mask(rows, in_scope=True)
    if dataset is not None:
        datasets = rows["dataset"].cast(pa.string())
        in_dataset = pc.equal(datasets, dataset).to_numpy(zero_copy_only=False)
        if not in_dataset.any():
            known = ", ".join(sorted(set(datasets.to_pylist()))) or "none"
            raise ValueError(f"no rows of dataset {dataset!r} (datasets in the rows: {known})")
        mask &= in_dataset
    keep = pa.array(mask)
    attacks = rows["attack"].cast(pa.string()).filter(keep).to_numpy(zero_copy_only=False)
    rejected = pc.equal(rows["verdict"], Verdict.ADVERSARIAL.value).filter(keep).to_numpy(zero_copy_only=False)
    pools = {name: rejected[attacks == name] for name in dict.fromkeys(attacks)}
    clean = pools.pop("clean", None)
    if clean is None:
        raise ValueError("the rows hold no in-scope images of attack 'clean' (the normal users' pool)")
    if not pools:
        raise ValueError("the rows hold no in-scope images of any attack besides 'clean'")
    return clean, pools


def _play(
    primary: np.ndarray, config: ReputationConfig, fallback: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replay ``(rounds, users)`` rejected flags through Algorithm 2, all users at once.

    Without ``fallback`` every user sends its ``primary`` image each round. With it, users are
    strategic: they send the primary (attack) image only while off the list with
    ``CC + step_up < threshold``, else the ``fallback`` (clean) one.
    Returns ``(listed, blocked, sent_primary)``, each ``(rounds, users)`` bool.
    """
    rounds, users = primary.shape
    cc = np.zeros(users, np.int64)
    listed = np.zeros(users, bool)
    history = np.zeros((3, rounds, users), bool)
    for r in range(rounds):
        sends = np.ones(users, bool) if fallback is None else ~listed & (cc + config.step_up < config.threshold)
        rejected = primary[r] if fallback is None else np.where(sends, primary[r], fallback[r])
        cc, listed, blocked = advance(cc, listed, rejected, config)
        history[:, r] = listed, blocked, sends
    return history[0], history[1], history[2]


def _curve(attack: str, run: int, group: str, listed: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of one (attack, run, group) curve from its ``(rounds, users)`` blacklist flags."""
    rounds = len(listed)
    return {
        "attack": np.full(rounds, attack, dtype=object),
        "run": np.full(rounds, run, np.int64),
        "group": np.full(rounds, group, dtype=object),
        "images_sent": np.arange(1, rounds + 1, dtype=np.int64),
        "blacklisted_share": listed.mean(axis=1),
        "ever_blacklisted": np.logical_or.accumulate(listed, axis=0).sum(axis=1).astype(np.int64),
    }


def _check_pools(clean_pool: np.ndarray, attack_pools: dict[str, np.ndarray]) -> None:
    if not attack_pools:
        raise ValueError("no attack pools to simulate")
    for name, pool in {"clean": clean_pool, **attack_pools}.items():
        if len(pool) == 0:
            raise ValueError(f"the pool of {name!r} is empty")


def _run(
    rng: np.random.Generator, clean_pool: np.ndarray, pool: np.ndarray, config: SimulationSettings,
    rep: ReputationConfig,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One run of one attack: each group's ``(rounds, users)`` blacklist flags, and its summary counts."""
    normal = (config.images_per_user, config.normal_users)
    adversarial = (config.images_per_user, config.adversarial_users)
    draws = [
        clean_pool[rng.integers(0, len(clean_pool), size=normal)],
        pool[rng.integers(0, len(pool), size=adversarial)],
        pool[rng.integers(0, len(pool), size=adversarial)],
        clean_pool[rng.integers(0, len(clean_pool), size=adversarial)],
    ]
    strategic, blocked, sent = _play(draws[2], rep, draws[3])
    listed = {"normal": _play(draws[0], rep)[0], "adversarial": _play(draws[1], rep)[0], "strategic": strategic}
    answered = sent & ~blocked
    stats = {
        "normal_ever_blacklisted": int(listed["normal"].any(axis=0).sum()),
        "adversarial_blacklisted_final_share": float(listed["adversarial"][-1].mean()),
        "strategic_blacklisted_final_share": float(strategic[-1].mean()),
        "strategic_adv_sent": int(sent.sum()),
        "answered": int(answered.sum()),
        "accepted": int((answered & ~draws[2]).sum()),
    }
    return listed, stats


def _summary_row(attack: str, stats: list[dict[str, float]]) -> dict[str, Any]:
    """Totals and means over runs of one attack's :func:`_run` counts."""
    def total(key: str) -> float:
        return sum(s[key] for s in stats)

    sent = total("strategic_adv_sent")
    return {
        "attack": attack,
        "normal_ever_blacklisted": total("normal_ever_blacklisted"),
        "adversarial_blacklisted_final_share": total("adversarial_blacklisted_final_share") / len(stats),
        "strategic_adv_sent": sent,
        "strategic_adv_answered_share": total("answered") / sent if sent else float("nan"),
        "strategic_adv_accepted_share": total("accepted") / sent if sent else float("nan"),
        "strategic_blacklisted_final_share": total("strategic_blacklisted_final_share") / len(stats),
    }


def simulate(
    clean_pool: np.ndarray,
    attack_pools: dict[str, np.ndarray],
    config: SimulationSettings,
    reputation: ReputationConfig = ReputationConfig(),
) -> tuple[pa.Table, pa.Table]:
    """Run the simulation for every attack and run (draw order: module docstring).

    Returns ``curves`` (``attack, run, group, images_sent, blacklisted_share, ever_blacklisted``;
    one row per images sent) and ``summary``, one row per attack: ``normal_ever_blacklisted``
    (total over runs), ``adversarial_blacklisted_final_share`` (mean over runs),
    ``strategic_adv_sent`` (total), ``strategic_adv_answered_share`` and
    ``strategic_adv_accepted_share`` (of those sent) and ``strategic_blacklisted_final_share``
    (mean over runs). Shares are NaN where the strategic users sent no attack image.
    """
    _check_pools(clean_pool, attack_pools)
    clean_pool = np.asarray(clean_pool, bool)
    curves: list[dict[str, np.ndarray]] = []
    summary: list[dict[str, Any]] = []
    for k, (attack, pool) in enumerate(attack_pools.items()):
        stats = []
        for run in range(config.runs):
            rng = np.random.default_rng([config.seed, run, k])
            listed, counts = _run(rng, clean_pool, np.asarray(pool, bool), config, reputation)
            curves += [_curve(attack, run, group, listed[group]) for group in GROUPS]
            stats.append(counts)
        summary.append(_summary_row(attack, stats))
    columns = {name: np.concatenate([c[name] for c in curves]) for name in curves[0]}
    return pa.table(columns), pa.Table.from_pylist(summary)


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def summary_markdown(summary: pa.Table, config: SimulationSettings, rep: ReputationConfig) -> str:
    """A one-screen Markdown summary of :func:`simulate`'s ``summary`` table."""
    lines = [
        f"# Fig. 5 simulation: {config.normal_users:,} normal, {config.adversarial_users:,} adversarial "
        f"and {config.adversarial_users:,} strategic users, {config.images_per_user} images each, "
        f"{config.runs} runs (seed {config.seed}); threshold {rep.threshold}, cap {rep.cap}, "
        f"steps +{rep.step_up}/-{rep.step_down}",
        "",
        "| attack | normal users ever blacklisted (all runs) | adversarial blacklisted at the end "
        "| strategic: attack images sent | answered | accepted (labelled) | strategic blacklisted at the end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary.to_pylist():
        cells = [
            row["attack"], f"{row['normal_ever_blacklisted']:,}", _percent(row["adversarial_blacklisted_final_share"]),
            f"{row['strategic_adv_sent']:,}", _percent(row["strategic_adv_answered_share"]),
            _percent(row["strategic_adv_accepted_share"]), _percent(row["strategic_blacklisted_final_share"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fig5(curves: pa.Table, path: str) -> None:
    """Fig. 5 as PNG at ``path`` (local or s3://): share blacklisted against images sent.

    Left, as in the paper: one line per attack for its adversarial users, and the normal users
    (every attack's normal users pooled: they all send clean images). Right: the strategic
    adversary per attack. Lines are means over runs, bands the min-max over runs.
    """
    import io

    from matplotlib.figure import Figure

    from twostream import storage

    data = {name: curves[name].to_numpy(zero_copy_only=False) for name in curves.column_names}
    attacks = list(dict.fromkeys(data["attack"]))
    figure = Figure(figsize=(14, 6), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)

    def draw(axes, keep: np.ndarray, label: str, colour: str, style: str = "-") -> None:
        keep = keep[np.lexsort((data["images_sent"][keep], data["run"][keep], data["attack"][keep]))]
        x = np.unique(data["images_sent"][keep])
        share = data["blacklisted_share"][keep].reshape(-1, len(x))  # (attacks x runs, rounds)
        axes.plot(x, share.mean(axis=0), style, color=colour, label=label)
        axes.fill_between(x, share.min(axis=0), share.max(axis=0), color=colour, alpha=0.15, linewidth=0)

    for a, attack in enumerate(attacks):
        colour = f"C{a % 10}"
        style = "-" if a < 10 else "-."
        for axes, group in ((left, "adversarial"), (right, "strategic")):
            keep = np.flatnonzero((data["attack"] == attack) & (data["group"] == group))
            if len(keep):
                draw(axes, keep, attack, colour, style)
    normal = np.flatnonzero(data["group"] == "normal")
    if len(normal):
        draw(left, normal, "normal users (clean images)", "black", ":")
    left.set(xlabel="images sent per user", ylabel="share of users blacklisted", ylim=(-0.02, 1.02),
             title="adversarial users per attack, and normal users")
    right.set(xlabel="images sent per user", title="strategic adversary (interleaves clean images)")
    left.legend(loc="upper left", fontsize="small")
    right.legend(loc="upper left", fontsize="small")
    figure.suptitle("Fig. 5: users blacklisted by Algorithm 2 (mean over runs, min-max band)")
    sink = io.BytesIO()
    figure.savefig(sink, format="png", dpi=110)
    storage.write_bytes(path, sink.getvalue())
