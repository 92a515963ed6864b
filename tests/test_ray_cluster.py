"""``jobs.ray_cluster.connect`` starting a local Ray: its GCS runs with the cap on task records
that docs/batch.md and the cluster files give (5,000, not Ray's 100,000), and a value the user set
in the environment wins. Each start runs in a child process (a Ray per process); the GCS's own
environment is read from /proc."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
CAP_VAR = "RAY_task_events_max_num_task_in_gcs"
CHILD = """
import ray
from ray._private import ray_constants
from jobs.ray_cluster import connect

assert connect(num_cpus=1, include_dashboard=False, log_to_driver=False), "did not start or join Ray"
gcs = ray._private.worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_GCS_SERVER)
assert gcs, "joined a running Ray instead of starting one"
environ = open(f"/proc/{gcs[0].process.pid}/environ", "rb").read().split(b"\\0")
print([v.decode() for v in environ if v.startswith(b"RAY_task_events_max_num_task_in_gcs=")])
ray.shutdown()
"""


def _gcs_setting(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in (CAP_VAR, "RAY_ADDRESS")}
    if env_value is not None:
        env[CAP_VAR] = env_value
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_local_ray_caps_gcs_task_records():
    assert _gcs_setting(None) == [f"{CAP_VAR}=5000"]
    assert _gcs_setting("777") == [f"{CAP_VAR}=777"]
