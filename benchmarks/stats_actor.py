"""Ray Data's stats actor and the driver while a driver takes a dataset's blocks, two ways side
by side in one run: ``ds.iter_batches`` (whose iterator sends the dataset's stats, a BlockStats per
block so far, to the stats actor every 5 s) and ``ds.iter_internal_ref_bundles`` + ``ray.get``.
(The batch job takes no block in its driver any more: its rows end in a Datasink's write tasks;
``benchmarks/driver_blocks.py`` measures its driver.) For each: the stats actor's and the
driver's private memory (RssAnon) before and after, their growth per 1,000 blocks, the BlockStats
the dataset's stats still hold at the end, and their pickled size.

    python benchmarks/stats_actor.py --blocks 3000

Each way runs in a child process with a fresh local Ray; a dataset of ``blocks`` blocks through
two map operators.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("benchmarks.stats_actor")
WAYS = ("iter_batches", "ref_bundles")


def measure(way: str, blocks: int) -> dict:
    import ray
    from ray import cloudpickle
    from scale import private_mb

    from jobs.ray_cluster import connect

    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = (ray.data.range(blocks * 4, override_num_blocks=blocks)
          .map_batches(lambda b: b, batch_size=None).map_batches(lambda b: b, batch_size=None))
    if way == "iter_batches":
        taken = ds.iter_batches(batch_size=None)
    else:
        taken = (block for bundle in ds.iter_internal_ref_bundles() for block in ray.get(bundle.block_refs))
    t0, n, before = time.perf_counter(), 0, None
    for _ in taken:
        n += 1
        if before is None:  # the stats actor exists once execution started
            before = private_mb(b"_StatsActor"), own_private_mb()
    after = private_mb(b"_StatsActor"), own_private_mb()
    stats = ds._cache.get_stats()
    pickled = len(cloudpickle.dumps(stats))
    ray.shutdown()
    row = {"way": way, "blocks": n, "s": round(time.perf_counter() - t0, 1), "block_stats_kept": block_stats(stats),
           "pickled_stats_mb": round(pickled / 1e6, 2)}
    for k, who in enumerate(("stats_actor", "driver")):
        row |= {f"{who}_before_mb": round(before[k], 1), f"{who}_after_mb": round(after[k], 1),
                f"{who}_kb_per_block": round((after[k] - before[k]) * 1024 / n, 2)}
    return row


def own_private_mb() -> float:
    """This process's private memory (RssAnon, MB)."""
    return int(next(x for x in open("/proc/self/status") if x.startswith("RssAnon:")).split()[1]) / 1024


def block_stats(stats) -> int:
    """BlockStats held in a dataset's stats, its parents' included."""
    return sum(len(v) for v in stats.metadata.values()) + sum(block_stats(p) for p in stats.parents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=3000)
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.blocks)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--child", way, "--blocks", str(args.blocks)],
                             check=True, capture_output=True, text=True).stdout
        rows[way] = row = json.loads(out.strip().splitlines()[-1])
        log.info("%-13s %d blocks in %.0f s: stats actor %.1f -> %.1f MB (%.2f kB per block), driver %.1f -> "
                 "%.1f MB (%.2f kB per block); the dataset's stats hold %d BlockStats and pickle to %.2f MB",
                 way, row["blocks"], row["s"], row["stats_actor_before_mb"], row["stats_actor_after_mb"],
                 row["stats_actor_kb_per_block"], row["driver_before_mb"], row["driver_after_mb"],
                 row["driver_kb_per_block"], row["block_stats_kept"], row["pickled_stats_mb"])
    per_block = {way: row["stats_actor_kb_per_block"] for way, row in rows.items()}
    ratio = per_block["iter_batches"] / max(per_block["ref_bundles"], 0.01)
    log.info("the stats actor grew %.1fx as much per block under iter_batches as under ref bundles", ratio)


if __name__ == "__main__":
    main()
