"""The driver's memory against the number of blocks, on Ray Data's public interfaces alone: the
minimal reproduction of what the batch job's driver keeps per block (docs/batch.md, "What still
grows"). A dataset of B blocks from a Datasource (one read task per block), through two
``map_batches`` operators, into a Datasink that writes nothing (``write_datasink``, as the job
does): the driver's private memory (RssAnon) before and after, for two sizes side by side, each
in a fresh process with a fresh local Ray; the growth per block is the difference over the
difference in blocks (what does not grow with the blocks cancels out).

    python benchmarks/driver_blocks.py --blocks 1000 4000

Ray Data 2.60 keeps a ``BlockStats`` per output block of every operator in the driver until the
dataset is done (``MapOperator._output_blocks_stats``, ray-project/ray#66016); this measures it.
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

log = logging.getLogger("benchmarks.driver_blocks")


def own_private_mb() -> float:
    """This process's private memory (RssAnon, MB)."""
    return int(next(x for x in open("/proc/self/status") if x.startswith("RssAnon:")).split()[1]) / 1024


def measure(blocks: int) -> dict:
    import pyarrow as pa
    import ray
    from ray.data import Datasink, Datasource, ReadTask
    from ray.data.block import BlockMetadata

    from jobs.ray_cluster import connect

    class Blocks(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda k=k: [pa.table({"id": [k] * 4})],
                             BlockMetadata(num_rows=4, size_bytes=None, exec_stats=None, input_files=None))
                    for k in range(blocks)]

    class Count(Datasink):
        rows = 0

        def write(self, blocks, ctx):
            return int(sum(b.num_rows for b in blocks))

        def on_write_complete(self, write_result):
            self.rows = int(sum(write_result.write_returns))

    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = (ray.data.read_datasource(Blocks(), override_num_blocks=blocks).map_batches(lambda b: b, batch_size=None)
          .map_batches(lambda b: b, batch_size=None))
    sink = Count()
    before, t0 = own_private_mb(), time.perf_counter()
    ds.write_datasink(sink)
    after = own_private_mb()
    ray.shutdown()
    return {"blocks": blocks, "rows": sink.rows, "s": round(time.perf_counter() - t0, 1),
            "driver_before_mb": round(before, 1), "driver_after_mb": round(after, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs=2, default=[1000, 4000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for blocks in args.blocks:
        out = subprocess.run([sys.executable, __file__, "--child", str(blocks)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(row := json.loads(out.strip().splitlines()[-1]))
        log.info("%d blocks (%d rows) in %.0f s: driver %.1f -> %.1f MB", row["blocks"], row["rows"], row["s"],
                 row["driver_before_mb"], row["driver_after_mb"])
    small, large = rows
    grown = [r["driver_after_mb"] - r["driver_before_mb"] for r in rows]
    per_block = (grown[1] - grown[0]) * 1024 / (large["blocks"] - small["blocks"])
    log.info("the driver grew %.2f kB per block (3 operators: read, two maps; the write's results apart)",
             per_block)


if __name__ == "__main__":
    main()
