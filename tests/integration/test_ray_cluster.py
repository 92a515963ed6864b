"""``jobs.ray_cluster.connect`` starting a local Ray with the settings docs/batch.md and the cluster
files give, a value the user set in the environment winning: the GCS's cap on task records (5,000,
not Ray's 100,000; the GCS's own environment read from /proc), and idle workers kept (a task
after a pause runs in the worker the one before used, where Ray's default starts a new process
when actors hold the node's CPUs). Each start runs in a child process (a Ray per process)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
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


SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"
PAUSED_TASKS = """
import os, time
import ray
from jobs.ray_cluster import connect

assert connect(num_cpus=2, include_dashboard=False, log_to_driver=False), "did not start or join Ray"

@ray.remote(num_cpus=1.75)  # like the stream actors: nearly all of the node's CPUs held
class Holder:
    def pid(self):
        return os.getpid()

@ray.remote(num_cpus=0.25)  # like a compare task
def pid():
    return os.getpid()

holder = Holder.remote()
ray.get(holder.pid.remote())
pids = []
for _ in range(3):
    pids.append(ray.get(pid.remote()))
    time.sleep(2.0)  # longer than Ray's 1 s before an idle worker may be stopped (checked every 0.2 s)
print(pids)
ray.shutdown()
"""


def _child(script: str, env_value: str | None, var: str) -> list:
    env = {k: v for k, v in os.environ.items() if k not in (var, "RAY_ADDRESS")}
    if env_value is not None:
        env[var] = env_value
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_local_ray_caps_gcs_task_records():
    assert _child(CHILD, None, CAP_VAR) == [f"{CAP_VAR}=5000"]
    assert _child(CHILD, "777", CAP_VAR) == [f"{CAP_VAR}=777"]


@pytest.mark.timing
def test_local_ray_reuses_idle_workers():
    assert len(set(_child(PAUSED_TASKS, None, SOFT_LIMIT_VAR))) == 1
    # Ray's own policy (-1: keep as many idle workers as CPUs are free, here none), which the
    # user chose: every task after a pause starts a new worker process.
    assert len(set(_child(PAUSED_TASKS, "-1", SOFT_LIMIT_VAR))) == 3


SERVE_CONSTANTS = """
from ray.serve._private import constants
print([constants.RAY_SERVE_ENABLE_HA_PROXY, constants.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S])
"""


@pytest.mark.parametrize("proxy, drain_s, want", [("haproxy", 2.5, [True, 2.5]), ("ray", 2.5, [False, 30.0])])
def test_serve_cluster_env_is_what_serve_reads(proxy, drain_s, want):
    """``serve_cluster_env``'s variables, as Ray Serve's own constants read them in a process that
    starts with them: HAProxy on, and ``serve.drain_s`` as the ingress draining period (Ray's 30 s
    default where the Python proxy runs, which has no such period)."""
    from jobs.ray_cluster import serve_cluster_env
    from twostream.core.config import ServeSettings

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(serve_cluster_env(ServeSettings(http_proxy=proxy, drain_s=drain_s)))
    done = subprocess.run([sys.executable, "-c", SERVE_CONSTANTS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == want
