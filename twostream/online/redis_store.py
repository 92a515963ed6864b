"""Algorithm 2 online, in Redis: :class:`RedisReputation`, shared by every ingress replica.

One image of a source is one call of :data:`~twostream.core.reputation.OBSERVE_SCRIPT`
(``twostream/core/reputation/observe.lua``), a server-side Lua script (loaded once, called by
EVALSHA): Redis runs a script atomically, so concurrent requests from one source, on any number
of ingress replicas, are applied one after the other with no lost increment and no ordering
tickets. **The order of a source's images is the order in which Redis
applies the scripts**; the script stamps each image with the Redis server's clock, made strictly
increasing per source (``timestamp``), and returns the source's sequence number (``images`` after
the step), so a sequential replay in ``(timestamp, image_id)`` order, or in sequence order, gives
the same states and responses (SPEC 3). The state is per Algorithm-2 key
(:func:`~twostream.core.reputation.reputation_key`: the source id, or its network under
``reputation.group_by_prefix``), mapped once in :meth:`RedisReputation.script_call`; the admin reads
(``get``, ``reset``, ``list``, ``export``) name keys as stored.

Keys (all under the hash tag ``{prefix}``, so a Redis Cluster keeps them in one slot):

* ``{prefix}:s:<hex of the UTF-8 source id>`` - a hash per source: ``cc``, ``bl`` (0/1),
  ``images``, ``rejected``, ``blocked``, ``errors``, ``first_seen``, ``last_seen``,
  ``intervals`` (``joined,left;joined,left;joined`` - the last one open while listed) and
  ``times_blacklisted``. Timestamps are written with 17 significant digits: exact doubles. With
  ``reputation.forget_default`` a source back at CC 0 and not listed has no hash and is not in
  ``sources`` (its counts and sequence numbers start again from its next image).
* ``{prefix}:sources`` / ``{prefix}:blacklist`` - sorted sets (score 0, so ordered by id) of
  every source and of the sources on the blacklist now.
* ``{prefix}:admin`` - a list of the last administrative changes (resets, imports) as JSON.
* ``{prefix}:img:<image_id>`` - the step's answer, kept ``DONE_TTL_S`` seconds: a call retried
  after a lost connection returns the answer of the first one instead of counting twice.

Redis unreachable: each call is retried for ``retry_s`` seconds, then :class:`StoreUnavailable`
(the endpoint answers 503). Durability is Redis's: see :mod:`twostream.online.redis_server`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

from twostream.core.config import ReputationConfig
from twostream.core.labels import Refusal
from twostream.core.reputation import OBSERVE_SCRIPT, Outcome, SourceState, reputation_key
from twostream.core.sources import SourceRow

log = logging.getLogger("twostream.reputation")

PASSWORD_ENV = "TWOSTREAM_REDIS_PASSWORD"
DONE_TTL_S = 3600
ADMIN_LOG = 1000
PAGE = 500
T = TypeVar("T")

class StoreUnavailable(RuntimeError):
    """Redis did not answer within the retry window."""


class Step(NamedTuple):
    """One image applied to its source: the response, the server's timestamp and the
    source's sequence number (1 for its first image)."""

    outcome: Outcome
    timestamp: float
    seq: int


def redact(url: str) -> str:
    """``url`` without its password (for logs and /healthz)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def encode_state(state: SourceState, errors: int) -> dict[str, str]:
    """The hash fields of a source (absent first/last seen stay absent)."""
    fields = {
        "cc": str(state.cc),
        "bl": "1" if state.blacklisted else "0",
        "images": str(state.images),
        "rejected": str(state.rejected),
        "blocked": str(state.blocked),
        "errors": str(errors),
        "intervals": ";".join(",".join(repr(float(t)) for t in iv if t is not None) for iv in state.intervals),
        "times_blacklisted": str(len(state.intervals)),
    }
    for name in ("first_seen", "last_seen"):
        value = getattr(state, name)
        if value is not None:
            fields[name] = repr(float(value))
    return fields


def decode_state(fields: dict[bytes, bytes]) -> tuple[SourceState, int]:
    """A source hash -> (its state, its error count)."""
    get = {k.decode(): v.decode() for k, v in fields.items()}
    intervals: list[list[float | None]] = []
    for entry in filter(None, get.get("intervals", "").split(";")):
        joined, _, left = entry.partition(",")
        intervals.append([float(joined), float(left) if left else None])
    state = SourceState(
        cc=int(get.get("cc", 0)),
        blacklisted=get.get("bl") == "1",
        images=int(get.get("images", 0)),
        rejected=int(get.get("rejected", 0)),
        blocked=int(get.get("blocked", 0)),
        first_seen=float(get["first_seen"]) if "first_seen" in get else None,
        last_seen=float(get["last_seen"]) if "last_seen" in get else None,
        intervals=intervals,
    )
    return state, int(get.get("errors", 0))


class RedisReputation:
    """The per-source state of Algorithm 2 in Redis (asyncio; one client per event loop).

    ``url``: ``redis://`` or ``rediss://`` (TLS); the password is the URL's, else
    ``$TWOSTREAM_REDIS_PASSWORD``.
    """

    def __init__(
        self,
        url: str,
        config: ReputationConfig | None = None,
        *,
        prefix: str = "twostream",
        timeout_s: float = 2.0,
        retry_s: float = 5.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.config = config or ReputationConfig()
        self.retry_s = retry_s
        self.client = aioredis.from_url(
            url,
            password=os.environ.get(PASSWORD_ENV) or None,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # retried here, within retry_s (safe: see DONE_TTL_S)
        )
        self._observe = self.client.register_script(OBSERVE_SCRIPT)
        self.tag = "{" + prefix + "}"
        self.sources_key = f"{self.tag}:sources"
        self.blacklist_key = f"{self.tag}:blacklist"

    def key(self, source: str) -> str:
        """The hash of ``source`` (hex of its UTF-8 bytes: any id is a safe key)."""
        return f"{self.tag}:s:{source.encode('utf-8').hex()}"

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, retried while Redis is unreachable, for up to ``retry_s`` seconds."""
        from redis.exceptions import ConnectionError, TimeoutError

        deadline = time.monotonic() + self.retry_s
        pause = 0.05
        while True:
            try:
                return await fn()
            except (ConnectionError, TimeoutError, OSError) as exc:
                if time.monotonic() + pause > deadline:
                    raise StoreUnavailable(f"Redis at {redact(self.url)} unreachable ({what}): {exc}") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    # -- the online step ------------------------------------------------------------------
    def script_call(self, source: str, image_id: str, rejected: bool) -> tuple[list[str], list[str | int]]:
        """The (keys, args) of one image's call of ``observe.lua``: the one place the endpoint maps
        a source id to its Algorithm-2 key (:func:`~twostream.core.reputation.reputation_key`)."""
        cfg = self.config
        key = reputation_key(source, cfg.group_by_prefix)
        keys = [self.key(key), self.sources_key, self.blacklist_key, f"{self.tag}:img:{image_id}"]
        args = [key, int(rejected), cfg.cap, cfg.threshold, cfg.step_up, cfg.step_down, DONE_TTL_S,
                int(cfg.forget_default)]
        return keys, args

    async def observe(self, source: str, image_id: str, rejected: bool, verdict: str) -> Step:
        """Apply one scored image of ``source`` (Algorithm 2, under the source's key); ``verdict`` is
        the answer unless blocked."""
        keys, args = self.script_call(source, image_id, rejected)
        blocked, cc, listed, seq, ts = await self._call("observe", lambda: self._observe(keys=keys, args=args))
        outcome = Outcome(response=Refusal.BLOCKED if blocked == b"1" else verdict, cc=int(cc), blacklisted=listed == b"1")
        return Step(outcome, float(ts), int(seq))

    # -- reads and admin ------------------------------------------------------------------
    async def get(self, source: str) -> SourceState | None:
        fields = await self._call("get", lambda: self.client.hgetall(self.key(source)))
        return decode_state(fields)[0] if fields else None

    async def reset(self, source: str) -> SourceState | None:
        """Forget ``source`` (an administrator's decision); returns its previous state."""

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.key(source)).delete(self.key(source))
                pipe.zrem(self.sources_key, source).zrem(self.blacklist_key, source)
                return await pipe.execute()

        fields = (await self._call("reset", run))[0]
        if fields:
            await self.note({"action": "reset", "source": source})
        return decode_state(fields)[0] if fields else None

    async def note(self, event: dict[str, Any]) -> None:
        """Log an administrative change, and keep it with the state (the last ``ADMIN_LOG`` of them)."""
        import json

        event = {"at": time.time(), **event}
        log.warning("reputation admin: %s", json.dumps(event))
        key = f"{self.tag}:admin"

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.lpush(key, json.dumps(event)).ltrim(key, 0, ADMIN_LOG - 1).execute()

        await self._call("note", run)

    async def counts(self) -> tuple[int, int]:
        """(sources known, sources on the blacklist)."""

        async def run() -> list[int]:
            async with self.client.pipeline(transaction=False) as pipe:
                return await pipe.zcard(self.sources_key).zcard(self.blacklist_key).execute()

        sources, blacklist = await self._call("counts", run)
        return int(sources), int(blacklist)

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis answers now (no retry)."""
        from redis.exceptions import RedisError

        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {redact(self.url)} unreachable: {exc}") from None

    async def _ids(self, key: str, after: str | None, count: int) -> list[str]:
        start = "-" if after is None else "(" + after
        members = await self._call("list", lambda: self.client.zrange(key, start, "+", bylex=True, offset=0, num=count))
        return [m.decode("utf-8") for m in members]

    async def _states(self, ids: list[str]) -> list[SourceRow]:
        """The rows of ``ids`` still there (a source reset since its id was read is left out)."""

        async def run() -> list[dict]:
            async with self.client.pipeline(transaction=False) as pipe:
                for source in ids:
                    pipe.hgetall(self.key(source))
                return await pipe.execute()

        hashes = await self._call("read", run)
        return [SourceRow(s, *decode_state(fields)) for s, fields in zip(ids, hashes) if fields]

    async def list(self, blacklisted: bool | None, limit: int) -> tuple[int, list[tuple[str, SourceState]]]:
        """(how many match, the first ``limit`` of them by id) for all, listed or unlisted sources."""
        sources, listed = await self.counts()
        total = {None: sources, True: listed, False: sources - listed}[blacklisted]
        key = self.blacklist_key if blacklisted else self.sources_key
        chosen: list[str] = []
        after: str | None = None
        while len(chosen) < limit:
            page = await self._ids(key, after, PAGE)
            if not page:
                break
            after = page[-1]
            if blacklisted is False:
                scores = await self._call("list", lambda p=page: self.client.zmscore(self.blacklist_key, p))
                page = [s for s, score in zip(page, scores) if score is None]
            chosen.extend(page[: limit - len(chosen)])
        return total, [(row.source, row.state) for row in await self._states(chosen)]

    async def export(self) -> list[SourceRow]:
        """Every source, by id (each page of ids read, then their hashes: a live store may move on)."""
        rows: list[SourceRow] = []
        after: str | None = None
        while page := await self._ids(self.sources_key, after, PAGE):
            after = page[-1]
            rows.extend(await self._states(page))
        return rows

    async def load(self, rows: Iterable[SourceRow], replace: bool = False) -> tuple[int, int]:
        """Write sources (each replaces the live state of the same id); ``replace``: forget every
        other source first. Returns (sources written, of which blacklisted)."""
        if replace:
            await self.clear()
        rows = list(rows)
        for start in range(0, len(rows), PAGE):
            chunk = rows[start : start + PAGE]

            async def run(chunk: list[SourceRow] = chunk) -> None:
                async with self.client.pipeline(transaction=True) as pipe:
                    for source, state, errors in chunk:
                        key = self.key(source)
                        pipe.delete(key).hset(key, mapping=encode_state(state, errors))
                        pipe.zadd(self.sources_key, {source: 0})
                        if state.blacklisted:
                            pipe.zadd(self.blacklist_key, {source: 0})
                        else:
                            pipe.zrem(self.blacklist_key, source)
                    await pipe.execute()

            await self._call("load", run)
        return len(rows), sum(1 for row in rows if row.state.blacklisted)

    async def clear(self) -> int:
        """Forget every source; returns how many there were."""
        ids = [row.source for row in await self.export()]
        for start in range(0, len(ids), PAGE):
            keys = [self.key(s) for s in ids[start : start + PAGE]]
            await self._call("clear", lambda keys=keys: self.client.delete(*keys))
        await self._call("clear", lambda: self.client.delete(self.sources_key, self.blacklist_key))
        return len(ids)

    async def check_config(self) -> None:
        """Record the Algorithm-2 parameters with the state; warn when the state was built with others."""
        import json

        wanted = json.dumps(self.config.model_dump(), sort_keys=True)
        key = f"{self.tag}:config"
        stored = await self._call("config", lambda: self.client.set(key, wanted, nx=True, get=True))
        if stored is not None and stored.decode() != wanted:
            log.warning("reputation state in %s was built with %s; applying %s from now on",
                        redact(self.url), stored.decode(), wanted)
            await self._call("config", lambda: self.client.set(key, wanted))

    async def close(self) -> None:
        await self.client.aclose()
