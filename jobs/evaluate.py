"""The evaluation grid on Ray: ``python -m jobs.evaluate --dataset SPEC --output URI [--attack A ...]``.

Run it with ``ray job submit --working-dir . -- python -m jobs.evaluate ...`` on a cluster, or
through ``twostream eval`` (which starts a local Ray when none is running). Each (dataset,
attack) cell is one Ray task (``eval.num_cpus`` / ``eval.num_gpus`` each, retried when its worker
dies) running :func:`twostream.evaluation.runner.run_cell`; adversarial images are cached under
``<output>/adv`` and rows under ``<output>/rows``, so a second run recomputes the tables without
attacking again. Then Tables 1-2 (:mod:`twostream.evaluation.metrics`) are written as Parquet,
Markdown and HTML beside ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from twostream.core.config import ConfigError, TwoStreamConfig, add_config_args, load_config

if TYPE_CHECKING:  # the runner imports torch; keep `twostream --help` light
    from twostream.evaluation.runner import Cell

log = logging.getLogger("twostream.jobs.evaluate")


def load_eval_config(path: str | None, overrides: list[str], **settings: Any) -> TwoStreamConfig:
    """The config file, then the command line's ``eval.*`` settings, then ``--set`` overrides."""
    return load_config(path, overrides, {"eval": {k: v for k, v in settings.items() if v != []}})


def _cell_task(cell: Cell, config_json: str, output: str, threads: int) -> dict[str, Any]:
    import torch

    from twostream.evaluation.runner import run_cell

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    rows = run_cell(cell, TwoStreamConfig.model_validate_json(config_json), output)
    return {"dataset": rows.column("dataset")[0].as_py() if rows.num_rows else cell.dataset,
            "attack": cell.attack, "rows": rows.num_rows, "wall_s": round(time.perf_counter() - started, 1)}


def run_grid(config: TwoStreamConfig, output: str, progress: bool = True) -> dict[str, Any]:
    """Run every cell as a Ray task, then write the tables; returns the summary."""
    import ray
    from tqdm import tqdm

    from twostream import storage
    from twostream.evaluation import metrics
    from twostream.evaluation.runner import cells, read_rows

    grid = cells(config.eval)
    s = config.eval
    task = ray.remote(_cell_task).options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_retries=2,
                                          retry_exceptions=False)
    started = time.perf_counter()
    payload = config.model_dump_json()
    pending = {task.remote(c, payload, output, int(s.num_cpus)): c for c in grid}
    done: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    with tqdm(total=len(grid), desc="eval cells", unit="cell", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                done.append(ray.get(ready[0]))
            except Exception as exc:  # a cell that fails is reported, the others go on
                log.error("cell %s / %s failed: %s", cell.dataset, cell.attack, exc)
                failed.append({"dataset": cell.dataset, "attack": cell.attack, "error": str(exc)[-2000:]})
            bar.update(1)
    wall = time.perf_counter() - started
    meta = {
        "high model": f"{config.high.model} ({config.high.weights})",
        "low model": f"{config.low.model} ({config.low.weights})",
        "thresholds": f"p1={config.thresholds.p1}, p2={config.thresholds.p2}",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{int(ray.cluster_resources().get('GPU', 0))} GPUs",
        "grid wall time": f"{wall:.0f} s",
        "command": " ".join(sys.argv),
    }
    rows = read_rows(output)
    files = metrics.write_tables(rows, output, meta) if rows.num_rows else {}
    summary = {"cells": done, "failed": failed, "wall_s": round(wall, 1), "meta": meta,
               "config": json.loads(config.model_dump_json()), "files": files}
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_grid_args(parser)
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    return parser


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """The options ``jobs.evaluate`` and ``twostream eval`` share."""
    parser.add_argument("--dataset", action="append", default=[], metavar="SPEC",
                        help="[name=]kind:location, kind = folder | manifest | imagenet-sample (repeatable)")
    parser.add_argument("--attack", action="append", default=[], metavar="NAME",
                        help="attack to run (repeatable; default: all, see docs/evaluation.md)")
    parser.add_argument("--subset", type=int, help="in-scope images per dataset (seeded random subset)")
    parser.add_argument("--output", required=True, help="local folder or s3:// prefix")
    add_config_args(parser, "eval.attack_subset.t2-cw=32")
    parser.add_argument("--no-progress", action="store_true")


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{len(summary['cells'])} cells in {summary['wall_s']:.0f} s, {len(summary['failed'])} failed"]
    lines += [f"  FAILED {f['dataset']} / {f['attack']}: {f['error'].splitlines()[-1]}" for f in summary["failed"]]
    lines += [f"  {name}: {uri}" for name, uri in summary["files"].items()]
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace, prog: str) -> int:
    """Load the config from the shared options, run the grid on Ray (a local one when none is
    running or named), print the summary; the exit code of ``jobs.evaluate`` and ``twostream eval``."""
    import ray

    from jobs.ray_cluster import connect
    from twostream.evaluation.runner import cells

    try:
        config = load_eval_config(args.config, args.overrides, datasets=args.dataset,
                                  attacks=args.attack, subset=args.subset)
        cells(config.eval)
    except (ConfigError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    started_here = connect(args.address)
    try:
        summary = run_grid(config, args.output, progress=not args.no_progress)
    finally:
        if started_here:
            ray.shutdown()
    sys.stdout.write(format_summary(summary) + "\n")
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args, "jobs.evaluate")


if __name__ == "__main__":
    sys.exit(main())
