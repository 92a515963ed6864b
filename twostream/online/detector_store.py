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

Every change is one Lua script (atomic while replicas race): ``add`` refuses a digest that is
already remembered (two replicas adding the same new image at once keep one entry, so an exact
copy never counts twice) and an id already remembered with another digest (the same one: a call
retried after a lost answer); ``evict`` drops the oldest entries beyond
the bounds, as ``MemoryStore`` does. ``candidates`` returns the samples of the newest
``verify_limit`` only (the detector verifies no more, ``max_candidates``): entries past them come
with an empty sample and no hashes, counted in the report and not verified.

Redis unreachable: each call is retried for about ``retry_s`` seconds (then redis-py's
``ConnectionError``; the endpoint answers 503, as for the reputation state).

Costs: five round trips per new image (evict, digest, candidates, add, evict), two for an exact
re-upload; a candidate lookup reads the query's 32 index sets, so it grows with the
near-duplicates remembered (an attack run of k queries makes sets of up to k numbers); an eviction after a long idle time forgets every
expired entry in one script.
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

EVICT_SCRIPT = _FORGET + """
-- KEYS: order; ARGV: tag, now, max_entries, max_age (-1: none)
return evict(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
"""

ADD_SCRIPT = """
-- KEYS: order, digests, seq, ids; ARGV: tag, query id, digest, geometry, time, sample, hashes,
-- has source (0/1), source
local mine = redis.call('HGET', KEYS[4], ARGV[2])
if mine then  -- 'added': a retried call of ours (same digest)
  return {redis.call('HGET', ARGV[1] .. ':qd:e:' .. mine, 'd') == ARGV[3] and 'added' or 'exists'}
end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {'duplicate'} end
local n = tostring(redis.call('INCR', KEYS[3]))
local e = ARGV[1] .. ':qd:e:' .. n
redis.call('RPUSH', KEYS[1], n)
redis.call('HSET', e, 'q', ARGV[2], 's', ARGV[6], 'h', ARGV[7], 'd', ARGV[3], 'g', ARGV[4], 't', ARGV[5])
if ARGV[8] == '1' then redis.call('HSET', e, 'src', ARGV[9]) end
redis.call('HSET', KEYS[4], ARGV[2], n)
redis.call('HSET', KEYS[2], ARGV[3], n)
for h in string.gmatch(ARGV[7], '%S+') do redis.call('SADD', ARGV[1] .. ':qd:h:' .. h, n) end
return {'added'}
"""

FIND_SCRIPT = """
-- KEYS: digests; ARGV: tag, digest -> {query id, sample, hashes, digest, geometry, time, source} or {}
local n = redis.call('HGET', KEYS[1], ARGV[2])
if not n then return {} end
local f = redis.call('HMGET', ARGV[1] .. ':qd:e:' .. n, 'q', 's', 'h', 'd', 'g', 't', 'src')
return {f[1], f[2], f[3], f[4], f[5], f[6], f[7] or false}
"""

CANDIDATES_SCRIPT = """
-- KEYS: order; ARGV: tag, geometry, min_shared, verify_limit, hashes...
-- -> per candidate, newest first: {query id, shared, digest, time, source or false, sample, hashes}
--    (sample and hashes empty past the first verify_limit)
local tag = ARGV[1]
local counts, ids = {}, {}
for i = 5, #ARGV do
  for _, n in ipairs(redis.call('SMEMBERS', tag .. ':qd:h:' .. ARGV[i])) do
    if counts[n] then counts[n] = counts[n] + 1 else counts[n] = 1; ids[#ids + 1] = n end
  end
end
local min_shared, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local found = {}
for _, n in ipairs(ids) do
  if counts[n] >= min_shared and redis.call('HGET', tag .. ':qd:e:' .. n, 'g') == ARGV[2] then
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
"""


def _geometry(geometry: tuple[int, int]) -> str:
    return f"{int(geometry[0])},{int(geometry[1])}"


def _entry(query_id: bytes, sample: bytes, hashes: bytes, digest: bytes, geometry: tuple[int, int],
           time: bytes, source: bytes | None) -> Entry:
    fp = Fingerprint(geometry, digest, np.frombuffer(sample, np.uint8),
                     tuple(int(h) for h in hashes.split()))
    return Entry(query_id.decode(), None if source is None else source.decode("utf-8"), float(time), fp)


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
        self._evict = self.client.register_script(EVICT_SCRIPT)
        self._add = self.client.register_script(ADD_SCRIPT)
        self._find = self.client.register_script(FIND_SCRIPT)
        self._candidates = self.client.register_script(CANDIDATES_SCRIPT)

    def __len__(self) -> int:
        return int(self.client.llen(self.order_key))

    def find_digest(self, digest: bytes) -> Entry | None:
        found: list[Any] = self._find(keys=[self.digests_key], args=[self.tag, digest])
        if not found:
            return None
        query_id, sample, hashes, digest, geometry, time, source = found
        height, width = geometry.split(b",")
        return _entry(query_id, sample, hashes, digest, (int(height), int(width)), time, source)

    def candidates(self, geometry: tuple[int, int], hashes: tuple[int, ...],
                   min_shared: int) -> list[tuple[Entry, int]]:
        rows = self._candidates(keys=[self.order_key],
                                args=[self.tag, _geometry(geometry), min_shared, self.verify_limit,
                                      *(str(h) for h in hashes)])
        return [(_entry(query_id, sample, entry_hashes, digest, geometry, time, source), int(shared))
                for query_id, shared, digest, time, source, sample, entry_hashes in rows]

    def add(self, entry: Entry) -> None:
        fp = entry.fingerprint
        answer = self._add(
            keys=[self.order_key, self.digests_key, self.seq_key, self.ids_key],
            args=[self.tag, entry.query_id, fp.digest, _geometry(fp.geometry), repr(float(entry.time)),
                  np.ascontiguousarray(fp.sample, np.uint8).tobytes(), " ".join(str(h) for h in fp.hashes),
                  int(entry.source is not None), entry.source or ""],
        )
        if answer[0] == b"exists":
            raise ValueError(f"query detector: query id {entry.query_id!r} is already remembered")

    def evict(self, now: float, max_entries: int, max_age_s: float | None) -> int:
        age = -1.0 if max_age_s is None else float(max_age_s)
        return int(self._evict(keys=[self.order_key], args=[self.tag, repr(float(now)), max_entries, repr(age)]))

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
