"""``twostream reputation``: the endpoint's live reputation state (Redis) to and from Parquet in
the one sources schema (:data:`twostream.core.sources.SOURCES_SCHEMA`).

* ``export --to URI`` - every source, sorted by id, as one Parquet file (local path or s3://).
* ``import --from URI`` - a batch run (its output folder or its ``sources/``), a folder of
  parts, or one file such as an audit's ``sources.parquet``. An administrator's decision: each
  imported source replaces the live state of the same id, other live sources are kept; with
  ``--replace`` every live source is forgotten first. Logged, and noted in Redis.

Redis is ``serve.redis_url`` (``--redis-url``), else the embedded redis-server's directory
(``serve.redis_dir``) is opened here - which fails while a ``twostream serve`` holds it (use the
URL it printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

log = logging.getLogger("twostream.reputation")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser(
        "reputation", help="export/import the endpoint's reputation state (Parquet, the sources schema)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the live state as Parquet")
    export.add_argument("--to", dest="uri", required=True, help="Parquet file to write (local or s3://)")
    load = actions.add_parser("import", help="load sources (a batch run's sources/, an audit's sources.parquet)")
    load.add_argument("--from", dest="uri", required=True, help="file, folder of parts, or a batch run's output")
    load.add_argument("--replace", action="store_true", help="forget every live source first (else merge: "
                      "an imported source replaces the live one of the same id, others are kept)")
    for sub in (export, load):
        sub.add_argument("--redis-url", help="Redis holding the state (default serve.redis_url, else embedded)")
        add_config_args(sub)
        sub.set_defaults(run=run)


async def _export(store, uri: str) -> str:
    from twostream import storage
    from twostream.core.sources import source_table

    rows = await store.export()
    table = source_table(rows)
    storage.write_parquet(table, uri)
    listed = sum(1 for row in rows if row.state.blacklisted)
    return f"exported {len(rows)} sources ({listed} blacklisted) to {uri}"


async def _import(store, uri: str, replace: bool) -> str:
    from twostream.core.sources import read_sources, source_states

    rows = source_states(read_sources(uri))
    loaded, listed = await store.load(rows, replace=replace)
    mode = "replace" if replace else "merge"
    await store.note({"action": "import", "from": uri, "mode": mode, "sources": loaded, "blacklisted": listed})
    return f"imported {loaded} sources ({listed} blacklisted) from {uri} ({mode})"


def run(args: argparse.Namespace) -> int:
    from twostream.core.config import config_from_args
    from twostream.online.redis_server import EmbeddedRedis
    from twostream.online.redis_store import RedisReputation

    config = config_from_args(args, {"serve": {"redis_url": args.redis_url}})
    settings = config.serve
    with contextlib.ExitStack() as stack:
        url = settings.redis_url
        if not url:
            embedded = EmbeddedRedis(settings.redis_dir, appendfsync=settings.redis_appendfsync)
            url = stack.enter_context(embedded).url

        async def main() -> str:
            store = RedisReputation(url, config.reputation, prefix=settings.redis_prefix,
                                    timeout_s=settings.redis_timeout_s, retry_s=settings.redis_retry_s)
            try:
                if args.action == "export":
                    return await _export(store, args.uri)
                return await _import(store, args.uri, args.replace)
            finally:
                await store.close()

        print(asyncio.run(main()))
    return 0
