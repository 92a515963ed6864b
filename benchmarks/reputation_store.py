"""The Redis reputation store's size under identity rotation: N distinct source ids that send one
honest image each, with ``reputation.forget_default`` off (every id keeps a hash and a ``sources``
entry), on (a source back at CC 0 and not listed keeps no entry), and with
``reputation.group_by_prefix`` (``ipv6: 64``, ``forget_default`` off) for ids that are N distinct
IPv6 addresses of one /64; then L more ids that get themselves blacklisted (``threshold`` rejected
images each), to give the bytes per listed source.

    python benchmarks/reputation_store.py                      # N = 1,000,000, L = 100,000
    python benchmarks/reputation_store.py --n 1000000 10000000 --listed 100000

Each image is one EVALSHA of ``observe.lua`` with the keys and arguments the endpoint sends
(``RedisReputation.script_call``, the one place that maps a source to its Algorithm-2 key), into
the product's ``EmbeddedRedis`` (append-only file, appendfsync everysec), a fresh server per row.
The calls go ``--chunk`` at a time down one loopback socket as RESP (:class:`Pipe`): redis-py
without hiredis spends some 50 us of Python per pipelined call, which made 1M ids take an hour
here; the bytes written are checked equal to redis-py's own encoding of the same call, and every
reply is read and checked (an error reply stops the run, naming the source; the honest images
must all be accepted at CC 0, the listed sources must all end blacklisted).

Reported per mode and N: keys, ``used_memory`` above the empty server (read once it holds still:
:func:`used`), with the retry answers
(``img:<id>``, kept ``DONE_TTL_S`` = 1 h) and after they are gone (deleted here by name, as their
expiry would, each one checked present), bytes per id, then the growth the listed sources cause;
wall time per phase. Loopback only.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostream.core.config import PrefixGrouping, ReputationConfig  # noqa: E402
from twostream.core.reputation import OBSERVE_SCRIPT  # noqa: E402
from twostream.online.redis_server import EmbeddedRedis  # noqa: E402
from twostream.online.redis_store import RedisReputation  # noqa: E402

log = logging.getLogger("reputation_store")

# observe.lua's reply: blocked, cc, listed, seq, timestamp (all short decimal bulk strings)
OBSERVE_REPLY = re.compile(rb"\*5\r\n\$1\r\n([01])\r\n\$\d+\r\n(\d+)\r\n\$1\r\n([01])\r\n\$\d+\r\n\d+\r\n"
                           rb"\$\d+\r\n[0-9.e+-]+\r\n")
INTEGER_REPLY = re.compile(rb":(\d+)\r\n")
ERROR_REPLY = re.compile(rb"-([^\r\n]*)\r\n")
MODES = {
    "keep": ("forget_default off", dict(forget_default=False)),
    "forget": ("forget_default on", dict(forget_default=True)),
    "prefix": ("group_by_prefix ipv6 /64 (forget_default off), ids of one /64",
               dict(group_by_prefix=PrefixGrouping(ipv4=24, ipv6=64))),
}


def resp(*parts: str | int) -> bytes:
    """One command in RESP, as redis-py encodes it (strings UTF-8, integers in decimal)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = str(part).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Pipe:
    """Commands written down one socket ``chunk`` at a time, the next chunk sent before the
    replies of the last are read (so Redis has work while this process reads); every reply parsed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = bytearray()
        self.pos = 0

    def _replies(self, n: int, pattern: re.Pattern, names: list[str]) -> Iterable[re.Match]:
        """The next ``n`` replies, each matching ``pattern`` (``names``: what each call was, for errors)."""
        for k in range(n):
            while True:
                match = pattern.match(self.buffer, self.pos)
                if match:
                    break
                error = ERROR_REPLY.match(self.buffer, self.pos)
                if error:
                    message = error.group(1).decode(errors="replace")
                    raise RuntimeError(f"Redis refused the call for {names[k]}: {message}")
                if len(self.buffer) - self.pos > 4096:  # every reply expected here is under 100 bytes
                    head = bytes(self.buffer[self.pos: self.pos + 200])
                    raise RuntimeError(f"unexpected reply for {names[k]}: {head!r}")
                data = self.sock.recv(1 << 20)
                if not data:
                    raise RuntimeError(f"Redis closed the connection before answering {names[k]}")
                del self.buffer[: self.pos]
                self.pos = 0
                self.buffer += data
            self.pos = match.end()
            yield match

    def run(self, calls: Iterable[tuple[str, bytes]], chunk: int, pattern: re.Pattern,
            each: Callable[[re.Match], None]) -> int:
        """Send every (name, command) of ``calls``; ``each`` sees every reply; returns how many."""
        pending: list[str] = []
        total = 0
        batch: list[str] = []
        data: list[bytes] = []
        for name, command in calls:
            batch.append(name)
            data.append(command)
            if len(batch) == chunk:
                total += self._flush(batch, data, pending, pattern, each)
                pending, batch, data = batch, [], []
        total += self._flush(batch, data, pending, pattern, each)
        for match in self._replies(len(batch), pattern, batch):
            each(match)
        return total

    def _flush(self, batch: list[str], data: list[bytes], pending: list[str], pattern: re.Pattern,
               each: Callable[[re.Match], None]) -> int:
        self.sock.sendall(b"".join(data))
        for match in self._replies(len(pending), pattern, pending):
            each(match)
        return len(batch)

    def close(self) -> None:
        self.sock.close()


def image_ids(sources: Iterable[str], images: int) -> Iterable[tuple[str, str]]:
    """(source, image id) of each source's ``images`` images."""
    return ((source, f"{source}-{k}") for source in sources for k in range(images))


def observe_calls(store: RedisReputation, sha: str, images: Iterable[tuple[str, str]],
                  rejected: bool) -> Iterable[tuple[str, bytes]]:
    """Each (source, image id) as an EVALSHA call of observe.lua. The first call's bytes are checked
    equal to redis-py's encoding of the same call."""
    from redis.connection import Connection

    checked = False
    for source, image_id in images:
        keys, args = store.script_call(source, image_id, rejected)
        command = resp("EVALSHA", sha, len(keys), *keys, *args)
        if not checked:
            reference = b"".join(Connection().pack_command("EVALSHA", sha, len(keys), *keys, *args))
            if command != reference:
                raise RuntimeError(f"RESP encoding differs from redis-py's: {command!r} vs {reference!r}")
            checked = True
        yield source, command


def rehashing(client) -> bool:
    """Whether Redis holds two tables for db 0's keys or their TTLs (an incremental rehash under
    way): ``MEMORY STATS`` counts each dict as entries x (dictEntry [+ robj]) + slots x pointer, and
    the slots of one table are a power of two (64-bit Redis 7: 24, 16 and 8 bytes)."""
    with client.pipeline(transaction=True) as pipe:  # both read at one moment
        stats, keyspace = pipe.memory_stats().info("keyspace").execute()
    stats, db = stats.get("db.0"), keyspace.get("db0", {"keys": 0, "expires": 0})
    if not stats:
        return False
    main = (int(stats["overhead.hashtable.main"]) - int(db["keys"]) * (24 + 16)) // 8
    expires = (int(stats["overhead.hashtable.expires"]) - int(db["expires"]) * 24) // 8
    return any(slots & (slots - 1) for slots in (main, expires))


def used(client, quiet_s: int = 3, limit_s: float = 900.0) -> tuple[int, int, int, int]:
    """(used_memory, used_memory_rss, keys, keys with a TTL) of db 0, once no rehash is under way
    and ``used_memory`` has not changed for ``quiet_s`` seconds in a row: Redis grows and shrinks
    its key tables incrementally (two tables while it rehashes; a table emptied by deletions is
    shrunk a few seconds later), so a reading right after a phase can be transient."""
    deadline = time.monotonic() + limit_s
    last, same = -1, 0
    while same < quiet_s:
        if time.monotonic() > deadline:
            raise RuntimeError(f"used_memory did not settle within {limit_s:.0f} s")
        now = int(client.info("memory")["used_memory"])
        same = same + 1 if now == last and not rehashing(client) else 0
        last = now
        time.sleep(1.0)
    info = client.info()
    db = info.get("db0", {"keys": 0, "expires": 0})
    return int(info["used_memory"]), int(info["used_memory_rss"]), int(db["keys"]), int(db["expires"])


def drop_answers(pipe: Pipe, store: RedisReputation, images: Iterable[tuple[str, str]], chunk: int) -> None:
    """Delete the retry answers by name (what their TTL does an hour later), each one checked present."""
    per_command = 1000
    ids = (image_id for _, image_id in images)
    commands = ((f"answers {batch[0]}..{batch[-1]}", resp("UNLINK", *(f"{store.tag}:img:{i}" for i in batch)))
                for batch in iter(lambda: list(islice(ids, per_command)), []))
    deleted, sent = [0], [0]

    def count(match: re.Match) -> None:
        deleted[0] += int(match.group(1))

    def counted() -> Iterable[tuple[str, bytes]]:
        for name, command in commands:
            sent[0] += int(command[1: command.index(b"\r")]) - 1
            yield name, command

    pipe.run(counted(), max(1, chunk // per_command), INTEGER_REPLY, count)
    if deleted[0] != sent[0]:
        raise RuntimeError(f"{sent[0]:,} answers to delete, {deleted[0]:,} found")


def honest_ids(mode: str, ids: range) -> Iterable[str]:
    """Distinct source ids number ``ids``: IPv6 addresses of 2001:db8:0:1::/64 in mode ``prefix``, else names."""
    if mode == "prefix":
        return (f"2001:db8:0:1:0:{i >> 32 & 0xffff:x}:{i >> 16 & 0xffff:x}:{i & 0xffff:x}" for i in ids)
    return (f"honest-{i}" for i in ids)


def measure(mode: str, n: int, listed: int, chunk: int, aof: bool, expire_every: int) -> dict:
    """One row: a fresh embedded Redis (``aof``: its append-only file on, as the product runs it),
    ``n`` honest ids, their answers dropped (after every ``expire_every`` ids where that is below
    ``n``: then the figures with the answers kept are not taken), ``listed`` listed ids."""
    step = expire_every if 0 < expire_every < n else n
    import redis

    config = ReputationConfig(**MODES[mode][1])
    with tempfile.TemporaryDirectory() as directory, EmbeddedRedis(Path(directory)) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=600)
        if not aof:
            client.config_set("appendonly", "no")
        sha = client.script_load(OBSERVE_SCRIPT)
        store = RedisReputation(server.url, config, prefix="bench")
        client.execute_command("MEMORY", "PURGE")
        empty, _, _, _ = used(client)
        pipe = Pipe(server.port)
        try:
            replies: Counter = Counter()

            def tally(match: re.Match) -> None:
                replies[match.group(1, 2, 3)] += 1

            sent, seconds, drop_s = 0, 0.0, 0.0
            for lo in range(0, n, step):
                ids = range(lo, min(lo + step, n))
                t0 = time.perf_counter()
                sent += pipe.run(observe_calls(store, sha, image_ids(honest_ids(mode, ids), 1), False), chunk,
                                 OBSERVE_REPLY, tally)
                seconds += time.perf_counter() - t0
                if step == n:
                    mem, rss, keys, expires = used(client)
                t0 = time.perf_counter()
                drop_answers(pipe, store, image_ids(honest_ids(mode, ids), 1), chunk)
                drop_s += time.perf_counter() - t0
                if step < n:  # a measured point on the way (a run stopped short still has them)
                    now, _, now_keys, _ = used(client)
                    log.info("%s: %s ids sent, their answers dropped: %s keys, used_memory %.1f MB above the empty "
                             "server, %.1f B per id", mode, f"{ids.stop:,}", f"{now_keys:,}", (now - empty) / 2**20,
                             (now - empty) / ids.stop)
            if replies != Counter({(b"0", b"0", b"0"): n}):
                raise RuntimeError(f"{n:,} honest images: expected every one accepted at CC 0, got {dict(replies)}")
            if step < n:
                mem = rss = keys = expires = None
            mem_after, rss_after, keys_after, _ = used(client)
            replies.clear()
            t0 = time.perf_counter()
            bad = (f"bad-{i}" for i in range(listed))
            pipe.run(observe_calls(store, sha, image_ids(bad, config.threshold), True), chunk, OBSERVE_REPLY, tally)
            listed_s = time.perf_counter() - t0
            bad = (f"bad-{i}" for i in range(listed))
            drop_answers(pipe, store, image_ids(bad, config.threshold), chunk)
            mem_listed, _, keys_listed, _ = used(client)
            blacklist = client.zcard(store.blacklist_key)
            if blacklist != listed:
                raise RuntimeError(f"{listed:,} sources sent {config.threshold} rejected images each, "
                                   f"{blacklist:,} on the blacklist")
        finally:
            pipe.close()
            client.close()
    kept = mem is not None
    return dict(mode=mode, aof=aof, n=n, sent=sent, s=seconds, per_s=n / seconds, drop_s=drop_s, keys=keys,
                expires=expires, mb=(mem - empty) / 2**20 if kept else None,
                b_per_id=(mem - empty) / n if kept else None, rss_mb=rss / 2**20 if kept else None,
                keys_after=keys_after, mb_after=(mem_after - empty) / 2**20, b_per_id_after=(mem_after - empty) / n,
                rss_after_mb=rss_after / 2**20, listed=blacklist, listed_s=listed_s, keys_listed=keys_listed,
                b_per_listed=(mem_listed - mem_after) / max(listed, 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="distinct honest source ids")
    parser.add_argument("--listed", type=int, default=100_000, help="source ids that get blacklisted")
    parser.add_argument("--chunk", type=int, default=10_000, help="EVALSHA calls per round trip")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--expire-every", type=int, default=0, metavar="IDS",
                        help="drop the answers after every IDS ids (what their TTL does within the hour; caps "
                             "the server's peak on a small machine), not only at the end; no figures with "
                             "the answers kept then")
    parser.add_argument("--aof", choices=["on", "off"], default="on",
                        help="the append-only file (on: the product's EmbeddedRedis as it runs; off: less disk "
                             "and CPU for the largest N; used_memory does not hold the file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    for n in args.n:
        for mode in args.modes:
            row = measure(mode, n, args.listed, args.chunk, args.aof == "on", args.expire_every)
            log.info("%s", row)
            rows.append(row)
    header = ("| mode | append-only file | honest ids | keys (answers kept 1 h) | used_memory MB | B/id | "
              "keys after answers expire | used_memory MB | B/id | listed ids | B per listed id | EVALSHA/s | wall s |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in rows:
        kept = (f"{r['keys']:,} | {r['mb']:.1f} | {r['b_per_id']:.0f}" if r["keys"] is not None
                else "not taken | | ")
        print(f"| {MODES[r['mode']][0]} | {'on' if r['aof'] else 'off'} | {r['n']:,} | {kept} | "
              f"{r['keys_after']:,} | {r['mb_after']:.2f} | {r['b_per_id_after']:.1f} | {r['listed']:,} | "
              f"{r['b_per_listed']:.0f} | {r['per_s']:,.0f} | {r['s']:.0f} |")


if __name__ == "__main__":
    main()
