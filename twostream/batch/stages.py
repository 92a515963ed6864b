"""The batch job's phase-1 stages, Ray-free, each taking and returning a pyarrow table:

1. :func:`read_decode` - shards -> one row per input: identity columns, decoded pixels or the
   error (:data:`DECODED_SCHEMA`).
2. :class:`StreamStage` - one stream (built in ``__init__`` through
   :class:`~twostream.core.scoring.StreamScorer``) adds its top-k columns for every row, zeros
   where the row has an error; the low stage drops the pixels.
3. :func:`compare` - Algorithm 1 through :func:`~twostream.core.results.score_rows` into
   staging rows (:data:`~twostream.batch.outputs.STAGING_SCHEMA`).

Every row carries its own identity and all earlier columns, so a stage may reorder rows. Each
stage adds ``t_<stage>_ms`` (its time per row); the read stage adds ``shard_total`` (rows of the
row's shard), which tells the driver when a shard is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from twostream.batch.manifest import ManifestIndex
from twostream.batch.outputs import staging_table
from twostream.batch.planning import Shard, attach_identity, read_shard
from twostream.core.config import LimitsConfig, TwoStreamConfig
from twostream.core.results import score_rows
from twostream.core.scoring import StreamScorer, decode_many, scatter_topk, use_threads

FAULT_CRASH_ACTOR = "TWOSTREAM_FAULT_CRASH_ACTOR_ONCE"  # dir: first high-stream batch kills its actor

DECODED_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("shard_total", pa.int32()),
    ("row", pa.int32()),  # position in its shard
    ("image_id", pa.string()),
    ("key", pa.string()),
    ("uri", pa.string()),
    ("source", pa.string()),
    ("timestamp", pa.float64()),
    ("error", pa.string()),  # why the input cannot be scored, else null
    ("height", pa.int32()),  # decoded size, null on error
    ("width", pa.int32()),
    ("pixels", pa.large_binary()),  # (height, width, 3) uint8 RGB, empty on error
    ("t_read_ms", pa.float64()),
    ("t_decode_ms", pa.float64()),
])
_IDENTITY = ("image_id", "key", "uri", "source", "timestamp")
_PASSED_ON = ("shard_total", "t_read_ms", "t_decode_ms", "t_high_ms", "t_low_ms")  # kept by compare


def read_decode(shards: Sequence[Shard], input_uri: str, index: ManifestIndex, limits: LimitsConfig) -> pa.Table:
    """Read each shard, give its rows their identity and decode them (:data:`DECODED_SCHEMA`)."""
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for shard in shards:
        t0 = time.perf_counter()
        rows = attach_identity(read_shard(shard, input_uri, limits.max_bytes), index)
        t1 = time.perf_counter()
        readable = [k for k, r in enumerate(rows) if r["read_error"] is None]
        images, errors = decode_many([rows[k]["data"] for k in readable], limits)
        t2 = time.perf_counter()
        decoded: list[np.ndarray | None] = [None] * len(rows)
        reason = [r["read_error"] for r in rows]
        for k, image, error in zip(readable, images, errors):
            decoded[k], reason[k] = image, error
        n = max(len(rows), 1)
        for k, (row, image) in enumerate(zip(rows, decoded)):
            out["shard"].append(shard.shard_id)
            out["shard_total"].append(len(rows))
            out["row"].append(k)
            for name in _IDENTITY:
                out[name].append(row[name])
            out["error"].append(reason[k])
            out["height"].append(int(image.shape[0]) if image is not None else None)
            out["width"].append(int(image.shape[1]) if image is not None else None)
            out["pixels"].append(image.tobytes() if image is not None else b"")
            out["t_read_ms"].append((t1 - t0) * 1e3 / n)
            out["t_decode_ms"].append((t2 - t1) * 1e3 / n)
    return pa.Table.from_pydict(out, schema=DECODED_SCHEMA)


def _images(table: pa.Table) -> tuple[list[int], list[np.ndarray]]:
    """The rows with decoded pixels, and their (H, W, 3) arrays."""
    heights = table.column("height").to_pylist()
    widths = table.column("width").to_pylist()
    pixels = table.column("pixels")
    good, images = [], []
    for k, (h, w) in enumerate(zip(heights, widths)):
        if h is not None:
            good.append(k)
            images.append(np.frombuffer(pixels[k].as_buffer(), np.uint8).reshape(h, w, 3).copy())
    return good, images


def _topk_column(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(N, k) -> a list<type_> column of N rows of k."""
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * values.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_))


def _topk_matrix(table: pa.Table, name: str, k: int) -> np.ndarray:
    """A top-k list column -> its (N, k) array."""
    return table.column(name).combine_chunks().flatten().to_numpy().reshape(table.num_rows, k)


class StreamStage:
    """One stream's actor: its own resize + forward + top-k for the decoded rows of a table."""

    def __init__(self, config: TwoStreamConfig, kind: Literal["high", "low"]) -> None:
        self.config = config
        self.kind = kind
        use_threads(getattr(config, kind))
        torch.manual_seed(0)  # `random` weights (tests, benchmarks): the same in every actor
        self.scorer = StreamScorer(config, kind)
        self.calls = 0

    def _maybe_crash(self) -> None:
        """Fault injection (tests): with ``$TWOSTREAM_FAULT_CRASH_ACTOR_ONCE`` set, the high
        stream's first batch kills its process once (Ray restarts the actor, retries the batch)."""
        marker_dir = os.environ.get(FAULT_CRASH_ACTOR)
        if self.kind == "high" and marker_dir and self.calls == 1:
            marker = os.path.join(marker_dir, "crashed")
            if not os.path.exists(marker):
                os.makedirs(marker_dir, exist_ok=True)
                open(marker, "w").close()
                os._exit(1)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.calls += 1
        self._maybe_crash()
        t0 = time.perf_counter()
        good, images = _images(table)
        idx, prob = scatter_topk(table.num_rows, good, *self.scorer.topk(images))
        elapsed = (time.perf_counter() - t0) * 1e3 / max(table.num_rows, 1)
        table = table.append_column(f"{self.kind}_idx", _topk_column(idx, pa.int32()))
        table = table.append_column(f"{self.kind}_prob", _topk_column(prob, pa.float32()))
        table = table.append_column(f"t_{self.kind}_ms", pa.array([elapsed] * table.num_rows, pa.float64()))
        if self.kind == "low":
            table = table.drop_columns(["pixels"])
        if self.config.job.shuffle_stream_output:
            order = np.random.default_rng(self.calls + os.getpid()).permutation(table.num_rows)
            table = table.take(pa.array(order))
        return table


def compare(table: pa.Table, config: TwoStreamConfig) -> pa.Table:
    """Algorithm 1 on rows both streams scored -> staging rows (plus ``shard_total`` and times)."""
    t0 = time.perf_counter()
    sizes = list(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))
    scored = score_rows(
        table.column("image_id").to_pylist(),
        table.column("error").to_pylist(),
        sizes,
        _topk_matrix(table, "high_idx", config.high.top_k),
        _topk_matrix(table, "high_prob", config.high.top_k),
        _topk_matrix(table, "low_idx", config.low.top_k),
        _topk_matrix(table, "low_prob", config.low.top_k),
        config.thresholds,
    ).to_arrow()
    staging = staging_table(scored, table)
    for name in _PASSED_ON:
        staging = staging.append_column(name, table.column(name))
    elapsed = (time.perf_counter() - t0) * 1e3 / max(table.num_rows, 1)
    return staging.append_column("t_compare_ms", pa.array([elapsed] * table.num_rows, pa.float64()))
