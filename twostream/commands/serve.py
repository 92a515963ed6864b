"""``twostream serve``: run the online endpoint (Ray Serve) until interrupted. See docs/serve.md."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twostream.core.config import TwoStreamConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser(
        "serve",
        help="run the online endpoint (Ray Serve, HTTP)",
        description=(
            "Start Ray Serve with the twostream application: POST /v1/classify, "
            "GET /v1/sources[/{id}], POST /v1/sources/{id}/reset (admin), /healthz, /metrics. "
            "Settings are the config's serve: section (e.g. --set serve.port=8000). The reputation "
            "state is in Redis: serve.redis_url, else an embedded redis-server (append-only file in "
            "serve.redis_dir, default ~/.cache/twostream/redis) started here and stopped on exit. "
            "Ctrl-C or SIGTERM shuts it down."
        ),
    )
    parser.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port, 8000)")
    parser.add_argument(
        "--address",
        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of a locally started Ray")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    parser.add_argument(
        "--print-cluster-env", action="store_true",
        help="print the environment a Ray cluster must be started with for these serve.* settings "
             "(HAProxy and its hardening; `export` lines for `ray start`) and exit",
    )
    add_config_args(parser)
    parser.set_defaults(run=run)


def _print_config(config: TwoStreamConfig) -> None:
    """``--print-config``: the resolved config as JSON, the admin token and Redis password hidden."""
    import json

    shown = config.model_dump(mode="json")
    if shown["serve"]["admin_token"]:
        shown["serve"]["admin_token"] = "***"
    if shown["serve"]["redis_url"]:
        from twostream.online.redis_store import redact

        shown["serve"]["redis_url"] = redact(shown["serve"]["redis_url"])
    print(json.dumps(shown, indent=2))


def _print_cluster_env(config: TwoStreamConfig) -> None:
    """``--print-cluster-env``: ``export`` lines of the environment ``ray start`` needs for ``serve.*``."""
    import shlex

    from jobs.ray_cluster import serve_cluster_env

    for key, value in serve_cluster_env(config.serve).items():
        print(f"export {key}={shlex.quote(value)}")


def run(args: argparse.Namespace) -> int:
    from twostream.core.config import config_from_args

    config = config_from_args(args, {"serve": {"host": args.host, "port": args.port}})
    if args.print_config:
        _print_config(config)
        return 0
    if args.print_cluster_env:
        _print_cluster_env(config)
        return 0

    import ray
    from ray import serve

    from jobs.ray_cluster import connect, serve_cluster_env, serve_http_options
    from jobs.serve import build_app
    from twostream.online.redis_server import EmbeddedRedis
    from twostream.online.redis_store import redact

    settings = config.serve
    # SIGINT and SIGTERM are ours from the start, whatever this process inherited: a shell starts a
    # background job with SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt).
    # During startup a signal aborts it as Ctrl-C does; once serving, it ends the wait below.
    # Either way it is recorded first: were the exception caught inside a library, the endpoint
    # still stops as soon as that startup step returns.
    stop = threading.Event()
    starting = [True]

    def on_signal(signum: int, _frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if starting[0] and first:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    embedded = None
    started = False
    ray_before = ray.is_initialized()  # a caller's Ray (in-process) is left running
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings.redis_dir, appendfsync=settings.redis_appendfsync)
            settings.redis_url = embedded.start()
            print(f"reputation state: embedded redis-server at {settings.redis_url} (append-only file in "
                  f"{embedded.directory}, appendfsync {settings.redis_appendfsync})", flush=True)
        else:
            print(f"reputation state: {redact(settings.redis_url)}", flush=True)
        started = connect(args.address, num_cpus=args.num_cpus, cluster_env=serve_cluster_env(settings))
        serve.start(http_options=serve_http_options(settings))
        serve.run(build_app(config), name=settings.app_name, route_prefix=settings.route_prefix)
        starting[0] = False
        if not stop.is_set():
            url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
            token = "configured" if settings.resolved_admin_token() else "disabled (no token)"
            print(f"twostream serving at {url}  (POST {url}/v1/classify; docs {url}/docs; admin {token}; "
                  f"topology {settings.topology}; HTTP proxy {settings.http_proxy})", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass  # a signal during startup: shut down what was started
    finally:
        starting[0] = False
        draining = started and settings.http_proxy == "haproxy"  # a joined cluster drains as it was started
        print("shutting down" + (f": the ingress replicas stay reachable for serve.drain_s={settings.drain_s:g} s "
                                 "first" if draining else ""), file=sys.stderr, flush=True)
        try:
            if ray.is_initialized():  # also when a signal broke off connect() midway
                serve.shutdown()
                if not ray_before:
                    ray.shutdown()
        finally:
            if embedded is not None:
                embedded.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0
