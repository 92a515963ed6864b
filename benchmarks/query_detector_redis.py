"""The query detector's Redis store: memory per remembered image and time per query.

    python benchmarks/query_detector_redis.py                  # 20,000 distinct images
    python benchmarks/query_detector_redis.py --n 100000 --no-memory-store   # the full window, then 2x

Starts an embedded redis-server (a temporary directory, loopback only), then sends ``--n``
distinct images through a :class:`QueryDetector` on a :class:`RedisDetectorStore` (the default
rules, the endpoint's store) and prints Redis's ``used_memory`` growth per remembered image
(``INFO memory``), the size of one entry's keys (``MEMORY USAGE``), and ``detect()``'s time per
query (fingerprint and the store's round trips, p50/p99), beside the same run on a
``MemoryStore``. Distinct images are the worst case for memory: each adds 32 index sets of its
own (near-duplicates share them). The first ``--photos`` are the ``imagenet-sample``
photographs (``../shared/assets``, where present), the rest crops of them (see :func:`images`).

With ``--n`` above the window's ``max_entries`` (50,000, the count bound; the age bound is off
here), the figures per image are taken when the window first holds ``max_entries`` images, and
the run goes on to check the bound: after ``--n`` uploads the window must still hold exactly
``max_entries`` entries, and the keys, the digest and id indexes and ``used_memory`` are printed
beside those at the full window (the evicted images' index sets must be gone).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample"


def images(n: int, photos: int):
    """``n`` distinct RGB images: up to ``photos`` photographs, then crops of them of random place
    and size (at least 64x64: mostly geometries of their own, so index sets are rarely shared:
    about the worst case for memory), or random 96x128 images where there are no photographs."""
    from PIL import Image

    paths = sorted(ASSETS.glob("*.JPEG"))[:photos] if ASSETS.is_dir() else []
    loaded = []
    for path in paths[:n]:
        with Image.open(path) as im:
            loaded.append(np.asarray(im.convert("RGB")))
        yield loaded[-1]
    rng = np.random.default_rng(0)
    for _ in range(n - len(loaded)):
        if not loaded:
            yield rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
            continue
        photo = loaded[int(rng.integers(len(loaded)))]
        height, width = (int(rng.integers(min(64, side), side + 1)) for side in photo.shape[:2])
        top, left = int(rng.integers(photo.shape[0] - height + 1)), int(rng.integers(photo.shape[1] - width + 1))
        yield np.ascontiguousarray(photo[top: top + height, left: left + width])


def run(detector, n: int, photos: int, at: int = 0, then: Callable[[], None] | None = None) -> list[float]:
    """``detect()`` times (ms) of the ``n`` images; ``then()`` is called after the ``at``-th."""
    times = []
    for k, image in enumerate(images(n, photos)):
        t0 = time.perf_counter()
        detector.detect(image, source=f"src-{k % 1000}", query_id=f"img-{k:08d}", now=float(k))
        times.append((time.perf_counter() - t0) * 1e3)
        if k + 1 == at and then is not None:
            then()
    return times


def state(client, store) -> dict[str, int]:
    """The detector state's size now: used_memory, keys, window entries, digest and id index sizes."""
    return {"used_memory": int(client.info("memory")["used_memory"]), "keys": int(client.dbsize()),
            "entries": len(store), "digests": int(client.hlen(store.digests_key)),
            "ids": int(client.hlen(store.ids_key))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="distinct images remembered")
    parser.add_argument("--photos", type=int, default=1000, help="of them, imagenet-sample photographs")
    parser.add_argument("--no-memory-store", dest="memory_store", action="store_false",
                        help="skip the MemoryStore timing run")
    args = parser.parse_args(argv)

    import redis

    from twostream.core.query_detector import MemoryStore, QueryDetector, QueryDetectorConfig
    from twostream.online.detector_store import RedisDetectorStore
    from twostream.online.redis_server import EmbeddedRedis

    config = QueryDetectorConfig(max_age_s=None)
    full_at = min(args.n, config.max_entries)
    with tempfile.TemporaryDirectory() as directory, EmbeddedRedis(directory) as server:
        client = redis.Redis.from_url(server.url)
        store = RedisDetectorStore(server.url, prefix="bench", verify_limit=config.max_candidates)
        used0 = int(client.info("memory")["used_memory"])
        full: dict[str, int] = {}
        t0 = time.perf_counter()
        redis_ms = run(QueryDetector(config, store), args.n, args.photos, full_at,
                       lambda: full.update(state(client, store)))
        wall = time.perf_counter() - t0
        end = state(client, store)
        used1, entries = full["used_memory"], full["entries"]
        oldest = f"{{bench}}:qd:e:{client.lindex(store.order_key, 0).decode()}"  # an entry still remembered
        entry = int(client.memory_usage(oldest, samples=0) or 0)
        hashes = client.hget(oldest, "h").split()
        sets = sum(int(client.memory_usage(f"{{bench}}:qd:h:{h.decode()}") or 0) for h in hashes)
        shared = {key: int(client.memory_usage(f"{{bench}}:qd:{key}", samples=0) or 0) / max(entries, 1)
                  for key in ("order", "digests", "ids")}
        store.close()
    memory_ms = run(QueryDetector(config, MemoryStore()), args.n, args.photos) if args.memory_store else []

    per_image = (used1 - used0) / max(entries, 1)
    print(f"{args.n} distinct images ({min(args.photos, args.n)} photographs), {entries} remembered after "
          f"{full_at}; Redis {wall:.1f} s")
    print(f"Redis used_memory growth per remembered image: {per_image / 1024:.2f} KB "
          f"({per_image * config.max_entries / 2**20:.0f} MB at max_entries={config.max_entries})")
    print(f"  one entry: hash {entry} B, its 32 index sets {sets} B, its share of "
          + ", ".join(f"{key} {size:.0f} B" for key, size in shared.items()))
    if args.n > full_at:
        print(f"window bound after {args.n} uploads ({args.n / full_at:.1f}x max_entries) vs at {full_at}: "
              + ", ".join(f"{key} {end[key]:,} vs {full[key]:,}" for key in full)
              + f"; used_memory {end['used_memory'] / full['used_memory']:.3f}x")
        if (end["entries"], end["digests"], end["ids"]) != (config.max_entries,) * 3:
            raise SystemExit(f"the window's bound did not hold: {end}")
    for name, times in (("RedisDetectorStore", redis_ms), ("MemoryStore", memory_ms)):
        if not times:
            continue
        arr = np.asarray(times)
        print(f"detect() with {name:18s}: p50 {np.percentile(arr, 50):.3f} ms  mean {arr.mean():.3f} ms  "
              f"p99 {np.percentile(arr, 99):.3f} ms")
    if memory_ms:
        print(f"Redis / memory p50: {np.percentile(redis_ms, 50) / np.percentile(memory_ms, 50):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
