"""``twostream cluster up|down|status``: a local Ray head plus the local S3 server.

``up`` starts moto_server on 127.0.0.1 (default port 9010) and ``ray start --head`` with the
AWS endpoint variables and the batch job's Ray settings (``jobs.ray_cluster.node_env``: the GCS's
cap on task records, idle workers kept) exported, so that ``ray job submit --working-dir . -- python -m
jobs.score ...`` reads ``s3://`` from it; ``down`` stops both. cluster/local.sh does the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="start/stop a local Ray head and the local S3 server")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--s3-port", type=int, default=9010)
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    parser.set_defaults(run=run)


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def run(args: argparse.Namespace) -> int:
    from jobs.ray_cluster import node_env
    from twostream.storage import local_s3 as localstore

    if args.action == "up":
        info = localstore.daemon_start(args.s3_port)
        env = {**node_env(args.num_cpus), **os.environ, **localstore.env_for(info["endpoint"])}
        cmd = [_ray(), "start", "--head", "--port", str(args.ray_port), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(args.dashboard_port), "--disable-usage-stats"]
        if args.num_cpus:
            cmd += ["--num-cpus", str(args.num_cpus)]
        subprocess.run(cmd, check=True, env=env)
        print(json.dumps({"s3": info["endpoint"], "ray": f"127.0.0.1:{args.ray_port}",
                          "dashboard": f"http://127.0.0.1:{args.dashboard_port}"}))
        print("export " + " ".join(f"{k}={v}" for k, v in localstore.env_for(info["endpoint"]).items()))
        return 0
    if args.action == "down":
        subprocess.run([_ray(), "stop"], check=False)
        print("local S3:", "stopped" if localstore.daemon_stop() else "not running")
        return 0
    info = localstore.daemon_status()
    print("local S3:", json.dumps(info) if info else "not running")
    return subprocess.run([_ray(), "status"], check=False).returncode
