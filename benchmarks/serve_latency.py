"""Latency and throughput of the Serve endpoint over loopback HTTP: fused vs split topology,
batched vs unbatched, against the bare forward.

    python benchmarks/serve_latency.py                 # default models (CPU: several minutes)
    python benchmarks/serve_latency.py --small         # tiny random-init models, quick
    python benchmarks/serve_latency.py --topologies fused --clients 1 8 --set serve.max_batch_size=8
    python benchmarks/serve_latency.py --detector      # p50 at 1 client, query detector on vs off

Prints, for each topology (``serve.topology``), batching (``serve.max_batch_size`` as configured,
and 1) and number of concurrent clients (1, 8, 32), p50/p95/p99 latency and requests/s; and
the model-only forward time of both streams in-process (high + low, batch of 1, resized input,
the same torch thread count as the replicas) for comparison, taken before each single-client
request so that both see the same machine state. Each client is one keep-alive ``http.client``
connection, about as light as curl (``requests`` would add some 1.2 ms a call on this machine,
most of what is left of the HTTP path). The reputation state is in an embedded
redis-server (``appendfsync everysec``, the default) in a temporary directory. Bounded:
``--requests`` per scenario and ``--max-seconds`` per scenario; loopback (127.0.0.1) only.

``--detector``: the query detector's cost instead. Two fused applications side by side on the
same Redis, ``detector.enabled`` true (``/on``) and false (``/off``); one client sends
``--repeats`` rounds of ``--requests`` distinct photographs (the ``imagenet-sample`` JPEGs, then
crops of them of new sizes; crops of the sample where there are none), each to both back to
back, which first alternating, so that both see the same machine state; prints p50/p95 of each,
the difference of the medians with a 95% bootstrap interval over the photographs (pairs kept
together), the difference per round, and the replica's detector stage.

    python benchmarks/serve_latency.py --detector --requests 400 --repeats 5
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample_jpeg() -> bytes:
    from PIL import Image

    try:
        from skimage import data as skdata

        pixels = skdata.chelsea()  # 451x300 photograph of a cat
    except Exception:
        rng = np.random.default_rng(0)
        pixels = np.clip(rng.normal(128, 40, (300, 451, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distinct_jpegs(n: int) -> list[bytes]:
    """``n`` distinct photographs as JPEG: the ``imagenet-sample`` files, then crops of them one
    pixel smaller per round (a geometry of their own, so no near-duplicate of another request for
    the detector), re-encoded at quality 90; crops of the sample where there are no photographs."""
    from PIL import Image

    assets = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample"
    paths = sorted(assets.glob("*.JPEG")) if assets.is_dir() else []
    out = [p.read_bytes() for p in paths[:n]]
    if len(out) == n:
        return out
    if paths:
        photos = []
        for path in paths:
            with Image.open(path) as im:
                photos.append(np.asarray(im.convert("RGB")))
    else:
        with Image.open(io.BytesIO(sample_jpeg())) as im:
            photos = [np.asarray(im.convert("RGB"))]
    for k in range(len(out), n):
        photo, shrink = photos[k % len(photos)], 1 + k // len(photos)
        buf = io.BytesIO()
        Image.fromarray(photo[: photo.shape[0] - shrink, : photo.shape[1] - shrink]).save(buf, format="JPEG",
                                                                                      quality=90)
        out.append(buf.getvalue())
    return out


def paired_interval(on: np.ndarray, off: np.ndarray, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(on) - median(off), resampling the pairs (each
    photograph's on and off requests, sent back to back, stay together)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(on), (resamples, len(on)))
    diffs = np.median(on[picks], axis=1) - np.median(off[picks], axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def detector_cost(config, port: int, requests_total: int, warmup: int, repeats: int) -> dict:
    """Latency at 1 client of the fused app with the query detector on and off, side by side:
    ``repeats`` rounds of ``requests_total`` distinct photographs, each sent to both apps back to
    back (which first alternates), so that both see the same machine state. A pair with a request
    that failed or was not answered 200 is left out of the figures and counted in ``statuses``."""
    from ray import serve

    from jobs.serve import build_app

    routes = {}
    for name, enabled in (("on", True), ("off", False)):
        cfg = config.model_copy(deep=True)
        cfg.detector.enabled = enabled
        cfg.serve.topology = "fused"
        serve.run(build_app(cfg), name=f"detector-{name}", route_prefix=f"/{name}")
        routes[name] = f"/{name}/v1/classify"
    images = distinct_jpegs(warmup + repeats * requests_total)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    stage: list[float] = []
    statuses: dict[str, int] = {}
    for k, image in enumerate(images):
        pair: dict[str, float] = {}
        for name in (("on", "off") if k % 2 == 0 else ("off", "on")):
            t0 = time.perf_counter()
            try:
                connection.request("POST", routes[name], body=image,
                                   headers={"Content-Type": "image/jpeg", "X-Source-Id": f"bench-{k}"})
                answer = connection.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException) as exc:  # counted; the pair is left out; a new connection
                connection.close()
                kind = f"{name} {type(exc).__name__}"
                statuses[kind] = statuses.get(kind, 0) + 1
                continue
            elapsed = time.perf_counter() - t0
            kind = f"{name} {answer.status} {json.loads(body).get('response', '') if answer.status == 200 else ''}"
            statuses[kind] = statuses.get(kind, 0) + 1
            if answer.status == 200:
                pair[name] = elapsed * 1e3
                if name == "on" and k >= warmup:
                    stage.append(json.loads(body)["timings_ms"]["detector"])
        if k >= warmup and len(pair) == 2:
            for name, ms in pair.items():
                latencies[name].append(ms)
    connection.close()
    for name in routes:
        serve.delete(f"detector-{name}")
    on, off = np.asarray(latencies["on"]), np.asarray(latencies["off"])
    rounds = [float(np.median(on[part]) - np.median(off[part]))
              for part in np.array_split(np.arange(len(on)), repeats)]
    return {"on": percentiles(on / 1e3), "off": percentiles(off / 1e3),
            "p50_difference_ms": float(np.median(on) - np.median(off)),
            "p50_difference_interval_ms": paired_interval(on, off),
            "median_paired_difference_ms": float(np.median(on - off)),
            "p50_difference_per_round_ms": rounds,
            "detector_stage_p50_ms": float(np.median(stage)) if stage else float("nan"),
            "requests": len(on), "repeats": repeats, "statuses": statuses}


def percentiles(latencies: list[float]) -> dict[str, float]:
    arr = np.asarray(latencies) * 1e3
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}


class BareForward:
    """Model-only forward of both streams in this process (high + low, batch 1, resized input,
    the same torch thread count as each stream replica); calling it runs once and returns ms."""

    def __init__(self, config, image: bytes) -> None:
        import torch

        from twostream.core.models import build_stream
        from twostream.core.preprocess import decode_image
        from twostream.core.scoring import prepare

        self.threads = config.high.threads or 1
        torch.set_num_threads(self.threads)
        self.high = build_stream(config.high, "high").eval()
        self.low = build_stream(config.low, "low").eval()
        pixels = decode_image(image, config.limits)
        self.xh, self.xl = prepare(self.high, [pixels]), prepare(self.low, [pixels])
        for _ in range(3):
            self()

    def __call__(self) -> float:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            self.high(self.xh)
            self.low(self.xl)
            return (time.perf_counter() - t0) * 1e3


def drive(
    url: str, image: bytes, clients: int, requests_total: int, max_seconds: float, bare: BareForward | None = None
) -> dict:
    """``clients`` threads with keep-alive sessions send ``requests_total`` requests in all.

    With ``bare`` (one client only) each request is preceded by one bare forward in this
    process, so that both figures are taken under the same machine state: on a shared VM the
    CPU speed drifts by tens of percent within minutes, which unpaired runs mistake for overhead.
    """
    assert bare is None or clients == 1
    parts = urlsplit(url)

    latencies: list[float] = []
    bare_ms: list[float] = []
    server_ms: list[dict] = []  # the replica's own timings_ms (total: the rest is Serve's path)
    statuses: dict[int | str, int] = {}  # HTTP status, or the exception of a request without an answer
    lock = threading.Lock()
    remaining = [requests_total]
    deadline = time.monotonic() + max_seconds
    start = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        # http.client on one keep-alive connection: the client's own cost stays out of the figure
        # (requests adds about 1.2 ms a call on this machine, a third of the HTTP path).
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        headers = {"Content-Type": "image/jpeg", "X-Source-Id": f"bench-{k}"}
        start.wait()
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            if bare is not None:
                bare_ms.append(bare())
            t0 = time.perf_counter()
            try:
                connection.request("POST", parts.path, body=image, headers=headers)
                answer = connection.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException) as exc:  # counted by kind, then a new connection
                connection.close()
                with lock:
                    statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                continue
            elapsed = time.perf_counter() - t0
            timings = json.loads(body).get("timings_ms") if answer.status in (200, 403) else None
            with lock:
                latencies.append(elapsed)
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                if timings:
                    server_ms.append(timings)
        connection.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        **({"bare_forward_ms": float(np.median(bare_ms))} if bare_ms else {}),
        **({"replica_p50_ms": float(np.median([t["total"] for t in server_ms])),
            "replica_stage_p50_ms": {k: round(float(np.median([t[k] for t in server_ms])), 2) for k in server_ms[0]}}
           if server_ms else {}),
        "statuses": statuses,
        "rps": len(latencies) / wall if wall > 0 else 0.0,
        **percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario (after warm-up)")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up requests per deployment")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    parser.add_argument("--topologies", nargs="+", default=["fused", "split"], choices=["fused", "split"])
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap per scenario")
    parser.add_argument("--small", action="store_true", help="tiny random-init models (resnet10t, cifar_resnet20)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--detector", action="store_true", help="the query detector on vs off instead")
    parser.add_argument("--repeats", type=int, default=5, help="--detector: rounds of --requests photographs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from jobs.ray_cluster import connect, serve_cluster_env
    from jobs.serve import build_app
    from twostream.core.config import load_config
    from twostream.online.redis_server import EmbeddedRedis

    base = ["high.threads=1", "low.threads=1", "high.num_cpus=1", "low.num_cpus=1", "high.device=cpu", "low.device=cpu",
            "serve.answer_detail=full"]  # the replica's timings are in the full answer
    if args.small:
        base += ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random"]
    port = free_port()
    config = load_config(None, base + [f"serve.port={port}"] + args.overrides)
    batch = config.serve.max_batch_size
    image = sample_jpeg()
    print(f"models: high={config.high.model} ({config.high.weights}), low={config.low.model} ({config.low.weights}); "
          f"image {len(image)} bytes JPEG; torch threads {config.high.threads}; HTTP proxy {config.serve.http_proxy}",
          flush=True)

    if args.detector:
        with tempfile.TemporaryDirectory() as state, EmbeddedRedis(state) as redis:
            config.serve.redis_url = redis.url
            # Two fused apps, each holding high.num_cpus + low.num_cpus: the logical CPUs of both.
            connect(num_cpus=2 * args.num_cpus, log_to_driver=False, cluster_env=serve_cluster_env(config.serve))
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                cost = detector_cost(config, port, args.requests, args.warmup, args.repeats)
            finally:
                serve.shutdown()
                ray.shutdown()
        on, off = cost["on"], cost["off"]
        low, high = cost["p50_difference_interval_ms"]
        verdict = "met" if high <= 2 else "not met" if low > 2 else "undecided"
        print(f"query detector, fused, 1 client, {cost['repeats']} rounds of {args.requests} distinct photographs, "
              f"each sent to both: on p50 {on['p50']:.2f} ms p95 {on['p95']:.2f} ms | off p50 {off['p50']:.2f} ms "
              f"p95 {off['p95']:.2f} ms", flush=True)
        print(f"p50 on - off = {cost['p50_difference_ms']:+.2f} ms, 95% interval [{low:+.2f}, {high:+.2f}] ms "
              f"(paired bootstrap over {cost['requests']} photographs; target <= +2 ms: {verdict}); "
              f"median of the paired differences {cost['median_paired_difference_ms']:+.2f} ms; per round "
              + ", ".join(f"{d:+.2f}" for d in cost["p50_difference_per_round_ms"])
              + f" ms; detector stage in the replica p50 {cost['detector_stage_p50_ms']:.2f} ms; "
              f"answers {cost['statuses']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(cost, indent=2))
        return 0

    bare = BareForward(config, image)
    results: dict = {"config": {"max_batch_size": batch, "batch_wait_timeout_s": config.serve.batch_wait_timeout_s,
                                "http_proxy": config.serve.http_proxy},
                     "scenarios": []}
    with tempfile.TemporaryDirectory() as state, EmbeddedRedis(state) as redis:
        config.serve.redis_url = redis.url
        connect(num_cpus=args.num_cpus, log_to_driver=False, cluster_env=serve_cluster_env(config.serve))
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}/v1/classify"
            for topology in args.topologies:
                for size in (batch, 1):
                    cfg = config.model_copy(deep=True)
                    cfg.serve.topology = topology
                    cfg.serve.max_batch_size = size
                    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
                    warm = drive(url, image, 1, args.warmup, args.max_seconds)
                    assert warm["statuses"].keys() <= {200, 403}, warm
                    for clients in args.clients:
                        row = drive(url, image, clients, args.requests, args.max_seconds,
                                    bare if clients == 1 else None)
                        row.update(topology=topology, max_batch_size=size)
                        results["scenarios"].append(row)
                        paired = (f"  (bare forward {row['bare_forward_ms']:.1f} ms, in the replica "
                                  f"{row.get('replica_p50_ms', float('nan')):.1f} ms)" if "bare_forward_ms" in row else "")
                        print(f"{topology:5s} max_batch_size={size:<3d} clients={clients:<3d} n={row['requests']:3d}  "
                              f"p50={row['p50']:7.1f} ms  p95={row['p95']:7.1f} ms  p99={row['p99']:7.1f} ms  "
                              f"{row['rps']:6.2f} req/s  {row['statuses']}{paired}", flush=True)
                    serve.delete(cfg.serve.app_name)
        finally:
            serve.shutdown()
            ray.shutdown()

    def find(topology: str, size: int, clients: int) -> dict | None:
        return next((r for r in results["scenarios"] if (r["topology"], r["max_batch_size"], r["clients"])
                     == (topology, size, clients)), None)

    many = max(args.clients)
    for topology in args.topologies:
        one = find(topology, batch, 1)
        if one:
            print(f"{topology}: p50 at 1 client / bare forward (high+low, interleaved with the requests) = "
                  f"{one['p50'] / one['bare_forward_ms']:.2f}x (target <= 1.3x, fused)")
        b, u = find(topology, batch, many), find(topology, 1, many)
        if b and u:
            print(f"{topology}: throughput at {many} clients, batched / unbatched = {b['rps'] / u['rps']:.2f}x "
                  f"(target on a GPU >= 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
