"""What the GCS keeps per task: its private memory before and after N trivial tasks, on a fresh
local Ray with Ray's default cap on task records (100,000) and with the cap a local Ray gets from
``jobs.ray_cluster.connect`` (``GCS_TASK_EVENTS_ENV``), side by side in one run.

    python benchmarks/gcs_task_events.py --tasks 20000 60000

Each measurement runs in a child process of its own (a Ray per process); the GCS is found among
the child's descendants by its command line (``scale.private_mb``), its private memory is RssAnon.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("benchmarks.gcs_task_events")
CAP_VAR = "RAY_task_events_max_num_task_in_gcs"


def measure(tasks: int) -> dict:
    """In this process: start a local Ray as the job does, run ``tasks`` trivial tasks, and give
    the GCS's private memory before and after (after the workers' task records have been sent)."""
    import ray
    from scale import private_mb

    from jobs.ray_cluster import connect

    @ray.remote
    def noop(i: int) -> int:
        return i

    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.get([noop.remote(i) for i in range(200)])  # workers up
    time.sleep(5)
    before = private_mb(b"gcs_server")
    assert before, "no GCS process under this one"
    for start in range(0, tasks, 2000):
        ray.get([noop.remote(i) for i in range(start, min(start + 2000, tasks))])
    time.sleep(5)  # workers report task records every second
    after = private_mb(b"gcs_server")
    ray.shutdown()
    return {"cap": os.environ.get(CAP_VAR), "tasks": tasks, "gcs_private_before_mb": round(before, 1),
            "gcs_private_after_mb": round(after, 1), "kb_per_task": round((after - before) * 1024 / tasks, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[20000, 60000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from jobs.ray_cluster import GCS_TASK_EVENTS_ENV

    rows = []
    for tasks in args.tasks:
        for label, cap in (("Ray's default", "100000"), ("connect()'s cap", GCS_TASK_EVENTS_ENV[CAP_VAR])):
            env = {**os.environ, CAP_VAR: cap}
            out = subprocess.run([sys.executable, __file__, "--child", str(tasks)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            log.info("%-16s cap %6s, %6d tasks: GCS private %.1f -> %.1f MB, %.2f kB per task", label, cap, tasks,
                     row["gcs_private_before_mb"], row["gcs_private_after_mb"], row["kb_per_task"])
    for tasks in args.tasks:
        default, capped = (r for r in rows if r["tasks"] == tasks)
        growth = [r["gcs_private_after_mb"] - r["gcs_private_before_mb"] for r in (default, capped)]
        log.info("%d tasks: the GCS grew %.1f MB with Ray's default, %.1f MB capped (%.1fx less)", tasks,
                 growth[0], growth[1], growth[0] / max(growth[1], 0.1))


if __name__ == "__main__":
    main()
