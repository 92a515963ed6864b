"""The batch job's reputation reduce (phase 2) and responses (phase 3), without Ray.

Sources are split over shards by :func:`reputation_shard` (crc32, stable across processes and
runs). :func:`split_staging` turns a staging table into each shard's Algorithm-2 events (error
rows are not events, only counted); a :class:`ReputationShard` (the state of one Ray actor)
collects them, replays its sources in (timestamp, image_id) order (:func:`replay_source_rows`)
and keeps each event's response by (shard, row) for :func:`respond`, which gives every staging
row its response and writes the images table.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import pyarrow as pa

from twostream import storage
from twostream.batch.outputs import images_table, images_uri, source_table, sources_uri
from twostream.core.config import ReputationConfig
from twostream.core.labels import Response, Verdict
from twostream.core.reputation import Upload, replay

# One shard's events for one reputation shard: (staging rows, their uploads, sources of error rows).
Events = tuple[list[int], list[Upload], list[str]]


def reputation_shard(source: str, shards: int) -> int:
    """Stable shard of a source id (crc32), the same in every process and run."""
    return zlib.crc32(source.encode("utf-8")) % shards


def uploads_from_staging(table: pa.Table) -> tuple[list[int], list[Upload]]:
    """The Algorithm-2 events of a staging table (error rows are not events): (rows, uploads)."""
    cols = table.select(["row", "source", "timestamp", "image_id", "verdict", "label"]).to_pydict()
    rows, uploads = [], []
    for k in range(table.num_rows):
        verdict = cols["verdict"][k]
        if verdict == Verdict.ERROR:
            continue
        rejected = verdict != Verdict.ACCEPTED
        rows.append(cols["row"][k])
        uploads.append(
            Upload(
                source=cols["source"][k],
                timestamp=float(cols["timestamp"][k]),
                image_id=cols["image_id"][k],
                rejected=rejected,
                verdict=str(Response.ADVERSARIAL) if rejected else cols["label"][k],
            )
        )
    return rows, uploads


def split_staging(table: pa.Table, parts: int) -> dict[int, Events]:
    """A staging table's events and error sources, grouped by reputation shard."""
    by_part: dict[int, Events] = defaultdict(lambda: ([], [], []))
    for row, upload in zip(*uploads_from_staging(table)):
        events = by_part[reputation_shard(upload.source, parts)]
        events[0].append(row)
        events[1].append(upload)
    for source, verdict in zip(table.column("source").to_pylist(), table.column("verdict").to_pylist()):
        if verdict == Verdict.ERROR:
            by_part[reputation_shard(source, parts)][2].append(source)
    return dict(by_part)


def replay_source_rows(
    uploads: Sequence[Upload], errors_by_source: dict[str, int], config: ReputationConfig
) -> tuple[list, pa.Table]:
    """Replay (Algorithm 2 in (timestamp, image_id) order per source): responses and source rows."""
    responses, ledger = replay(uploads, config)
    names = sorted(set(s for s, _ in ledger.items()) | set(errors_by_source))
    table = source_table(
        [(name, ledger.get(name), errors_by_source.get(name, 0)) for name in names]
    )
    return responses, table


class ReputationShard:
    """Holds the Algorithm-2 events of the sources that hash to it; replays them at the end."""

    def __init__(self, part: int, config: ReputationConfig) -> None:
        self.part = part
        self.config = config
        self.refs: list[tuple[str, int]] = []
        self.uploads: list[Upload] = []
        self.errors: Counter = Counter()
        self.responses: dict[str, dict[int, tuple]] = {}

    def add(self, shard: str, rows: list[int], uploads: list[Upload], error_sources: list[str]) -> int:
        """Take one input shard's events (and its error rows' sources); returns the event count."""
        self.refs.extend((shard, r) for r in rows)
        self.uploads.extend(uploads)
        self.errors.update(error_sources)
        return len(rows)

    def finish(self, output: str) -> dict:
        """Replay, keep each event's response and write this shard's ``sources`` part."""
        responses, table = replay_source_rows(self.uploads, dict(self.errors), self.config)
        for (shard, row), resp in zip(self.refs, responses):
            self.responses.setdefault(shard, {})[row] = (resp.response, resp.cc, resp.blacklisted)
        storage.write_parquet(table, sources_uri(output, self.part))
        return {
            "sources": table.num_rows,
            "blacklisted": int(sum(table.column("blacklisted").to_pylist())),
            "events": len(self.uploads),
        }

    def responses_for(self, shard: str) -> dict[int, tuple]:
        """(response, cc, blacklisted) by staging row of one input shard, after :meth:`finish`."""
        return self.responses.get(shard, {})


def respond(staging: pa.Table, responses: dict[int, tuple], output: str, shard: str) -> dict:
    """Write a shard's images table: each staging row with its (response, cc, blacklisted) from
    ``responses`` (by row; error rows answer ``error``). Returns the shard's counts."""
    verdicts = staging.column("verdict").to_pylist()
    response, cc, blacklisted = [], [], []
    for row, verdict in zip(staging.column("row").to_pylist(), verdicts):
        if verdict == Verdict.ERROR:
            answer = (Response.ERROR, None, None)
        else:
            answer = responses[row]  # KeyError = a lost event: fail loudly rather than drop it
        response.append(str(answer[0]))
        cc.append(answer[1])
        blacklisted.append(answer[2])
    images = images_table(staging, response, cc, blacklisted)
    storage.write_parquet(images, images_uri(output, shard))
    return {"rows": images.num_rows, "verdict": Counter(verdicts), "response": Counter(response)}
