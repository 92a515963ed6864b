"""The query detector's state in Redis: :class:`RedisDetectorStore`, a
:class:`~twostream.core.query_detector.DetectorStore` shared by every ingress replica and every
source id, and kept over restarts (it lives in the same Redis as the reputation state).

It holds what :class:`~twostream.core.query_detector.MemoryStore` holds, and gives the same
reports on the same queries (``tests/online/test_detector_store.py``). Keys, under the hash tag
``{prefix}`` (one Redis Cluster slot; the scripts name the per-entry and per-hash keys themselves,
inside that slot):

* ``{prefix}:qd:seq`` - the arrival counter: each remembered image is known inside the store by
  its arrival number ``n`` (an integer: the index sets stay compact intsets);
* ``{prefix}:qd:order`` - a list of arrival numbers, oldest first (the eviction order; newest
  first for candidates is the larger number);
* ``{prefix}:qd:e:<n>`` - a hash per remembered image: ``q`` its query id, ``s`` the sample (raw
  bytes), ``h`` its hashes (decimal, space-separated: 63-bit integers never pass through Lua's
  doubles), ``d`` the digest, ``g`` the geometry ``H,W``, ``t`` the time (shortest repr: exact),
  ``src`` the source (absent: none);
* ``{prefix}:qd:h:<hash>`` - a set per hash: the arrival numbers of the images whose fingerprint
  holds it (the index: an entry's count of shared hashes is the number of the query's sets it
  is in);
* ``{prefix}:qd:digests`` and ``{prefix}:qd:ids`` - hashes, digest -> ``n`` (exact re-uploads)
  and query id -> ``n`` (ids are unique).

Each of the detector's two calls per query is one Lua script (atomic while replicas race):
``lookup`` forgets the oldest entries beyond the bounds (as ``MemoryStore`` does), then returns
the exact copy or else the candidates, the samples of the newest ``verify_limit`` only (the
detector verifies no more, ``max_candidates``: entries past them come with an empty sample and no
hashes, counted in the report and not verified); ``remember`` adds the query, then forgets in the
same way. It refuses a digest that is already remembered (two replicas adding the same new image
at once keep one entry, so an exact copy never counts twice) and an id already remembered with
another digest (the same one: a call retried after a lost answer).

Redis unreachable: each call is retried for about ``retry_s`` seconds (then redis-py's
``ConnectionError``; the endpoint answers 503, as for the reputation state).

Costs: two round trips per new image (``lookup``, ``remember``; five before December 2026), one
for an exact re-upload; a lookup reads the query's 32 index sets, so it grows with the
near-duplicates remembered (an attack run of k queries makes sets of up to k numbers); an
eviction after a long idle time forgets every expired entry in one script.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from twostream.core.config import TwoStreamConfig
from twostream.core.query_detector import DetectorStore, Entry, Fingerprint, MemoryStore, QueryDetector
from twostream.core.reputation import identity_key

PASSWORD_ENV = "TWOSTREAM_REDIS_PASSWORD"

_FORGET = """
local function forget(tag, n)
  local e = tag .. ':qd:e:' .. n
  local f = redis.call('HMGET', e, 'd', 'h', 'q')
  if f[1] and redis.call('HGET', tag .. ':qd:digests', f[1]) == n then redis.call('HDEL', tag .. ':qd:digests', f[1]) end
  if f[3] and redis.call('HGET', tag .. ':qd:ids', f[3]) == n then redis.call('HDEL', tag .. ':qd:ids', f[3]) end
  if f[2] then
    for h in string.gmatch(f[2], '%S+') do redis.call('SREM', tag .. ':qd:h:' .. h, n) end
  end
  redis.call('DEL', e)
end
local function evict(tag, now, max_entries, max_age)
  local order = tag .. ':qd:order'
  local evicted = 0
  while true do
    local first = redis.call('LINDEX', order, 0)
    if not first then break end
    local t = tonumber(redis.call('HGET', tag .. ':qd:e:' .. first, 't'))
    local too_old = max_age >= 0 and t < now - max_age
    if redis.call('LLEN', order) <= max_entries and not too_old then break end
    forget(tag, first)
    redis.call('LPOP', order)
    evicted = evicted + 1
  end
  return evicted
end
"""

_LOOKUP = """
-- the entry with this digest: {query id, sample, hashes, digest, geometry, time, source or false}, or nil
local function find(tag, digests, digest)
  local n = redis.call('HGET', digests, digest)
  if not n then return nil end
  local f = redis.call('HMGET', tag .. ':qd:e:' .. n, 'q', 's', 'h', 'd', 'g', 't', 'src')
  return {f[1], f[2], f[3], f[4], f[5], f[6], f[7] or false}
end
-- per candidate of this geometry sharing >= min_shared of the hashes argv[first..], newest first:
-- {query id, shared, digest, time, source or false, sample, hashes} (sample and hashes empty past
-- the first limit)
local function candidates(tag, geometry, min_shared, limit, argv, first)
  local counts, ids = {}, {}
  for i = first, #argv do
    for _, n in ipairs(redis.call('SMEMBERS', tag .. ':qd:h:' .. argv[i])) do
      if counts[n] then counts[n] = counts[n] + 1 else counts[n] = 1; ids[#ids + 1] = n end
    end
  end
  local found = {}
  for _, n in ipairs(ids) do
    if counts[n] >= min_shared and redis.call('HGET', tag .. ':qd:e:' .. n, 'g') == geometry then
      found[#found + 1] = n
    end
  end
  table.sort(found, function(a, b) return tonumber(a) > tonumber(b) end)
  local out = {}
  for k, n in ipairs(found) do
    local e = tag .. ':qd:e:' .. n
    local f
    if k <= limit then
      f = redis.call('HMGET', e, 'q', 'd', 't', 'src', 's', 'h')
    else
      f = redis.call('HMGET', e, 'q', 'd', 't', 'src')
      f[5], f[6] = '', ''
    end
    out[#out + 1] = {f[1], counts[n], f[2], f[3], f[4] or false, f[5], f[6]}
  end
  return out
end
"""

_ADD = """
-- keys: order, digests, seq, ids; a: tag, query id, digest, geometry, time, sample, hashes,
-- has source (0/1), source -> 'added' (also: a retried call of ours, same digest), 'exists'
-- (the id with another digest) or 'duplicate' (the digest is remembered)
local function add(keys, a)
  local mine = redis.call('HGET', keys[4], a[2])
  if mine then
    return redis.call('HGET', a[1] .. ':qd:e:' .. mine, 'd') == a[3] and 'added' or 'exists'
  end
  if redis.call('HEXISTS', keys[2], a[3]) == 1 then return 'duplicate' end
  local n = tostring(redis.call('INCR', keys[3]))
  local e = a[1] .. ':qd:e:' .. n
  redis.call('RPUSH', keys[1], n)
  redis.call('HSET', e, 'q', a[2], 's', a[6], 'h', a[7], 'd', a[3], 'g', a[4], 't', a[5])
  if a[8] == '1' then redis.call('HSET', e, 'src', a[9]) end
  redis.call('HSET', keys[4], a[2], n)
  redis.call('HSET', keys[2], a[3], n)
  for h in string.gmatch(a[7], '%S+') do redis.call('SADD', a[1] .. ':qd:h:' .. h, n) end
  return 'added'
end
"""

LOOKUP_SCRIPT = _FORGET + _LOOKUP + """
-- KEYS: order, digests; ARGV: tag, now, max_entries, max_age (-1: none), digest, geometry,
-- min_shared, verify_limit, hashes... -> {'same', entry fields} or {'candidates', rows}
evict(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
local same = find(ARGV[1], KEYS[2], ARGV[5])
if same then return {'same', same} end
return {'candidates', candidates(ARGV[1], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV, 9)}
"""

REMEMBER_SCRIPT = _FORGET + _ADD + """
-- KEYS: add's; ARGV: add's, then max_entries, max_age (-1: none): add, then evict at its time
local answer = add(KEYS, ARGV)
if answer ~= 'exists' then evict(ARGV[1], tonumber(ARGV[5]), tonumber(ARGV[10]), tonumber(ARGV[11])) end
return {answer}
"""


def _geometry(geometry: tuple[int, int]) -> str:
    return f"{int(geometry[0])},{int(geometry[1])}"


def _entry(query_id: bytes, sample: bytes, hashes: bytes, digest: bytes, geometry: tuple[int, int],
           time: bytes, source: bytes | None) -> Entry:
    fp = Fingerprint(geometry, digest, np.frombuffer(sample, np.uint8),
                     tuple(int(h) for h in hashes.split()))
    return Entry(query_id.decode(), None if source is None else source.decode("utf-8"), float(time), fp)


def _found_entry(fields: list[Any]) -> Entry:
    query_id, sample, hashes, digest, geometry, time, source = fields
    height, width = geometry.split(b",")
    return _entry(query_id, sample, hashes, digest, (int(height), int(width)), time, source)


def _candidate_rows(rows: list[Any], geometry: tuple[int, int]) -> list[tuple[Entry, int]]:
    return [(_entry(query_id, sample, entry_hashes, digest, geometry, time, source), int(shared))
            for query_id, shared, digest, time, source, sample, entry_hashes in rows]


def _add_args(tag: str, entry: Entry) -> list[Any]:
    fp = entry.fingerprint
    return [tag, entry.query_id, fp.digest, _geometry(fp.geometry), repr(float(entry.time)),
            np.ascontiguousarray(fp.sample, np.uint8).tobytes(), " ".join(str(h) for h in fp.hashes),
            int(entry.source is not None), entry.source or ""]


def _refuse_existing(answer: list[bytes], entry: Entry) -> None:
    if answer[0] == b"exists":
        raise ValueError(f"query detector: query id {entry.query_id!r} is already remembered")


def _age(max_age_s: float | None) -> str:
    return repr(-1.0 if max_age_s is None else float(max_age_s))


class RedisDetectorStore(DetectorStore):
    """The detector's state in Redis (synchronous client: the detector runs in a worker thread).

    ``url``: ``redis://`` or ``rediss://``, the password the URL's or ``$TWOSTREAM_REDIS_PASSWORD``;
    ``prefix``: the key prefix (a hash tag), the reputation state's; ``verify_limit``: the newest
    candidates returned with their samples (the detector's ``max_candidates``).
    """

    def __init__(self, url: str, *, prefix: str = "twostream", verify_limit: int = 64,
                 timeout_s: float = 2.0, retry_s: float = 5.0) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        # Pauses of 0.1, 0.2, 0.4 s, then 0.5 s: a call is retried for about retry_s.
        retries = 3 + math.ceil(max(retry_s - 0.7, 0.0) / 0.5) if retry_s > 0 else 0
        self.client = redis.Redis.from_url(
            url, password=os.environ.get(PASSWORD_ENV) or None, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        )
        self.tag = "{" + prefix + "}"
        self.verify_limit = verify_limit
        self.order_key = f"{self.tag}:qd:order"
        self.digests_key = f"{self.tag}:qd:digests"
        self.seq_key = f"{self.tag}:qd:seq"
        self.ids_key = f"{self.tag}:qd:ids"
        self._lookup = self.client.register_script(LOOKUP_SCRIPT)
        self._remember = self.client.register_script(REMEMBER_SCRIPT)
        self._add_keys = [self.order_key, self.digests_key, self.seq_key, self.ids_key]

    def __len__(self) -> int:
        return int(self.client.llen(self.order_key))

    def lookup(self, fp: Fingerprint, min_shared: int, now: float, max_entries: int,
               max_age_s: float | None) -> tuple[Entry | None, list[tuple[Entry, int]]]:
        kind, found = self._lookup(
            keys=[self.order_key, self.digests_key],
            args=[self.tag, repr(float(now)), max_entries, _age(max_age_s), fp.digest, _geometry(fp.geometry),
                  min_shared, self.verify_limit, *(str(h) for h in fp.hashes)])
        return (_found_entry(found), []) if kind == b"same" else (None, _candidate_rows(found, fp.geometry))

    def remember(self, entry: Entry, max_entries: int, max_age_s: float | None) -> None:
        answer = self._remember(keys=self._add_keys,
                                args=[*_add_args(self.tag, entry), max_entries, _age(max_age_s)])
        _refuse_existing(answer, entry)

    def close(self) -> None:
        self.client.close()


def endpoint_detector(config: TwoStreamConfig) -> QueryDetector | None:
    """The endpoint's query detector (``detector:`` section): None when off; its state in the
    reputation Redis (``serve.redis_url``, ``serve.redis_prefix``) or, ``detector.store: memory``,
    in this replica only. Rule 3 counts per Algorithm-2 key (``reputation.group_by_prefix``)."""
    section, serve = config.detector, config.serve
    if not section.enabled:
        return None
    rules = section.query_config()
    key = identity_key(config.reputation.group_by_prefix)
    if section.store == "memory":
        return QueryDetector(rules, MemoryStore(), key)
    if not serve.redis_url:
        raise ValueError("detector.store=redis needs serve.redis_url (the reputation state's Redis)")
    store = RedisDetectorStore(serve.redis_url, prefix=serve.redis_prefix, verify_limit=rules.max_candidates,
                               timeout_s=serve.redis_timeout_s, retry_s=serve.redis_retry_s)
    return QueryDetector(rules, store, key)
