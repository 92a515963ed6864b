"""Algorithm 2 in Redis (twostream.online.redis_store) against a real redis-server started for
this module on a free port (appendfsync always), checked against ReputationLedger; the sources
table shared with the batch job and the audit; ``twostream reputation export/import``."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from twostream.core.config import ReputationConfig
from twostream.core.reputation import ReputationLedger, SourceState, Upload
from twostream.core.sources import SOURCES_SCHEMA, read_sources, source_states, source_table
from twostream.online.redis_server import EmbeddedRedis
from twostream.online.redis_store import RedisReputation, StoreUnavailable

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

WEIRD_IDS = ["a/b/c", "100%", "%2F", "has space", "caf\u00e9 \u2603", "{tag}", "/lead", "trail/", "x" * 256]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server(embedded_redis):
    return embedded_redis


@pytest.fixture
def make_store(server):
    """Stores on a fresh key prefix each (one test's state does not meet another's)."""
    stores: list[RedisReputation] = []

    def make(config: ReputationConfig | None = None, prefix: str | None = None, **kw) -> RedisReputation:
        store = RedisReputation(server.url, config, prefix=prefix or f"test{next(_prefixes)}", **kw)
        stores.append(store)
        return store

    return make


def run(coro):
    return asyncio.run(coro)


async def _apply(store: RedisReputation, events: list[tuple[str, bool]]) -> list:
    steps = []
    for k, (source, rejected) in enumerate(events):
        steps.append(await store.observe(source, f"img-{k}", rejected, "adversarial" if rejected else "cat"))
    return steps


@pytest.mark.parametrize("seed, config", enumerate([
    ReputationConfig(), ReputationConfig(cap=6, threshold=2, step_up=2, step_down=1),
    ReputationConfig(cap=15, threshold=3, step_up=1, step_down=3), ReputationConfig(threshold=1)]))
def test_script_equals_the_ledger_on_random_sequences(make_store, seed, config):
    rng = random.Random(seed)
    sources = rng.sample(WEIRD_IDS, 3) + ["plain"]
    bias = {s: rng.uniform(0.2, 0.8) for s in sources}
    events = [(s := rng.choice(sources), rng.random() < bias[s]) for _ in range(400)]
    store = make_store(config)

    async def main():
        steps = await _apply(store, events)
        states = {s: await store.get(s) for s in sources}
        await store.close()
        return steps, states

    steps, states = run(main())
    ledger = ReputationLedger(config)
    seqs: dict[str, int] = {}
    for k, ((source, rejected), step) in enumerate(zip(events, steps)):
        want = ledger.observe(Upload(source, step.timestamp, f"img-{k}", rejected, "adversarial" if rejected else "cat"))
        assert step.outcome == want, (k, source)
        seqs[source] = seqs.get(source, 0) + 1
        assert step.seq == seqs[source]
    for source in sources:
        assert states[source] == ledger.get(source), source
    assert any(st.intervals for st in states.values()), "no blacklisting happened: weak test"


def test_concurrent_steps_of_one_source_equal_a_replay_in_the_order_applied(make_store):
    rng = random.Random(7)
    plan = [rng.random() < 0.55 for _ in range(200)]

    async def main():
        stores = [make_store(prefix="conc") for _ in range(4)]  # four clients, as four ingress replicas
        steps = await asyncio.gather(*[
            stores[k % 4].observe("burst/src", f"c-{k}", r, "adversarial" if r else "dog") for k, r in enumerate(plan)
        ])
        state = await stores[0].get("burst/src")
        for store in stores:
            await store.close()
        return steps, state

    steps, state = run(main())
    assert sorted(s.seq for s in steps) == list(range(1, len(plan) + 1))  # none lost, none twice
    order = sorted(range(len(plan)), key=lambda k: steps[k].seq)
    assert [steps[k].timestamp for k in order] == sorted(s.timestamp for s in steps)  # seq order = time order
    ledger = ReputationLedger()
    for k in order:
        want = ledger.observe(Upload("burst/src", steps[k].timestamp, f"c-{k}", plan[k], "x"))
        assert (steps[k].outcome.cc, steps[k].outcome.blacklisted) == (want.cc, want.blacklisted)
        assert (steps[k].outcome.response == "blocked") == (want.response == "blocked")
    assert state == ledger.get("burst/src")


def test_a_retried_step_counts_once(make_store):
    store = make_store()

    async def main():
        first = await store.observe("s", "same-image", True, "adversarial")
        again = await store.observe("s", "same-image", True, "adversarial")
        state = await store.get("s")
        await store.close()
        return first, again, state

    first, again, state = run(main())
    assert first == again and state.images == 1 and state.rejected == 1


def test_weird_ids_get_reset_and_list(make_store):
    store = make_store()

    async def main():
        for k, source in enumerate(WEIRD_IDS):
            for j in range(3 if k % 2 else 1):  # odd ones blacklisted
                await store.observe(source, f"{k}-{j}", True, "adversarial")
        everyone = await store.list(None, 100)
        listed = await store.list(True, 100)
        unlisted = await store.list(False, 2)
        previous = await store.reset("a/b/c")
        gone = await store.get("a/b/c")
        counts = await store.counts()
        await store.close()
        return everyone, listed, unlisted, previous, gone, counts

    everyone, listed, unlisted, previous, gone, counts = run(main())
    assert everyone[0] == len(WEIRD_IDS) and [s for s, _ in everyone[1]] == sorted(WEIRD_IDS)
    odd = sorted(WEIRD_IDS[1::2])
    assert listed[0] == len(odd) and [s for s, _ in listed[1]] == odd
    even = sorted(WEIRD_IDS[0::2])
    assert unlisted[0] == len(even) and [s for s, _ in unlisted[1]] == even[:2]
    assert previous.images == 1 and gone is None and counts == (len(WEIRD_IDS) - 1, len(odd))


@pytest.mark.timing
def test_state_survives_a_kill_of_redis(server, make_store):
    """appendfsync always: every answered step is on disk before its answer (SIGKILL, restart)."""
    events = [(f"k{k % 3}", k % 4 != 0) for k in range(60)]

    async def before():
        store = make_store(prefix="kill")
        await _apply(store, events)
        rows = await store.export()
        await store.close()
        return rows

    rows = run(before())
    server.process.kill()
    server.process.wait()
    server.process = None

    async def down():
        store = make_store(prefix="kill", retry_s=0.3)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.observe("k0", "while-down", True, "adversarial")
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await store.close()
        return time.monotonic() - started

    assert run(down()) < 3
    server.start()

    async def after():
        store = make_store(prefix="kill")
        rows = await store.export()
        await store.close()
        return rows

    assert run(after()) == rows and len(rows) == 3


STARTER = """
import sys, time
from twostream.online.redis_server import EmbeddedRedis
redis = EmbeddedRedis(sys.argv[1], appendfsync="always")
redis.start()
print(redis.port, redis.process.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout_s: float) -> bool:
    """The process has exited (or is a zombie no one reaped) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_server_never_outlives_the_process_that_started_it(tmp_path):
    """SIGKILL of the process that started the server (no cleanup runs): the server stops too,
    having written what it answered; the next server on the directory finds it."""
    import redis as redis_py

    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    port, pid = map(int, starter.stdout.readline().split())
    redis_py.Redis(port=port).set("kept", "yes")
    starter.kill()
    starter.wait()
    assert _gone(pid, 10), "redis-server outlived the process that started it"
    with EmbeddedRedis(tmp_path) as again:
        assert redis_py.Redis(port=again.port).get("kept") == b"yes"


def test_the_server_itself_holds_the_directory(tmp_path):
    """The directory's lock is the server's too: while it runs, a second one is refused, even
    after the starting process has let go of its own hold."""
    first = EmbeddedRedis(tmp_path)
    first.start()
    try:
        os.close(first._lock)  # as if the starting process had gone
        first._lock = None
        with pytest.raises(RuntimeError, match="in use by another embedded redis-server"):
            EmbeddedRedis(tmp_path).start()
    finally:
        first.stop()
    with EmbeddedRedis(tmp_path):  # free once the server has stopped
        pass


def _batch_sources(tmp_path) -> pa.Table:
    """A sources folder as a batch run leaves it: the replay's states (and error counts) through
    the shared writer, sorted by source, in two parts."""
    from twostream import storage
    from twostream.core.reputation import replay

    rng = random.Random(3)
    ids = WEIRD_IDS + [f"10.0.0.{k}" for k in range(20)]
    uploads = [
        Upload(s, rng.uniform(1.7e9, 1.7e9 + 5e4), f"i{k}", (r := rng.random() < 0.5), "adversarial" if r else "cat")
        for k, s in enumerate(rng.choice(ids) for _ in range(600))
    ]
    errors = {"only-errors": 2, ids[0]: 1}
    _, ledger = replay(uploads, ReputationConfig())
    names = sorted({s for s, _ in ledger.items()} | set(errors))
    table = source_table([(name, ledger.get(name), errors.get(name, 0)) for name in names])
    half = table.num_rows // 2
    storage.write_parquet(table.slice(0, half), str(tmp_path / "run" / "sources" / "part-00000.parquet"))
    storage.write_parquet(table.slice(half), str(tmp_path / "run" / "sources" / "part-00001.parquet"))
    return table


def test_export_import_round_trip_with_a_batch_run_is_exact(tmp_path, server, monkeypatch):
    from twostream.cli import main

    table = _batch_sources(tmp_path)
    assert pc.sum(table.column("blacklisted")).as_py() > 0 and pc.sum(table.column("errors")).as_py() == 3
    monkeypatch.delenv("TWOSTREAM_REDIS_PASSWORD", raising=False)
    url = ["--redis-url", server.url, "--set", "serve.redis_prefix=roundtrip"]

    def import_then_export(source: Path, name: str, *flags: str) -> pa.Table:
        assert main(["reputation", "import", *flags, "--from", str(source), *url]) == 0
        assert main(["reputation", "export", "--to", str(tmp_path / name), *url]) == 0
        return read_sources(str(tmp_path / name))

    exported = import_then_export(tmp_path / "run", "out.parquet")
    assert exported.schema == SOURCES_SCHEMA
    assert exported.equals(table.sort_by("source"))
    # Merge keeps other live sources; --replace forgets them.
    extra = source_table([("live-only", SourceState(cc=1, images=1, rejected=1, first_seen=1.0, last_seen=1.0), 0)])
    from twostream import storage

    storage.write_parquet(extra, str(tmp_path / "extra.parquet"))
    assert import_then_export(tmp_path / "extra.parquet", "merged.parquet").num_rows == table.num_rows + 1
    assert import_then_export(tmp_path / "extra.parquet", "replaced.parquet", "--replace").equals(extra)


def test_imported_state_goes_on_online(make_store):
    """A source blacklisted offline is blocked online, and leaves when its CC reaches 0."""
    store = make_store()
    state = SourceState(cc=2, blacklisted=True, images=5, rejected=4, blocked=3, first_seen=10.0, last_seen=20.0,
                        intervals=[[12.0, 14.0], [18.0, None]])

    async def main():
        await store.load(source_states(source_table([("offline bad/actor", state, 0)])))
        first = await store.observe("offline bad/actor", "o1", False, "cat")
        second = await store.observe("offline bad/actor", "o2", False, "cat")
        final = await store.get("offline bad/actor")
        await store.close()
        return first, second, final

    first, second, final = run(main())
    assert first.outcome.response == "blocked" and first.outcome.cc == 1 and first.seq == 6
    assert second.outcome.response == "cat" and not second.outcome.blacklisted
    ledger = ReputationLedger()
    ledger._states["x"] = SourceState(**{**state.__dict__, "intervals": [list(i) for i in state.intervals]})
    ledger.observe(Upload("x", first.timestamp, "o1", False, "cat"))
    ledger.observe(Upload("x", second.timestamp, "o2", False, "cat"))
    assert final == ledger.get("x")


def test_audit_sources_table_is_readable():
    """The audit's ranked table (``scored`` for images, intervals as start/end) reads as states."""
    interval = pa.struct([("start", pa.float64()), ("end", pa.float64())])
    table = pa.table({
        "rank": pa.array([1], pa.int32()), "source": ["1.2.3.4"], "scored": pa.array([4], pa.int64()),
        "rejected": pa.array([3], pa.int64()), "errors": pa.array([1], pa.int64()),
        "blocked": pa.array([1], pa.int64()), "first_seen": [1.0], "last_seen": [4.0],
        "blacklist_intervals": pa.array([[{"start": 3.0, "end": None}]], pa.list_(interval)),
        "cc": pa.array([3], pa.int32()), "blacklisted": [True],
    })
    [row] = source_states(table)
    assert row == ("1.2.3.4", SourceState(cc=3, blacklisted=True, images=4, rejected=3, blocked=1, first_seen=1.0,
                                          last_seen=4.0, intervals=[[3.0, None]]), 1)
    with pytest.raises(ValueError, match="intervals"):
        source_states(table.set_column(10, "blacklisted", pa.array([False])))
    with pytest.raises(ValueError, match="missing column"):
        source_states(table.drop_columns(["cc"]))
