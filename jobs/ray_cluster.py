"""The one helper that connects to a Ray cluster or starts a local one."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

log = logging.getLogger("twostream.jobs")
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env_prefixes: tuple[str, ...] = ("AWS_", "TWOSTREAM_"),
    **init_kwargs: Any,
) -> bool:
    """Connect to ``address`` (else ``$RAY_ADDRESS``), or start a local Ray when neither is set.

    Environment variables with one of ``env_prefixes`` (S3 endpoint and credentials, twostream
    settings) travel to the workers in the runtime environment. A process already connected is
    left as it is. Returns True when this call started or joined Ray (the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
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
