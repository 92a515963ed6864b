"""Idle Ray workers kept or stopped: the batch job (``benchmarks/scale.py``: small JPEGs in tar
shards, tiny random models, a fresh local Ray) under Ray's own policy and under the setting
``jobs.ray_cluster.connect`` starts a local Ray with, side by side in one run.

    python benchmarks/worker_churn.py --n 10000

Ray's policy (``RAY_num_workers_soft_limit=-1``) keeps as many idle workers as the node has CPUs
*free*; while the stream actors hold nearly all of them, a worker idle for a second is stopped and
the next decode or compare task starts a new process. ``connect`` keeps up to the node's CPU count
(``jobs.ray_cluster.node_env``). Prints, per setting, the worker processes started, images/s,
wall time, CPU seconds per process kind and in all, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.ray_cluster import WORKER_SOFT_LIMIT_VAR as VAR  # noqa: E402


def run(n: int, value: str | None, report: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (VAR, "RAY_ADDRESS")}
    if value is not None:
        env[VAR] = value
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n", str(n), "--report", str(report)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    figures = json.loads(report.read_text())
    return {"worker_processes_started": figures["worker_processes_started"],
            "images_per_s_end_to_end": figures["images_per_s_end_to_end"], "wall_s": figures["wall_s"]["total"],
            "cpu_s_total": round(sum(figures["cpu_s"].values()), 1), "cpu_s": figures["cpu_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ray_policy = run(args.n, "-1", Path(tmp) / "ray.json")
        ours = run(args.n, None, Path(tmp) / "ours.json")
    print(json.dumps({
        "images": args.n, "ray_policy": ray_policy, "connect": ours,
        "images_per_s_ratio_connect_over_ray": round(ours["images_per_s_end_to_end"] / ray_policy["images_per_s_end_to_end"], 2),
        "cpu_s_ratio_ray_over_connect": round(ray_policy["cpu_s_total"] / ours["cpu_s_total"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
