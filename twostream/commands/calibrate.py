"""``twostream calibrate``: operating points of the comparator and of Algorithm 2 from scored rows.

Reads the per-image rows of ``twostream eval`` (``<output>/rows``: clean and attacked images),
recomputes the verdicts over a grid of ``p1`` x ``p2`` and simulates honest senders under a range
of reputation thresholds (:mod:`twostream.evaluation.calibration`). Writes under ``--output``:
``calibration.parquet`` (every ``(p1, p2, attack)``), ``operating_points.parquet``,
``blacklisting.parquet``, ``calibration.png``, ``calibration.md`` and, with
``--target-clean-reject``, ``thresholds.yaml`` (``thresholds:`` and ``reputation:`` sections, for
``--config``). Exit code 1 when no swept point meets the target (the sweep is still written).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args
    from twostream.evaluation.calibration import P1_GRID, P2_GRID, REPUTATION_GRID

    def grid(values) -> str:
        return ",".join(f"{v:g}" for v in values)

    parser = subparsers.add_parser("calibrate", help="sweep p1, p2 and the reputation threshold over scored rows",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, metavar="URI",
                        help="per-image evaluation Parquet (file or folder, e.g. out/eval/rows)")
    parser.add_argument("--dataset", metavar="NAME", help="only this dataset's rows (default: all)")
    parser.add_argument("--attack", action="append", metavar="NAME",
                        help="attacks the worst case is taken over (repeatable; default: every attack in the rows)")
    parser.add_argument("--p1", type=_floats, default=list(P1_GRID), metavar="LIST",
                        help=f"H-Net thresholds to sweep; default {grid(P1_GRID)}")
    parser.add_argument("--p2", type=_floats, default=list(P2_GRID), metavar="LIST",
                        help=f"L-Net thresholds to sweep; default {grid(P2_GRID)}")
    parser.add_argument("--reputation-threshold", type=_ints, default=list(REPUTATION_GRID), metavar="LIST",
                        help=f"Algorithm 2 thresholds to sweep; default {grid(REPUTATION_GRID)}")
    parser.add_argument("--target-clean-reject", type=float, metavar="RATE",
                        help="choose the thresholds for a clean reject rate <= RATE and write thresholds.yaml")
    parser.add_argument("--max-honest-blacklisted", type=float, default=0.05, metavar="SHARE",
                        help="the reputation threshold chosen is the smallest listing at most this share of "
                             "honest senders in the Fig. 5 setting; default 0.05")
    parser.add_argument("--runs", type=int, metavar="N", help="simulation runs per point (default: simulation.runs)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the outputs (local or s3://)")
    add_config_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from twostream import storage
    from twostream.core.config import config_from_args
    from twostream.evaluation import calibration as cal

    try:
        root = config_from_args(args, {"simulation": {"runs": args.runs}})
        uris = storage.list_files(args.rows, (".parquet",))
        if not uris:
            raise ValueError(f"no .parquet files under {args.rows}")
        table = pa.concat_tables([storage.read_parquet(u).replace_schema_metadata(None) for u in uris])
        rows = cal.ScoredRows.from_table(table, args.dataset)
        attacks = args.attack or [a for a in rows.attacks if a != "clean"]
        sweep = cal.sweep(rows, args.p1, args.p2)
        points = cal.operating_points(sweep, attacks)
        counts = {a: int((rows.attack == a).sum()) for a in rows.attacks}
        blacklist = cal.blacklisting(points, counts["clean"], counts, args.reputation_threshold,
                                     root.simulation, root.reputation)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"twostream calibrate: {exc}\n")
        return 2
    choice, missed = None, None
    if args.target_clean_reject is not None:
        try:
            choice = cal.choose(points, blacklist, args.target_clean_reject, args.max_honest_blacklisted)
        except ValueError as exc:  # the sweep is still written; no thresholds.yaml
            missed = str(exc)
    files = {name: storage.join(args.output, name) for name in
             ("calibration.parquet", "operating_points.parquet", "blacklisting.parquet", "calibration.png",
              "calibration.md")}
    storage.write_parquet(sweep, files["calibration.parquet"])
    storage.write_parquet(points, files["operating_points.parquet"])
    storage.write_parquet(blacklist, files["blacklisting.parquet"])
    cal.plot(points, attacks, choice, files["calibration.png"], (root.thresholds.p1, root.thresholds.p2))
    text = cal.markdown(points, blacklist, choice, attacks, args.target_clean_reject)
    if choice is not None:
        files["thresholds.yaml"] = storage.join(args.output, "thresholds.yaml")
        note = (f"twostream calibrate: clean reject <= {args.target_clean_reject:g} on {args.rows}; clean reject "
                f"{choice.point['clean_reject']:.4f}, worst wrong-accept {choice.point['worst_wrong']:.4f} "
                f"({choice.point['worst_attack']}), honest senders blacklisted {choice.honest_blacklisted:.4f}")
        storage.write_bytes(files["thresholds.yaml"], cal.config_yaml(choice, root.reputation, note).encode())
    if missed:
        text += f"\nTarget not met: {missed}.\n"
    storage.write_bytes(files["calibration.md"], text.encode())
    sys.stdout.write(text + "\n" + "\n".join(f"- {name}: {uri}" for name, uri in files.items()) + "\n")
    if missed:
        sys.stderr.write(f"twostream calibrate: {missed}\n")
        return 1
    return 0
