"""A stream actor's conversion of prepared inputs into the model's batch, two ways side by side in
one process: the rows' ``bytes`` joined (what ``StreamStage`` did before: a Python ``bytes`` per
row, a join, a copy) and the rows' values as views of the column's buffers
(``twostream.batch.stages._row_values``) copied once into the batch, as ``StreamStage`` does now. Both give the same tensor (checked); prints the CPU time per row of each and their ratio.

    python benchmarks/prepared_columns.py --rows 64 --size 224
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostream.batch.stages import _row_values  # noqa: E402

log = logging.getLogger("benchmarks.prepared_columns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="the stream's input side (3 x size x size float32)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = 3 * args.size * args.size
    rng = np.random.default_rng(0)
    rows = [rng.random(size, dtype=np.float32).tobytes() for _ in range(args.rows)]
    rows[5] = b""  # an error row: no prepared input
    half = args.rows // 2
    column = pa.chunked_array([pa.array(rows[:half], pa.large_binary()), pa.array(rows[half:], pa.large_binary())])
    good = [k for k, row in enumerate(rows) if row]

    def joined() -> torch.Tensor:
        flat = np.frombuffer(b"".join(column[k].as_py() for k in good), np.float32)
        return torch.from_numpy(flat.copy())

    def concatenated() -> torch.Tensor:
        values = _row_values(column)
        batch = np.empty((len(good), size), np.float32)
        raw = batch.view(np.uint8)
        for i, k in enumerate(good):
            raw[i] = values[k]
        return torch.from_numpy(batch.reshape(-1))

    assert torch.equal(joined(), concatenated())
    cpu = {}
    for way in (joined, concatenated, joined, concatenated):  # interleaved: the machine's load hits both
        t0 = time.process_time()
        for _ in range(args.repeat):
            way()
        cpu.setdefault(way.__name__, []).append((time.process_time() - t0) / args.repeat / args.rows * 1e3)
    for name, values in cpu.items():
        log.info("%-13s %s ms of CPU per row", name, " / ".join(f"{v:.3f}" for v in values))
    log.info("joined / concatenated: %.1fx", min(cpu["joined"]) / min(cpu["concatenated"]))


if __name__ == "__main__":
    main()
