"""The Redis reputation store's size under identity rotation: N distinct source ids that send one
honest image each, with ``reputation.forget_default`` off (every id keeps a hash and a ``sources``
entry) and on (a source back at CC 0 and not listed keeps no entry), then L more ids that get
themselves blacklisted (``threshold`` rejected images each), to give the bytes per listed source.

    python benchmarks/reputation_store.py                      # N = 1,000,000, L = 100,000
    python benchmarks/reputation_store.py --n 1000000 10000000 --listed 100000

Each image is one EVALSHA of ``observe.lua`` with the keys and arguments the endpoint sends
(``RedisReputation.script_call``), pipelined ``--chunk`` at a time, into the product's
``EmbeddedRedis`` (append-only file, appendfsync everysec). Reported per mode and N: keys,
``used_memory`` above the empty server, with the retry answers (``img:<id>``, kept
``DONE_TTL_S`` = 1 h) and after they are gone (deleted here, as their expiry would), bytes per id,
then the same after the listed sources; wall time per phase. Loopback only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostream.core.config import ReputationConfig  # noqa: E402
from twostream.core.reputation import OBSERVE_SCRIPT  # noqa: E402
from twostream.online.redis_server import EmbeddedRedis  # noqa: E402
from twostream.online.redis_store import RedisReputation  # noqa: E402

log = logging.getLogger("reputation_store")


def used(client) -> tuple[int, int, int]:
    """(used_memory bytes, keys, keys with a TTL) of db 0."""
    info = client.info()
    db = info.get("db0", {"keys": 0, "expires": 0})
    return int(info["used_memory"]), int(db["keys"]), int(db["expires"])


def send(client, store: RedisReputation, sha: str, ids: range, prefix: str, images: int, rejected: bool,
         chunk: int) -> float:
    """Every id in ``ids`` sends ``images`` images (all rejected or all accepted); returns seconds."""
    start = time.perf_counter()
    for lo in range(ids.start, ids.stop, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + chunk, ids.stop)):
            for k in range(images):
                keys, args = store.script_call(f"{prefix}{i}", f"{prefix}{i}-{k}", rejected)
                pipe.evalsha(sha, len(keys), *keys, *args)
        pipe.execute()
    return time.perf_counter() - start


def drop_answers(client, store: RedisReputation) -> None:
    """Delete the retry answers (what their TTL does an hour later)."""
    batch = []
    for key in client.scan_iter(match=f"{store.tag}:img:*", count=10_000):
        batch.append(key)
        if len(batch) == 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="distinct honest source ids")
    parser.add_argument("--listed", type=int, default=100_000, help="source ids that get blacklisted")
    parser.add_argument("--chunk", type=int, default=10_000, help="EVALSHA calls per pipeline")
    parser.add_argument("--modes", nargs="+", default=["keep", "forget"], choices=["keep", "forget"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import redis

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        server = EmbeddedRedis(Path(directory))
        server.start()
        try:
            client = redis.Redis.from_url(server.url, socket_timeout=600)  # FLUSHALL of millions of keys
            sha = client.script_load(OBSERVE_SCRIPT)
            for n in args.n:
                for mode in args.modes:
                    config = ReputationConfig(forget_default=mode == "forget")
                    store = RedisReputation(server.url, config, prefix="bench")
                    client.flushall()
                    client.execute_command("MEMORY", "PURGE")
                    empty, _, _ = used(client)
                    seconds = send(client, store, sha, range(n), "honest-", 1, False, args.chunk)
                    mem, keys, expires = used(client)
                    drop_answers(client, store)
                    mem_after, keys_after, _ = used(client)
                    listed_s = send(client, store, sha, range(args.listed), "bad-", config.threshold, True, args.chunk)
                    drop_answers(client, store)
                    mem_listed, keys_listed, _ = used(client)
                    blacklist = client.zcard(store.blacklist_key)
                    row = dict(mode=mode, n=n, s=seconds, per_s=n / seconds, keys=keys, expires=expires,
                               mb=(mem - empty) / 2**20, b_per_id=(mem - empty) / n, keys_after=keys_after,
                               mb_after=(mem_after - empty) / 2**20, b_per_id_after=(mem_after - empty) / n,
                               listed=blacklist, listed_s=listed_s, keys_listed=keys_listed,
                               b_per_listed=(mem_listed - mem_after) / max(args.listed, 1))
                    log.info("%s", row)
                    rows.append(row)
                    client.flushall()
        finally:
            server.stop()
    header = ("| forget_default | honest ids | keys (answers kept 1 h) | MB | B/id | keys after answers expire | "
              "MB | B/id | listed ids | B per listed id | EVALSHA/s |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        print(f"| {'on' if r['mode'] == 'forget' else 'off'} | {r['n']:,} | {r['keys']:,} | {r['mb']:.1f} | "
              f"{r['b_per_id']:.0f} | {r['keys_after']:,} | {r['mb_after']:.2f} | {r['b_per_id_after']:.1f} | "
              f"{r['listed']:,} | {r['b_per_listed']:.0f} | {r['per_s']:,.0f} |")
    if len({r["mode"] for r in rows}) == 2:
        for n in args.n:
            keep, forget = (next(r for r in rows if r["n"] == n and r["mode"] == m) for m in ("keep", "forget"))
            print(f"N={n:,}: after the answers expire, forget_default holds "
                  f"{forget['mb_after']:.2f} MB vs {keep['mb_after']:.1f} MB "
                  f"({keep['mb_after'] / max(forget['mb_after'], 1e-9):,.0f}x less)")


if __name__ == "__main__":
    main()
