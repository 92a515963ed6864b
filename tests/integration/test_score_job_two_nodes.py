"""The batch job on a local two-node Ray cluster: a head and a worker node started with
``ray start`` on this machine (own ports, temp dirs, node addresses and resources: the worker on
127.0.0.2), rows and sources equal to an independent in-process computation (Scorer + replay,
tests/integration/test_score_job.py), also when every process of the worker node is killed while scoring: Ray
retries the tasks and restarts the actors on the head; nothing lost, nothing duplicated.

Only the processes of the two nodes started here are stopped (found by their temp dirs), never
``ray stop``, which would also stop other tests' clusters."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import kill_ray_node, ray_start_node
from tests.integration.test_score_job import SMALL, check_output, expected, make_dataset

pytestmark = [pytest.mark.ray, pytest.mark.own_process, pytest.mark.timeout(900)]

# Fits on the head alone (2 CPUs) once the worker node is gone: 2 + 2 stream actors at 0.25 CPU,
# decode 0.5, compare 0.25; pools of 2 so that Ray Data spreads them over both nodes.
OVERRIDES = SMALL + [
    "limits.max_bytes=4000", "high.pool_size=2", "low.pool_size=2", "high.num_cpus=0.25",
    "low.num_cpus=0.25", "job.decode_num_cpus=0.5", "job.compare_num_cpus=0.25", "high.batch_size=2",
    "low.batch_size=2", "job.files_per_shard=2",
]


STORE = ["--object-store-memory", str(300 << 20)]


def _free_port() -> int:
    from twostream.storage.local_s3 import free_port

    return free_port()


@pytest.fixture(scope="module")
def two_nodes():
    """A head (127.0.0.1, 2 CPUs, {"head_node": 1}) and a worker node (127.0.0.2, 2 CPUs,
    {"worker_node": 1}); their processes are killed at the end, by temp dir."""
    head_tmp, worker_tmp = tempfile.mkdtemp(prefix="rh"), tempfile.mkdtemp(prefix="rw")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    port = _free_port()
    try:
        ray_start_node(["--head", "--port", str(port), "--num-cpus", "2", "--resources", '{"head_node": 1}',
                        "--include-dashboard", "false", "--ray-client-server-port", str(_free_port()),
                        *STORE], head_tmp, env)
        ray_start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2",
                        "--resources", '{"worker_node": 1}', *STORE], worker_tmp, env, ip="127.0.0.2")
        yield {"address": f"127.0.0.1:{port}", "worker_tmp": worker_tmp}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for temp in (worker_tmp, head_tmp):
            kill_ray_node(temp)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    truth, manifest = make_dataset(root)
    by_id, ledger = expected(truth, OVERRIDES)
    return {"root": root, "manifest": manifest, "by_id": by_id, "ledger": ledger}


def _connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, _node_ip_address="127.0.0.1",  # the driver's raylet: the head's
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})


def _worker_has_stream_actors(worker_tmp: str, since: float = 0.0) -> bool:
    """A stream actor lives (or lived) on the worker node, written to its log after ``since``."""
    logs = Path(worker_tmp, "session_latest", "logs")
    return any(b"StreamStage" in p.read_bytes() for p in logs.glob("worker-*.out")
               if p.is_file() and p.stat().st_mtime >= since)


def _run(cluster: dict, data: dict, output: Path) -> dict:
    from jobs.score import run_job
    from twostream.core.config import load_config

    _connect(cluster["address"])
    return run_job(load_config(None, OVERRIDES), str(data["root"] / "in"), str(output),
                   str(data["manifest"]), progress=False)


def test_two_nodes_then_worker_killed_while_scoring(two_nodes, data, tmp_path):
    import ray

    _connect(two_nodes["address"])
    nodes = [n for n in ray.nodes() if n["Alive"]]
    # Ray resolves the head's 127.0.0.1 to the machine's address; the worker keeps 127.0.0.2
    assert len(nodes) == 2 and "127.0.0.2" in {n["NodeManagerAddress"] for n in nodes}
    assert ray.cluster_resources().get("worker_node") == 1 and ray.cluster_resources()["CPU"] == 4

    summary = _run(two_nodes, data, tmp_path / "both")
    assert summary["counts_add_up"]
    assert _worker_has_stream_actors(two_nodes["worker_tmp"]), "work ran on the worker node"
    check_output(tmp_path / "both", data["by_id"], data["ledger"])

    # again, and kill the worker node once its actors score and shards are being committed
    out = tmp_path / "killed"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=_run(two_nodes, data, out)), daemon=True)
    started, since = time.monotonic(), time.time()
    job.start()
    killed = None
    while job.is_alive() and time.monotonic() - started < 300:
        done = list((out / "_progress").glob("*.done")) if (out / "_progress").exists() else []
        if done and _worker_has_stream_actors(two_nodes["worker_tmp"], since):
            killed = (len(done), kill_ray_node(two_nodes["worker_tmp"]))
            break
        time.sleep(0.2)
    job.join(timeout=600)
    assert killed is not None and killed[1] > 0, "the worker node was killed while the job ran"
    assert "summary" in result, "the job finished after losing the worker node"
    assert killed[0] < result["summary"]["shards"]["total"], "killed before scoring ended"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    check_output(out, data["by_id"], data["ledger"])
