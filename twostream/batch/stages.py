"""The batch job's phase-1 stages, Ray-free, each taking and returning a pyarrow table:

1. :func:`read_decode` - a work unit (part of a shard) -> one row per entry: identity columns and
   each stream's *prepared input* (:func:`~twostream.core.scoring.prepare`, the function the
   library's ``Scorer`` uses: the H-Net's resized tensor at its input size, the L-Net's 32x32),
   or the error (:data:`DECODED_SCHEMA`), and the query detector's fingerprint of its pixels
   (:func:`fingerprint_columns`, with ``detector.enabled``). Images are decoded one at a time and prepared from
   Pillow's pixels a strip of rows at a time, with no full-resolution array; only their prepared
   inputs are kept, so a task holds one decoded image at most; it yields a
   block whenever ``job.decode_batch_size`` rows or ``job.decode_bytes_per_batch`` bytes of
   prepared input are ready. Full-resolution pixels never leave the task.
   With JPEGs decoded on the device (``job.decode``), a JPEG that passes the header checks
   travels as its bytes (``encoded``) instead, with the size its header gives.
2. :class:`StreamStage` - one stream (built in ``__init__`` through
   :class:`~twostream.core.scoring.StreamScorer``) adds its top-k columns for every row from its
   prepared input (dropped after), zeros where the row has an error. With JPEGs decoded on the
   device, the high stream's actor first decodes the ``encoded`` rows there
   (:func:`~twostream.core.device_decode.decode_on_device`, in calls bounded by decoded bytes)
   and prepares both streams' inputs from the same pixels; only the L-Net's 32x32 (and, with the
   query detector on, the decoded pixels once, for its fingerprint) comes back to the CPU, and a
   row that fails to decode gets its error.
3. :func:`compare` - Algorithm 1 through :func:`~twostream.core.results.score_rows` into
   staging rows (:data:`~twostream.batch.outputs.STAGING_SCHEMA`), in the job's sink (its write
   tasks, before :func:`~twostream.batch.outputs.write_rows`).

Every row carries its own identity and all earlier columns, so a stage may reorder rows. Each
stage adds ``t_<stage>_ms`` (its time per row); the read stage adds ``shard_total`` (rows of the
row's shard), which tells the driver when a shard is complete.

torch (and the scoring core on it) is imported by the stages that run models or resizes, not
when this module is imported: the job's driver and the compare tasks never load it (a CUDA build
of torch costs ~280 MB of private memory per process). timm, which builds the H-Net, only where
a model is built: :func:`read_decode` takes the streams' input geometry, not their models (timm
adds ~190 MB).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.batch.outputs import FINGERPRINT_FIELDS, staging_table
from twostream.batch.planning import Shard, attach_identity, read_unit
from twostream.core.config import TwoStreamConfig
from twostream.core.results import score_rows

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from twostream.core.models import InputSpec
    from twostream.core.query_detector import QueryDetectorConfig

KINDS = ("high", "low")

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
    ("high_input", pa.large_binary()),  # prepared H-Net input, (3, h, w) float32, or (high_pixels) the
    # decoded pixels, (height, width, 3) uint8, where they are fewer bytes; empty on error
    ("high_pixels", pa.bool_()),  # high_input holds the decoded pixels (the high actor prepares them)
    ("low_input", pa.large_binary()),  # prepared L-Net input, (3, h, w) float32; empty on error
    ("encoded", pa.large_binary()),  # a JPEG for the high stream to decode on its device; else empty
    *FINGERPRINT_FIELDS,  # the query detector's fingerprint (detector.enabled), null on error
    ("t_read_ms", pa.float64()),
    ("t_decode_ms", pa.float64()),
])
_IDENTITY = ("row", "image_id", "key", "uri", "source", "timestamp")
_FP_NAMES = tuple(f.name for f in FINGERPRINT_FIELDS)
_PREPARED = tuple(f"{kind}_input" for kind in ("high", "low"))
_NONE = np.empty(0, np.uint8)  # no prepared input (an error row, or a JPEG passed on encoded)
_PASSED_ON = ("shard_total", "t_read_ms", "t_decode_ms", "t_high_ms", "t_low_ms")  # kept by compare


def read_decode(unit: Shard, config: TwoStreamConfig, specs: Mapping[str, InputSpec]) -> Iterator[pa.Table]:
    """Read a work unit's entries, give them their identity, decode and prepare them one by one
    for each stream's ``specs[kind]`` (:func:`~twostream.core.scoring.input_spec`; or, for the
    device, check JPEGs' headers and pass them on encoded); yields :data:`DECODED_SCHEMA` blocks
    bounded by rows and by bytes held."""
    from twostream.core.preprocess import ImageDecodeError, check_min_side, decode_rgb, pixel_rows
    from twostream.core.scoring import prepare

    detector = config.detector.query_config() if config.detector.enabled else None
    on_device = config.decodes_jpeg_on_device()
    rows_cap, bytes_cap = config.job.decode_batch_size, config.job.decode_bytes_per_batch
    high_bytes = 3 * specs["high"].size[0] * specs["high"].size[1] * 4  # one prepared H-Net input
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    held = 0
    t0 = time.perf_counter()
    for row in read_unit(unit, config.limits.max_bytes):
        attach_identity(row)
        t1 = time.perf_counter()
        error, size, prepared, encoded = row["read_error"], (None, None), {kind: _NONE for kind in KINDS}, b""
        as_pixels = False
        fp: tuple[bytes | None, ...] = (None,) * len(_FP_NAMES)
        if error is None:
            data = row.pop("data")
            error, size = _device_header(data, config) if on_device else (None, (None, None))
            if size[0] is not None:
                encoded = data
            elif error is None:
                try:  # prepared from Pillow's pixels a strip at a time: no full-resolution array
                    image = decode_rgb(data, config.limits, tuple(specs.values()))
                    check_min_side(image.height, image.width, config.limits)
                except ImageDecodeError as exc:
                    error = str(exc)
                else:
                    size = (image.height, image.width)
                    # an image with fewer pixel bytes than the H-Net's prepared input travels as its
                    # pixels, copied out of Pillow once, and the high actor prepares it (the same
                    # function on the same pixels); a larger one as its prepared input, read a strip
                    # at a time
                    as_pixels = image.height * image.width * 3 < high_bytes
                    if as_pixels:
                        image = pixel_rows(image, 0, image.height)
                    prepared = {kind: prepare(specs[kind], [image]).numpy().reshape(-1).view(np.uint8)
                                for kind in KINDS if not (as_pixels and kind == "high")}
                    if as_pixels:
                        prepared["high"] = image.reshape(-1)
                    if detector is not None:
                        fp = fingerprint_columns(image, detector)
                    del image
        t2 = time.perf_counter()
        out["shard"].append(unit.shard_id)
        out["shard_total"].append(unit.total)
        for name in _IDENTITY:
            out[name].append(row[name])
        out["error"].append(error)
        out["height"].append(size[0])
        out["width"].append(size[1])
        for kind in KINDS:
            out[f"{kind}_input"].append(prepared[kind])
        out["high_pixels"].append(as_pixels)
        out["encoded"].append(encoded)
        for name, value in zip(_FP_NAMES, fp):
            out[name].append(value)
        out["t_read_ms"].append((t1 - t0) * 1e3)
        out["t_decode_ms"].append((t2 - t1) * 1e3)
        held += sum(v.nbytes for v in prepared.values()) + len(encoded)
        if len(out["row"]) >= rows_cap or held >= bytes_cap:
            yield _block(out)
            out = {name: [] for name in DECODED_SCHEMA.names}
            held = 0
        t0 = time.perf_counter()
    if out["row"]:
        yield _block(out)


def _block(columns: dict[str, list]) -> pa.Table:
    """A :data:`DECODED_SCHEMA` block; each prepared-input column is built from its rows' arrays
    with one copy (no Python bytes per row)."""
    arrays = {}
    for name in DECODED_SCHEMA.names:
        values = columns[name]
        if name in _PREPARED:
            sizes = np.fromiter((v.nbytes for v in values), np.int64, len(values))
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            data = np.concatenate(values) if len(values) else np.empty(0, np.uint8)
            arrays[name] = pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        else:
            arrays[name] = pa.array(values, DECODED_SCHEMA.field(name).type)
    return pa.Table.from_pydict(arrays, schema=DECODED_SCHEMA)


def fingerprint_columns(image: PIL.Image.Image | np.ndarray | torch.Tensor,
                        config: QueryDetectorConfig) -> tuple[bytes, bytes, bytes]:
    """The query detector's fingerprint of a decoded image (a Pillow image, read a strip of
    rows at a time; an (H, W, 3) uint8 array; or the device decoder's (3, H, W) uint8 tensor)
    as the :data:`~twostream.batch.outputs.FINGERPRINT_FIELDS` values."""
    from twostream.core.preprocess import STRIP_ROWS, pixel_rows
    from twostream.core.query_detector import fingerprint_rows

    if isinstance(image, np.ndarray):
        height, width, strips = image.shape[0], image.shape[1], iter([image])
    elif hasattr(image, "permute"):  # a device tensor: its pixels come to the CPU once
        height, width = image.shape[1:]
        strips = iter([image.permute(1, 2, 0).contiguous().cpu().numpy()])
    else:
        height, width = image.height, image.width
        strips = (pixel_rows(image, top, min(height, top + STRIP_ROWS)) for top in range(0, height, STRIP_ROWS))
    fp = fingerprint_rows(height, width, strips, config)
    return fp.digest, fp.sample.tobytes(), np.asarray(fp.hashes, "<i8").tobytes()


def _device_header(data: bytes, config: TwoStreamConfig) -> tuple[str | None, tuple[int | None, int | None]]:
    """(error, (height, width)) of an upload for the device decoder: the size of a JPEG it takes,
    the reason for one the header checks refuse, (None, (None, None)) for the CPU decoder."""
    from twostream.core.device_decode import jpeg_header
    from twostream.core.preprocess import ImageDecodeError, check_min_side

    try:
        header = jpeg_header(data, config.limits)
        if header is None:
            return None, (None, None)
        check_min_side(header.height, header.width, config.limits)
    except ImageDecodeError as exc:
        return str(exc), (None, None)
    return None, (header.height, header.width)


def _row_values(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row's bytes of a binary column, as uint8 views of its buffers (no copy)."""
    values = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        values.extend(data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    return values


# A block's input columns as Python lists, read once: each row's input bytes, its high_pixels flag,
# its decoded height and width.
_InputColumns = tuple[list[np.ndarray], list[bool], list, list]


def _topk_column(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(N, k) -> a list<type_> column of N rows of k."""
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * values.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_))


def _topk_matrix(table: pa.Table, name: str, k: int) -> np.ndarray:
    """A top-k list column -> its (N, k) array."""
    return table.column(name).combine_chunks().flatten().to_numpy().reshape(table.num_rows, k)


class StreamStage:
    """One stream's actor: forward + top-k of the prepared inputs of a table's rows."""

    def __init__(self, config: TwoStreamConfig, kind: Literal["high", "low"]) -> None:
        import torch

        from twostream.core.scoring import StreamScorer, input_spec, use_threads

        self.config = config
        self.kind = kind
        use_threads(getattr(config, kind))
        torch.manual_seed(0)  # `random` weights (tests, benchmarks): the same in every actor
        self.scorer = StreamScorer(config, kind)
        self.decodes = kind == "high" and config.decodes_jpeg_on_device()
        self.low_spec = input_spec(config, "low") if self.decodes else None
        self.detector = config.detector.query_config() if self.decodes and config.detector.enabled else None

    def _decode(self, table: pa.Table) -> tuple[pa.Table, dict[int, "torch.Tensor"]]:
        """The ``encoded`` rows decoded on this actor's device, both streams' inputs prepared from
        the same pixels: returns the table (``low_input`` filled, a failed row's error set and its
        size cleared) and each decoded row's prepared high input, on the device."""
        from twostream.core.device_decode import decode_on_device
        from twostream.core.scoring import prepare

        encoded = table.column("encoded")
        rows = [k for k, n in enumerate(pc.binary_length(encoded).to_pylist()) if n]
        if not rows:
            return table, {}
        images, errors = decode_on_device([encoded[k].as_py() for k in rows], self.config.limits, self.scorer.device,
                                          streams=(self.scorer.stream.spec, self.low_spec))
        ok = [i for i, image in enumerate(images) if image is not None]
        high = prepare(self.scorer.stream, [images[i] for i in ok]) if ok else None
        low = prepare(self.low_spec, [images[i] for i in ok]).cpu().numpy() if ok else None
        names = ("error", "height", "width", "low_input") + (_FP_NAMES if self.detector is not None else ())
        columns = {name: table.column(name).to_pylist() for name in names}
        for i, k in enumerate(rows):
            if errors[i] is not None:
                columns["error"][k], columns["height"][k], columns["width"][k] = errors[i], None, None
        for j, i in enumerate(ok):
            columns["low_input"][rows[i]] = low[j].tobytes()
            if self.detector is not None:
                for name, value in zip(_FP_NAMES, fingerprint_columns(images[i], self.detector)):
                    columns[name][rows[i]] = value
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(values, table.schema.field(name).type))
        return table, {rows[i]: high[j : j + 1] for j, i in enumerate(ok)}

    def _prepared(self, columns: "_InputColumns", rows: list[int], decoded: dict[int, "torch.Tensor"]) -> "torch.Tensor":
        """These rows' inputs for this stream as one (N, 3, h, w) batch, in row order: from the
        ``<kind>_input`` bytes (the prepared input, copied once, or with ``high_pixels`` the
        decoded pixels, prepared here by :func:`~twostream.core.scoring.prepare`), or ``decoded``
        on the device."""
        import torch

        from twostream.core.scoring import prepare

        h, w = self.scorer.stream.spec.size
        values, pixels, heights, widths = columns
        from_bytes = [k for k in rows if k not in decoded]
        batch = torch.empty((len(from_bytes), 3, h, w))
        raw = batch.numpy().reshape(len(from_bytes), 3 * h * w).view(np.uint8)
        for i, k in enumerate(from_bytes):
            if pixels[k]:
                image = values[k].reshape(heights[k], widths[k], 3)
                batch[i] = prepare(self.scorer.stream, [image])[0]
            elif values[k].size == raw.shape[1]:
                raw[i] = values[k]
            else:
                raise ValueError(f"row {k}: a prepared {self.kind} input of {values[k].size} bytes, not {raw.shape[1]}")
        if not decoded:
            return batch
        at = {k: i for i, k in enumerate(from_bytes)}
        device = self.scorer.device
        return torch.cat([decoded[k] if k in decoded else batch[at[k] : at[k] + 1].to(device) for k in rows])

    def _topk(self, table: pa.Table, decoded: dict[int, "torch.Tensor"]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The rows with an input for this stream and their top-k, prepared and scored
        ``batch_size`` rows at a time (a block's batch is never held whole)."""
        heights = table.column("height").to_pylist()
        good = [k for k, height in enumerate(heights) if height is not None]
        columns = (_row_values(table.column(f"{self.kind}_input")),  # read once per block, not per batch
                   table.column("high_pixels").to_pylist() if self.kind == "high" else [False] * table.num_rows,
                   heights, table.column("width").to_pylist())
        step = self.scorer.config.batch_size
        scored = [self.scorer.topk_prepared(self._prepared(columns, good[i : i + step], decoded))
                  for i in range(0, len(good), step)]
        if not scored:
            return good, np.zeros((0, self.scorer.k), np.int64), np.zeros((0, self.scorer.k), np.float32)
        return good, np.concatenate([s[0] for s in scored]), np.concatenate([s[1] for s in scored])

    def __call__(self, table: pa.Table) -> pa.Table:
        from twostream.core.scoring import scatter_topk

        t0 = time.perf_counter()
        table, decoded = self._decode(table) if self.decodes else (table, {})
        idx, prob = scatter_topk(table.num_rows, *self._topk(table, decoded))
        elapsed = (time.perf_counter() - t0) * 1e3 / max(table.num_rows, 1)
        table = table.drop_columns([f"{self.kind}_input"] + (["high_pixels", "encoded"] if self.kind == "high" else []))
        table = table.append_column(f"{self.kind}_idx", _topk_column(idx, pa.int32()))
        table = table.append_column(f"{self.kind}_prob", _topk_column(prob, pa.float32()))
        return table.append_column(f"t_{self.kind}_ms", pa.array([elapsed] * table.num_rows, pa.float64()))


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
