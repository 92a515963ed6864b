"""Every implementation of Algorithm 2 on the same generated event streams: the sequential reference
(``replay``, ``ReputationLedger.observe``), NumPy ``advance`` (one image per source and round), the
batch job's reduce (``staging_events`` -> ``partition`` -> ``reduce_partition``, the vectorised
``scan``; two runs, the second from the first's state), the audit's replay (``Spill`` ->
``replay_partition``) and ``observe.lua`` in a real redis-server (one for the module). Streams mix
many sources (IPv4, IPv4-mapped IPv6, IPv6 with zone ids, other ids), ties in time, rejections,
unreadable images, blacklisting and release; configs vary the counter rules, ``group_by_prefix``
and ``forget_default``. Every implementation must give the same response to every image and the
same final standing to every source; with ``forget_default`` no store keeps a source at CC 0 and
not listed. The Algorithm-2 key of each generated id is known by construction, so grouping is
checked against the reference run on those keys, not on ``reputation_key``'s own output."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twostream.audit.catalogue import Catalogue
from twostream.audit.replay import Spill, replay_partition
from twostream.batch.reputation import partition, reduce_partition, staging_events
from twostream.core.config import PrefixGrouping, ReputationConfig
from twostream.core.labels import Refusal, Verdict
from twostream.core.reputation import ReputationLedger, SourceState, Upload, advance, replay

ERROR = "error"  # a generated image that could not be decoded: not an Algorithm-2 event
_prefixes = itertools.count()

# (source id as sent, its key under {ipv4: 24, ipv6: 64}), worked out by hand
_host = st.sampled_from([1, 7, 255])
_net = st.sampled_from([0, 1])
SIXTY_FOUR = ["2001:db8::/64", "2001:db8:0:1::/64"]  # 2001:db8:0:<net>::/64 as written canonically
SOURCES = st.one_of(
    st.tuples(_net, _host).map(lambda t: (f"10.0.{t[0]}.{t[1]}", f"10.0.{t[0]}.0/24")),
    st.tuples(_net, _host).map(lambda t: (f"::ffff:10.0.{t[0]}.{t[1]}", f"10.0.{t[0]}.0/24")),
    st.tuples(_net, _host).map(lambda t: (f"2001:db8:0:{t[0]}:{t[1]:x}::1", SIXTY_FOUR[t[0]])),
    st.tuples(_net, _host).map(lambda t: (f"fe80::{t[1]:x}%eth{t[0]}", "fe80::/64")),
    st.sampled_from(["alice", "a/b c", "caf\u00e9", "1.2.3", "10.0.0.1 ", "{tag}", "2001:db8::/64"]).map(
        lambda s: (s, s)),
)


@dataclass(frozen=True)
class Event:
    sent_by: str
    group: str  # the key under {ipv4: 24, ipv6: 64}
    timestamp: float
    image_id: str
    outcome: str  # accepted | adversarial | error


@st.composite
def streams(draw) -> tuple[list[Event], ReputationConfig]:
    cap = draw(st.integers(1, 6))
    config = ReputationConfig(
        cap=cap, threshold=draw(st.integers(1, cap)), step_up=draw(st.integers(1, 3)),
        step_down=draw(st.integers(1, 3)), forget_default=draw(st.booleans()),
        group_by_prefix=draw(st.sampled_from([None, PrefixGrouping(ipv4=24, ipv6=64)])))
    rows = draw(st.lists(st.tuples(SOURCES, st.integers(0, 12), st.sampled_from(
        ["accepted", "adversarial", "adversarial", ERROR])), min_size=1, max_size=60))
    ids = draw(st.permutations(range(len(rows))))  # image ids unique, their order unlike the times'
    events = [Event(s, g, float(t), f"img{ids[k]:03d}", o) for k, ((s, g), t, o) in enumerate(rows)]
    return events, config


def key_of(event: Event, config: ReputationConfig) -> str:
    return event.group if config.group_by_prefix is not None else event.sent_by


def verdict_of(event: Event) -> str:
    return "cat" if event.outcome == "accepted" else str(Refusal.ADVERSARIAL)


def order(events: list[Event]) -> list[int]:
    """The scored events' indices in (timestamp, image_id) order."""
    return sorted((k for k, e in enumerate(events) if e.outcome != ERROR),
                  key=lambda k: (events[k].timestamp, events[k].image_id))


@dataclass
class Result:
    responses: list[str]  # per event, in stream order ("error" for unreadable images)
    standing: dict[str, tuple[int, bool]]  # every source not at the default standing: (cc, listed)


def reference(events: list[Event], config: ReputationConfig) -> tuple[Result, ReputationLedger]:
    uploads = {k: Upload(key_of(e, config), e.timestamp, e.image_id, e.outcome == "adversarial", verdict_of(e))
               for k, e in enumerate(events) if e.outcome != ERROR}
    keys = list(uploads)
    outcomes, ledger = replay([uploads[k] for k in keys], config)
    responses = [ERROR] * len(events)
    for k, out in zip(keys, outcomes):
        responses[k] = out.response
    standing = {s: (st.cc, st.blacklisted) for s, st in ledger.items() if st.cc or st.blacklisted}
    return Result(responses, standing), ledger


def by_observe(events: list[Event], config: ReputationConfig) -> Result:
    """ReputationLedger.observe one image at a time, in (timestamp, image_id) order."""
    ledger = ReputationLedger(config)
    responses = [ERROR] * len(events)
    for k in order(events):
        e = events[k]
        responses[k] = ledger.observe(Upload(key_of(e, config), e.timestamp, e.image_id,
                                             e.outcome == "adversarial", verdict_of(e))).response
    return Result(responses, {s: (st.cc, st.blacklisted) for s, st in ledger.items() if st.cc or st.blacklisted})


def by_advance(events: list[Event], config: ReputationConfig) -> Result:
    """NumPy ``advance``: round r applies every source's r-th image at once."""
    seqs: dict[str, list[int]] = {}
    for k in order(events):
        seqs.setdefault(key_of(events[k], config), []).append(k)
    names = list(seqs)
    cc, listed = np.zeros(len(names), np.int64), np.zeros(len(names), bool)
    responses = [ERROR] * len(events)
    for r in range(max((len(v) for v in seqs.values()), default=0)):
        live = np.array([i for i, s in enumerate(names) if len(seqs[s]) > r])
        ks = [seqs[names[i]][r] for i in live]
        rejected = np.array([events[k].outcome == "adversarial" for k in ks])
        cc[live], listed[live], blocked = advance(cc[live], listed[live], rejected, config)
        for k, b in zip(ks, blocked.tolist()):
            responses[k] = Refusal.BLOCKED if b else verdict_of(events[k])
    return Result(responses, {s: (int(c), bool(b)) for s, c, b in zip(names, cc, listed) if c or b})


def _staging(events: list[Event], rows: list[int]) -> pa.Table:
    return pa.table({
        "source": [events[k].sent_by for k in rows], "timestamp": [events[k].timestamp for k in rows],
        "image_id": [events[k].image_id for k in rows], "row": pa.array(rows, pa.int32()),
        "verdict": [str(Verdict.ERROR) if events[k].outcome == ERROR else events[k].outcome for k in rows],
    })


def by_batch(events: list[Event], config: ReputationConfig, split: float, parts: int) -> tuple[Result, pa.Table]:
    """The batch reduce in two runs (events before ``split``, then the rest from the first run's
    state), each over ``parts`` partitions. Returns the result and the second run's sources table."""
    responses = [ERROR] * len(events)
    state = None
    for run in (lambda t: t < split, lambda t: t >= split):
        rows = [k for k, e in enumerate(events) if run(e.timestamp)]
        ev = partition(staging_events(_staging(events, rows), 0, config), parts)
        old = partition(state, parts) if state is not None else [None] * parts
        tables = []
        for p in range(parts):
            table, answers = reduce_partition(ev[p], old[p], config)
            tables.append(table)
            for k, c, b in zip(*(answers.column(n).to_pylist() for n in ("row", "cc", "blacklisted"))):
                responses[k] = Refusal.BLOCKED if b else verdict_of(events[k])
        state = pa.concat_tables(tables)
    standing = {s: (c, b) for s, c, b in zip(*(state.column(n).to_pylist() for n in ("source", "cc", "blacklisted")))
                if c or b}
    return Result(responses, standing), state


def by_audit(events: list[Event], config: ReputationConfig, parts: int) -> tuple[Result, list[str]]:
    """The audit's spill and replay (one catalogue image per event). Returns the result and the
    timeline's source column, in stream order."""
    ids = sorted(e.image_id for e in events)
    row = {i: r for r, i in enumerate(ids)}
    cat = Catalogue.empty(pa.array(ids, pa.string()), 1, 1)
    for e in events:
        cat.verdict[row[e.image_id]] = Verdict.ERROR if e.outcome == ERROR else e.outcome
        cat.label[row[e.image_id]] = "cat" if e.outcome == "accepted" else None
    rejected = np.array([v == Verdict.ADVERSARIAL for v in cat.verdict])
    responses, logged = [ERROR] * len(events), [""] * len(events)
    standing = {}
    directory = tempfile.mkdtemp(prefix="reputation-impl-")
    try:
        spill = Spill(directory, parts, config.group_by_prefix)
        spill.append(pa.array([e.sent_by for e in events], pa.string()),
                     np.array([row[e.image_id] for e in events], np.int32),
                     np.array([e.timestamp for e in events]), np.arange(len(events)), None)
        spill.close()
        for p, records in spill.partitions_sorted():
            part = replay_partition(p, records, cat, rejected, config)
            timeline = part.timeline(cat.verdict, cat.ids)
            for line, response, source in zip(timeline["line"].to_pylist(), part.response.tolist(),
                                              timeline["source"].to_pylist()):
                responses[line], logged[line] = str(response), source
            standing.update({s: (int(c), bool(b)) for s, c, b in zip(part.names, part.src_cc, part.src_blacklisted)
                             if c or b})
    finally:
        shutil.rmtree(directory)
    return Result(responses, standing), logged


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    from twostream.online.redis_server import EmbeddedRedis

    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    yield redis.url
    redis.stop()


def by_redis(events: list[Event], config: ReputationConfig, url: str) -> tuple[Result, dict, set[str]]:
    """observe.lua through RedisReputation, one image at a time in (timestamp, image_id) order,
    each under the id it was sent by. Returns the result, each key's stored state (None: no
    entry) and the ids in the store's ``sources`` set."""
    from twostream.online.redis_store import RedisReputation

    keys = {key_of(e, config) for e in events}

    async def main():
        store = RedisReputation(url, config, prefix=f"impl{next(_prefixes)}")
        try:
            steps = {k: await store.observe(events[k].sent_by, events[k].image_id,
                                            events[k].outcome == "adversarial", verdict_of(events[k]))
                     for k in order(events)}
            states = {s: await store.get(s) for s in keys}
            members = {m.decode() for m in await store.client.zrange(store.sources_key, 0, -1)}
            hashes = [k async for k in store.client.scan_iter(match=f"{store.tag}:s:*")]
            assert len(hashes) == len(members)
        finally:
            if left := [k async for k in store.client.scan_iter(match=f"{store.tag}:*")]:
                await store.client.delete(*left)
            await store.close()
        return steps, states, members

    steps, states, members = asyncio.run(main())
    responses = [ERROR] * len(events)
    for k, step in steps.items():
        responses[k] = str(step.outcome.response)
    standing = {s: (st.cc, st.blacklisted) for s, st in states.items() if st is not None and (st.cc or st.blacklisted)}
    return Result(responses, standing), states, members


def _counts(state: SourceState) -> tuple:
    """What a store keeps of a state, less the Redis server's own clock."""
    return (state.cc, state.blacklisted, state.images, state.rejected, state.blocked,
            [iv[1] is None for iv in state.intervals])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams(), split=st.integers(0, 13), parts=st.integers(1, 3))
def test_every_implementation_gives_the_reference_responses_and_states(redis_url, stream, split, parts):
    events, config = stream
    ref, ledger = reference(events, config)
    batch, table = by_batch(events, config, float(split), parts)
    audit, logged = by_audit(events, config, parts)
    redis, stored, members = by_redis(events, config, redis_url)
    for name, got in [("observe", by_observe(events, config)), ("advance", by_advance(events, config)),
                      ("batch", batch), ("audit", audit), ("redis", redis)]:
        assert got.responses == ref.responses, name
        assert got.standing == ref.standing, name

    assert logged == [e.sent_by for e in events]  # the audit's timeline keeps the id as sent
    scored_keys = {key_of(e, config) for e in events if e.outcome != ERROR}
    if config.forget_default:  # bounded: only the sources away from the default standing have an entry
        assert {s for s, _ in ledger.items()} == set(ref.standing) == members
        assert {s for s, state in stored.items() if state is not None} == members
        late = {key_of(e, config) for e in events if e.timestamp >= split}
        assert set(table.column("source").to_pylist()) == set(ref.standing) | late
    else:  # every scored source kept, with the reference's counts
        assert members == scored_keys
        assert {s: _counts(state) for s, state in stored.items() if state is not None} == \
               {s: _counts(ledger.get(s)) for s in scored_keys}
        rows = {r["source"]: r for r in table.to_pylist()}
        assert set(rows) == {key_of(e, config) for e in events}
        for source, r in rows.items():
            expected = ledger.get(source)
            assert (r["cc"], r["blacklisted"], r["images"], r["rejected"], r["blocked"], r["first_seen"],
                    r["last_seen"]) == (expected.cc, expected.blacklisted, expected.images, expected.rejected,
                                        expected.blocked, expected.first_seen, expected.last_seen), source
            assert r["errors"] == sum(e.outcome == ERROR and key_of(e, config) == source for e in events)
