"""Algorithm 2 online: :class:`ReputationStore` (the ledger, per-source arrival order through
:class:`Ticket`, periodic snapshots to a path or ``s3://``). Lives in one event loop (the one
Reputation replica of the Serve app)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from twostream import storage
from twostream.core.config import ReputationConfig
from twostream.core.reputation import ReputationLedger, Response, SourceState, Upload

log = logging.getLogger("twostream.online")


@dataclass(frozen=True)
class Ticket:
    """A place in one source's arrival order, handed out when a request arrives."""

    epoch: str  # the store instance; tickets of a previous instance are re-issued
    source: str
    seq: int
    timestamp: float


class _SourceQueue:
    __slots__ = ("next_seq", "turn", "cancelled", "cond")

    def __init__(self) -> None:
        self.next_seq = 0  # next ticket to hand out
        self.turn = 0  # next ticket to apply
        self.cancelled: set[int] = set()
        self.cond = asyncio.Condition()


class ReputationStore:
    """Algorithm 2 online: arrival order per source, no lost updates, periodic snapshots.

    Meant to live in exactly one asyncio event loop (one Serve replica): ``reserve`` hands a
    request its place (and its timestamp, the arrival time, strictly increasing) when it
    arrives; ``commit`` applies its verdict with :meth:`ReputationLedger.observe` only when
    every earlier ticket of the same source was applied or cancelled, so the state and each
    response equal :func:`twostream.core.reputation.replay` over ``(timestamp, image_id)`` whatever
    order the scoring finishes in. Mutations happen between awaits of one loop, so there are no
    lost increments. ``cancel`` gives a place back (a decode error is not an Algorithm-2 event);
    a ticket not committed within ``order_timeout_s`` is skipped so a lost request cannot stall
    its source.

    Snapshots: ``snapshot_now`` writes :meth:`ReputationLedger.snapshot` to ``snapshot_uri``;
    ``run_periodic`` does it every ``period_s`` when the state changed; the owner calls
    ``close`` on shutdown. A crash loses at most the changes since the last snapshot.
    """

    def __init__(
        self,
        config: ReputationConfig | None = None,
        *,
        snapshot_uri: str | None = None,
        period_s: float = 30.0,
        order_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ReputationConfig()
        self.snapshot_uri = snapshot_uri
        self.period_s = period_s
        self.order_timeout_s = order_timeout_s
        self.clock = clock
        self.epoch = uuid.uuid4().hex
        self.ledger = ReputationLedger(self.config)
        self.restored_from: str | None = None
        if snapshot_uri and storage.exists(snapshot_uri):
            restored = ReputationLedger.restore(storage.read_bytes(snapshot_uri))
            if restored.config != self.config:
                log.warning(
                    "snapshot %s was taken with reputation config %s; continuing with %s",
                    snapshot_uri, restored.config.model_dump(), self.config.model_dump(),
                )
                restored.config = self.config
            self.ledger = restored
            self.restored_from = snapshot_uri
        self._queues: dict[str, _SourceQueue] = {}
        self._last_ts = max((st.last_seen or 0.0 for _, st in self.ledger.items()), default=0.0)
        self._version = 0  # bumped by every change
        self._saved_version = 0
        self.last_snapshot_at: float | None = None
        self._snapshot_lock = asyncio.Lock()
        self._periodic: asyncio.Task | None = None

    # -- ordering ------------------------------------------------------------------------

    def _queue(self, source: str) -> _SourceQueue:
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = _SourceQueue()
        return queue

    def reserve(self, source: str) -> Ticket:
        """The arrival of a request from ``source``: its place and timestamp."""
        now = round(self.clock(), 6)
        timestamp = now if now > self._last_ts else round(self._last_ts + 1e-6, 6)
        self._last_ts = timestamp
        queue = self._queue(source)
        seq = queue.next_seq
        queue.next_seq += 1
        return Ticket(self.epoch, source, seq, timestamp)

    def _advance(self, queue: _SourceQueue) -> None:
        while queue.turn in queue.cancelled:
            queue.cancelled.discard(queue.turn)
            queue.turn += 1

    async def cancel(self, ticket: Ticket) -> None:
        """Give the place back (the request produced no Algorithm-2 event)."""
        if ticket.epoch != self.epoch:
            return
        queue = self._queue(ticket.source)
        async with queue.cond:
            if ticket.seq >= queue.turn:
                queue.cancelled.add(ticket.seq)
                self._advance(queue)
                queue.cond.notify_all()

    async def commit(
        self, ticket: Ticket, image_id: str, rejected: bool, verdict: str
    ) -> tuple[Response, Ticket]:
        """Apply the verdict in the source's arrival order; returns (Response, Ticket used)."""
        if ticket.epoch != self.epoch:  # issued before a restart: take a new place now
            ticket = self.reserve(ticket.source)
        queue = self._queue(ticket.source)
        async with queue.cond:
            try:
                await asyncio.wait_for(
                    queue.cond.wait_for(lambda: queue.turn >= ticket.seq), self.order_timeout_s
                )
            except asyncio.TimeoutError:
                log.warning(
                    "source %r: tickets %d..%d were never committed; skipping them",
                    ticket.source, queue.turn, ticket.seq - 1,
                )
                queue.turn = max(queue.turn, ticket.seq)
            upload = Upload(ticket.source, ticket.timestamp, image_id, rejected, verdict)
            response = self.ledger.observe(upload)
            self._version += 1
            queue.turn = max(queue.turn, ticket.seq + 1)
            self._advance(queue)
            queue.cond.notify_all()
        return response, ticket

    # -- reads and admin -----------------------------------------------------------------

    def get(self, source: str) -> SourceState | None:
        return self.ledger._states.get(source) if source in self.ledger else None

    def list(self, blacklisted: bool | None = None, limit: int = 1000) -> tuple[int, list[tuple[str, SourceState]]]:
        rows = [
            (s, st) for s, st in sorted(self.ledger.items())
            if blacklisted is None or st.blacklisted == blacklisted
        ]
        return len(rows), rows[:limit]

    def reset(self, source: str) -> SourceState | None:
        previous = self.get(source)
        if previous is not None:
            self.ledger.reset(source)
            self._version += 1
        return previous

    def counts(self) -> tuple[int, int]:
        """(sources, blacklist size)."""
        return len(self.ledger), sum(1 for _, st in self.ledger.items() if st.blacklisted)

    # -- persistence ---------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._version != self._saved_version

    async def snapshot_now(self) -> bool:
        """Write a snapshot if there is a target; returns whether one was written."""
        if not self.snapshot_uri:
            return False
        async with self._snapshot_lock:
            version = self._version
            blob = self.ledger.snapshot()  # consistent: no await between reading and serialising
            await asyncio.to_thread(storage.write_bytes, self.snapshot_uri, blob)
            self._saved_version = version
            self.last_snapshot_at = self.clock()
        return True

    def snapshot_sync(self) -> bool:
        """The same without an event loop (shutdown paths)."""
        if not self.snapshot_uri:
            return False
        version = self._version
        storage.write_bytes(self.snapshot_uri, self.ledger.snapshot())
        self._saved_version = version
        self.last_snapshot_at = self.clock()
        return True

    async def run_periodic(self) -> None:
        """Snapshot every ``period_s`` when something changed (errors are logged, not fatal)."""
        while True:
            await asyncio.sleep(self.period_s)
            if self.dirty:
                try:
                    await self.snapshot_now()
                except Exception:  # keep serving; the next period tries again
                    log.exception("reputation snapshot to %s failed", self.snapshot_uri)

    def start(self) -> None:
        """Start the periodic snapshots in the running loop (idempotent)."""
        if self.snapshot_uri and (self._periodic is None or self._periodic.done()):
            self._periodic = asyncio.get_running_loop().create_task(self.run_periodic())

    async def close(self) -> None:
        """Stop the periodic task and write a final snapshot when the state changed."""
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        if self.dirty:
            await self.snapshot_now()
