"""Sustained load on the Serve endpoint with a replica killed in the middle, and the reputation
state checked against a sequential replay afterwards.

    python benchmarks/serve_load.py                    # 60 s, 32 clients, 1,000 sources, default models
    python benchmarks/serve_load.py --small --seconds 20

``--clients`` threads (keep-alive sessions) send uploads for ``--seconds`` from ``--sources``
source ids (Zipf-distributed, so some sources send many images and get blacklisted), three
photographs (one the default models accept, two they reject). Halfway, one ingress replica
(fused topology: it holds the models too) is killed with ``ray.kill``; Serve starts a new one.
Reported: requests answered (200/403), errors by status code or exception, p50/p99, requests/s,
and the check: for every source, its state in Redis equals a sequential replay (ReputationLedger)
of its answered images in the order Redis applied them (their ``seq``), where an image whose
request failed counts only when the seqs show it was applied (its verdict is the photograph's).
Loopback only; bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_latency import free_port, percentiles  # noqa: E402  (the sibling benchmark)


def photographs() -> list[bytes]:
    from PIL import Image
    from skimage import data as skdata

    out = []
    for pixels in (skdata.chelsea(), skdata.coffee(), skdata.astronaut()):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def replay_matches(events: list[tuple[int, bool, dict | None]], images: int, state: dict, config) -> bool:
    """Is there a sequential replay of a source's requests, in the order applied, that gives every
    answered standing and the final ``state``? ``events``: (order sent, rejected, answer or None).
    Answered images sit at their seq; the remaining seqs up to ``images`` are filled, in turn,
    with the failed requests (each used once), depth first."""
    from twostream.core.reputation import ReputationLedger, Upload

    answered = {body["seq"]: (r, body) for _, r, body in events if body}
    if len(answered) != sum(1 for *_, b in events if b) or images < len(answered):
        return False
    failed = [r for _, r, body in events if body is None]
    if images - len(answered) > len(failed):
        return False

    def search(seq: int, ledger: ReputationLedger, left: collections.Counter) -> bool:
        if seq > images:
            got = ledger.get("s")
            return (got.images, got.rejected, got.blocked, got.cc, got.blacklisted) == (
                state["images"], state["rejected"], state["blocked"], state["cc"], state["blacklisted"])
        if seq in answered:
            rejected, body = answered[seq]
            ledger = copy.deepcopy(ledger)
            want = ledger.observe(Upload("s", float(seq), str(seq), rejected, "x"))
            return body["standing"] == {"cc": want.cc, "blacklisted": want.blacklisted} and search(seq + 1, ledger, left)
        for kind in [k for k in (True, False) if left[k]]:
            trial = copy.deepcopy(ledger)
            trial.observe(Upload("s", float(seq), str(seq), kind, "x"))
            if search(seq + 1, trial, left - collections.Counter([kind])):
                return True
        return False

    return search(1, ReputationLedger(config), collections.Counter(failed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--no-kill", action="store_true", help="do not kill a replica")
    parser.add_argument("--small", action="store_true", help="tiny random-init models")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import ray
    import requests
    from ray import serve

    from jobs.ray_cluster import connect, serve_cluster_env
    from jobs.serve import build_app
    from twostream.core.config import load_config
    from twostream.online.redis_server import EmbeddedRedis
    from twostream.online.redis_store import RedisReputation

    base = ["high.threads=1", "low.threads=1", "high.num_cpus=0.5", "low.num_cpus=0.5", "high.device=cpu",
            "low.device=cpu", "serve.ingress_replicas=2", "serve.answer_detail=full"]
    if args.small:
        base += ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random"]
    port = free_port()
    config = load_config(None, base + [f"serve.port={port}"] + args.overrides)
    images = photographs()
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, args.sources + 1) ** 1.1
    weights /= weights.sum()
    log: list[tuple[str, int, int, float, object]] = []  # (source, image, order, latency, answer | error)
    lock = threading.Lock()
    killed: dict = {}

    with tempfile.TemporaryDirectory() as state_dir, EmbeddedRedis(state_dir) as redis:
        config.serve.redis_url = redis.url
        connect(num_cpus=args.num_cpus, log_to_driver=False, cluster_env=serve_cluster_env(config.serve))
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config), name=config.serve.app_name, route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1/classify"
            print(f"models: high={config.high.model}, low={config.low.model}; {config.serve.ingress_replicas} "
                  f"ingress replicas (fused); {args.clients} clients, {args.sources} sources, {args.seconds:.0f} s",
                  flush=True)
            start = threading.Barrier(args.clients + 1)
            deadline = [0.0]
            order = iter(range(10**9))

            def client(k: int) -> None:
                local = np.random.default_rng(k + 1)
                session = requests.Session()
                start.wait()
                while time.monotonic() < deadline[0]:
                    source = f"load-{int(local.choice(args.sources, p=weights))}"
                    image = int(local.integers(len(images)))
                    with lock:
                        n = next(order)
                    t0 = time.perf_counter()
                    try:
                        answer = session.post(url, data=images[image], timeout=60,
                                              headers={"Content-Type": "image/jpeg", "X-Source-Id": source})
                        result: object = (answer.status_code,
                                          answer.json() if answer.status_code in (200, 403) else answer.text[:200])
                    except requests.RequestException as exc:
                        result = type(exc).__name__
                    with lock:
                        log.append((source, image, n, time.perf_counter() - t0, result))

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            deadline[0] = time.monotonic() + args.seconds
            began = time.monotonic()
            start.wait()
            if not args.no_kill:
                time.sleep(args.seconds / 2)
                replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["name"].startswith("SERVE_REPLICA::twostream#Ingress#")]
                victim = sorted(replicas)[0]
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                killed = {"replica": victim, "at_s": round(time.monotonic() - began, 1)}
                print(f"killed {victim} at {killed['at_s']} s", flush=True)
            for t in threads:
                t.join()
            wall = time.monotonic() - began

            async def read_states(sources: list[str]) -> dict[str, dict]:
                store = RedisReputation(redis.url, config.reputation)
                out = {}
                for s in sources:
                    st = await store.get(s)
                    out[s] = st.__dict__ if st else {"images": 0, "rejected": 0, "blocked": 0, "cc": 0,
                                                     "blacklisted": False}
                await store.close()
                return out

            states = asyncio.run(read_states(sorted({row[0] for row in log})))
        finally:
            serve.shutdown()
            ray.shutdown()

    # An image's verdict is the photograph's (the same bytes, the same models): from its answers.
    verdict_of: dict[int, bool] = {}
    for _, image, _, _, result in log:
        if isinstance(result, tuple) and result[0] == 200:
            verdict_of[image] = result[1]["verdict"] == "adversarial"
    codes = collections.Counter(str(r[0]) if isinstance(r, tuple) else r for *_, r in log)
    answered = [lat for *_, lat, r in log if isinstance(r, tuple) and r[0] in (200, 403)]
    by_source: dict[str, list] = collections.defaultdict(list)
    for source, image, n, _, result in sorted(log, key=lambda row: row[2]):
        body = result[1] if isinstance(result, tuple) and result[0] in (200, 403) else None
        by_source[source].append((n, verdict_of.get(image, True), body))
    mismatched = [s for s, events in by_source.items()
                  if not replay_matches(events, states[s]["images"], states[s], config.reputation)]
    applied_failures = sum(states[s]["images"] - sum(1 for *_, b in ev if b) for s, ev in by_source.items())
    summary = {
        "seconds": round(wall, 1),
        "clients": args.clients,
        "sources_used": len(by_source),
        "requests": len(log),
        "answered": len(answered),
        "by_code": dict(codes),
        "rps": round(len(answered) / wall, 2),
        **{k: round(v, 1) for k, v in percentiles(answered).items()},
        "killed": killed,
        "blacklisted_now": sum(1 for s in states.values() if s["blacklisted"]),
        "failed_requests_applied": applied_failures,
        "state_equals_replay": not mismatched,
        "mismatched_sources": mismatched[:10],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
