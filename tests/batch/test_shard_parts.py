"""Phase 1's sink without Ray (``twostream.batch.outputs.write_rows``): write tasks hand over any
rows of any shards in any order; a shard is committed (staging rows 0..n-1, then its marker) by
the write that completes it, never before; a retried write (the same rows) changes nothing; a row
written twice by different writes fails the shard, naming it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostream.batch import outputs
from twostream.batch.planning import Shard

def _rows(shard: str, total: int, rows: list[int]) -> pa.Table:
    """Compared rows as the write tasks hold them: staging columns, ``shard_total`` and stage times."""
    n = len(rows)
    columns = {f.name: pa.nulls(n, f.type) for f in outputs.STAGING_SCHEMA}
    columns["image_id"] = pa.array([f"{shard}-{r}" for r in rows])
    columns["key"] = pa.array([f"{shard}/{r}.jpg" for r in rows])
    columns["shard"] = pa.array([shard] * n)
    columns["verdict"] = pa.array(["accepted"] * n)
    columns["row"] = pa.array(rows, pa.int32())
    table = pa.table(columns)
    table = table.append_column("shard_total", pa.array([total] * n, pa.int32()))
    for stage in outputs.STAGE_TIMES:
        table = table.append_column(f"t_{stage}_ms", pa.array([1.0] * n))
    return table

@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=4), cuts=st.randoms(use_true_random=False))
def test_each_shard_committed_once_complete(tmp_path_factory, sizes, cuts) -> None:
    out = str(tmp_path_factory.mktemp("out"))
    rows = [(f"s{k}", n, r) for k, n in enumerate(sizes) for r in range(n)]
    cuts.shuffle(rows)
    writes, at = [], 0
    while at < len(rows):  # writes of 1..5 rows of any shards
        step = cuts.randint(1, 5)
        writes.append(rows[at : at + step])
        at += step
    committed, seen = [], {}
    for write in writes:
        table = pa.concat_tables([_rows(s, n, [r]) for s, n, r in write])
        for s, n, r in write:
            seen[s] = seen.get(s, 0) + 1
        result = outputs.write_rows(out, table)
        assert result["rows"] == len(write)
        assert result["stage_ms"] == {stage: float(len(write)) for stage in outputs.STAGE_TIMES}
        # a shard is committed by the write after which all its rows are written, and only then
        assert sorted(result["committed"]) == sorted({s for s, n, _ in write if seen[s] == n})
        committed += result["committed"]
    shards = [Shard(shard_id=f"s{k}", kind="files", rows=n) for k, n in enumerate(sizes)]
    outputs.close_shards(out, shards)
    assert sorted(committed) == sorted(f"s{k}" for k, n in enumerate(sizes) if n)
    for k, n in enumerate(sizes):
        staging = pq.read_table(outputs.staging_uri(out, f"s{k}"))
        assert staging.column("row").to_pylist() == list(range(n))
        assert staging.column("image_id").to_pylist() == [f"s{k}-{r}" for r in range(n)]

def test_a_retried_write_changes_nothing_and_a_row_twice_fails(tmp_path) -> None:
    out = str(tmp_path)
    first = outputs.write_rows(out, _rows("a", 4, [2, 0]))
    again = outputs.write_rows(out, _rows("a", 4, [0, 2]))  # the same rows, retried
    assert first["committed"] == again["committed"] == []
    assert outputs.write_rows(out, _rows("a", 4, [1, 3]))["committed"] == ["a"]
    outputs.write_rows(out, _rows("b", 3, [0, 1]))
    with pytest.raises(RuntimeError, match=r"shard b: 4 rows written for 3 inputs"):
        outputs.write_rows(out, _rows("b", 3, [1, 2]))  # row 1 a second time

def test_a_shard_with_rows_not_committed_fails_the_close(tmp_path) -> None:
    out = str(tmp_path)
    outputs.write_rows(out, _rows("a", 3, [0, 1]))
    with pytest.raises(RuntimeError, match=r"incomplete shards after the scan: \['a'\]"):
        outputs.close_shards(out, [Shard(shard_id="a", kind="files", rows=3), Shard(shard_id="e", kind="files", rows=0)])

def test_parts_left_by_an_interrupted_run_are_cleared(tmp_path) -> None:
    out = str(tmp_path)
    outputs.write_rows(out, _rows("a", 3, [0, 1]))
    outputs.clear_parts(out)
    assert outputs.write_rows(out, _rows("a", 3, [0, 2]))["committed"] == []  # not row 1 of the old run
