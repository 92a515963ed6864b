"""``twostream simulate``: the Fig. 5 simulation of users under Algorithm 2 (SPEC 5).

Verdicts come from an evaluation's per-image rows (``--rows``, written by ``twostream eval``
under ``<output>/rows/``) or from synthetic rejection rates (``--rate clean=0.13 --rate
fgsm=0.8``). Writes ``fig5.png``, ``fig5_curves.parquet``, ``fig5_summary.parquet`` and
``fig5_summary.md`` under ``--output`` and prints the summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

log = logging.getLogger(__name__)

ROW_COLUMNS = ("dataset", "attack", "truth", "verdict")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("simulate", help="simulate users under Algorithm 2 (the paper's Fig. 5)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rows", metavar="URI",
                        help="per-image evaluation Parquet (file or folder, local or s3://)")
    source.add_argument("--rate", action="append", metavar="NAME=P",
                        help="synthetic rejection rate instead of rows: clean=P plus one per attack (repeatable)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="with --rows: use only this dataset's rows (default: all rows together)")
    parser.add_argument("--normal-users", type=int, metavar="N", help="default 9000")
    parser.add_argument("--adversarial-users", type=int, metavar="N",
                        help="also the number of strategic users; default 1000")
    parser.add_argument("--images", type=int, metavar="N", help="images sent per user (rounds); default 30")
    parser.add_argument("--runs", type=int, metavar="N", help="default 5")
    parser.add_argument("--seed", type=int, metavar="N", help="default 0")
    parser.add_argument("--output", metavar="DIR", help="folder for the figure and tables (local or s3://)")
    add_config_args(parser)
    parser.set_defaults(run=run)


def parse_rate(spec: str) -> tuple[str, "np.ndarray"]:
    """``NAME=P`` -> (name, :func:`~twostream.evaluation.simulation.bernoulli_pool` of P)."""
    from twostream.evaluation.simulation import bernoulli_pool

    name, _, value = spec.partition("=")
    try:
        if name.strip():
            return name.strip(), bernoulli_pool(float(value))
    except ValueError as exc:
        raise ValueError(f"--rate {spec!r}: {exc}") from None
    raise ValueError(f"--rate {spec!r}: expected NAME=P")


def parse_rates(specs: list[str]) -> tuple["np.ndarray", dict[str, "np.ndarray"]]:
    """``NAME=P`` specs (``clean`` plus at least one attack) -> (clean pool, attack pools)."""
    pools = dict(parse_rate(spec) for spec in specs)
    if "clean" not in pools:
        raise ValueError("--rate clean=P is required (the normal users' rejection rate)")
    clean = pools.pop("clean")
    if not pools:
        raise ValueError("give at least one attack rate besides clean, e.g. --rate fgsm=0.8")
    return clean, pools


def read_rows(uri: str) -> "pa.Table":
    """The columns the simulation needs from a Parquet file or folder of evaluation rows."""
    import pyarrow.dataset as ds

    from twostream import storage

    files = storage.list_files(uri, suffixes=(".parquet",))
    if not files:
        raise ValueError(f"no .parquet files under {uri}")
    fs, _ = storage.filesystem(uri)
    dataset = ds.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
    missing = [c for c in ROW_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{uri}: rows lack column(s) {', '.join(missing)}")
    return dataset.to_table(columns=list(ROW_COLUMNS))


def run(args: argparse.Namespace) -> int:
    from twostream import storage
    from twostream.core.config import config_from_args
    from twostream.evaluation import simulation

    sizes = {"normal_users": args.normal_users, "adversarial_users": args.adversarial_users,
             "images_per_user": args.images, "runs": args.runs, "seed": args.seed}
    try:
        root = config_from_args(args, {"simulation": {k: v for k, v in sizes.items() if v is not None}})
        config, reputation = root.simulation, root.reputation
        if args.rows:
            clean, pools = simulation.pools_from_rows(read_rows(args.rows), args.dataset)
        elif args.dataset:
            raise ValueError("--dataset applies to --rows only")
        else:
            clean, pools = parse_rates(args.rate)
        curves, summary = simulation.simulate(clean, pools, config, reputation)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"twostream simulate: {exc}\n")
        return 2
    text = simulation.summary_markdown(summary, config, reputation)
    log.info("pools: clean %d images, %s", len(clean), ", ".join(f"{k} {len(v)}" for k, v in pools.items()))
    if args.output:
        files = {name: storage.join(args.output, name) for name in
                 ("fig5.png", "fig5_curves.parquet", "fig5_summary.parquet", "fig5_summary.md")}
        simulation.plot_fig5(curves, files["fig5.png"])
        storage.write_parquet(curves, files["fig5_curves.parquet"])
        storage.write_parquet(summary, files["fig5_summary.parquet"])
        storage.write_bytes(files["fig5_summary.md"], text.encode())
        text += "\n" + "\n".join(f"- {name}: {uri}" for name, uri in files.items()) + "\n"
    log.info("%s", text)
    sys.stdout.write(text)
    return 0
