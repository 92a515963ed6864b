"""The sequential reference of Algorithm 2: :class:`ReputationLedger` applies one image at a time
(the online order); :func:`replay` sorts a finite set of uploads into ``(timestamp, image_id)``
order first, so its result does not depend on the order they arrived in (the batch order)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field


from twostream.core.config import ReputationConfig
from twostream.core.labels import Refusal

BLOCKED = Refusal.BLOCKED


@dataclass
class SourceState:
    """The standing of one source, plus counts for reports."""

    cc: int = 0
    blacklisted: bool = False
    images: int = 0
    rejected: int = 0
    blocked: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    # Blacklist intervals as [joined_at, left_at]; left_at is None while still listed.
    intervals: list[list[float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Upload:
    """One scored image as Algorithm 2 sees it."""

    source: str
    timestamp: float
    image_id: str
    rejected: bool
    verdict: str  # the comparator's answer: a CIFAR-10 label or "adversarial"

    @property
    def order_key(self) -> tuple[float, str]:
        return (self.timestamp, self.image_id)


@dataclass(frozen=True)
class Outcome:
    """What the server answers for one image, and the source's standing after it."""

    response: str
    cc: int
    blacklisted: bool


class ReputationLedger:
    """Per-source state of Algorithm 2, applied one image at a time (keyed by the upload's
    ``source``: callers map ids to keys first, :func:`twostream.core.reputation.keys.reputation_key`).
    With ``config.forget_default`` a source back at CC 0 and not listed is dropped (its counts too)."""

    def __init__(self, config: ReputationConfig | None = None) -> None:
        self.config = config or ReputationConfig()
        self._states: dict[str, SourceState] = {}

    def observe(self, upload: Upload) -> Outcome:
        """Apply one image of a source (in that source's time order) and return the response."""
        cfg = self.config
        state = self._states.setdefault(upload.source, SourceState())
        state.images += 1
        if state.first_seen is None:
            state.first_seen = upload.timestamp
        state.last_seen = upload.timestamp
        if upload.rejected:
            state.rejected += 1
            state.cc = min(state.cc + cfg.step_up, cfg.cap)
        else:
            state.cc = max(state.cc - cfg.step_down, 0)

        response = upload.verdict
        if state.blacklisted:
            if state.cc == 0:
                state.blacklisted = False
                state.intervals[-1][1] = upload.timestamp
            else:
                response = BLOCKED
        elif state.cc >= cfg.threshold:
            state.blacklisted = True
            state.intervals.append([upload.timestamp, None])
            response = BLOCKED
        if response == BLOCKED:
            state.blocked += 1
        if cfg.forget_default and state.cc == 0 and not state.blacklisted:
            del self._states[upload.source]  # the default standing needs no entry
        return Outcome(response=response, cc=state.cc, blacklisted=state.blacklisted)

    def get(self, source: str) -> SourceState:
        """The standing of ``source`` (a fresh state if it was never seen)."""
        return self._states.get(source, SourceState())

    def items(self) -> Iterator[tuple[str, SourceState]]:
        return iter(self._states.items())

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, source: object) -> bool:
        return source in self._states

    def blacklisted(self) -> list[str]:
        """Sources on the blacklist now, sorted."""
        return sorted(s for s, st in self._states.items() if st.blacklisted)

    def reset(self, source: str) -> None:
        """Forget a source entirely (an administrator's decision)."""
        self._states.pop(source, None)

    def snapshot(self) -> bytes:
        """Serialise the whole ledger (config included) to compressed JSON; equal state, equal bytes."""
        payload = {
            "version": 1,
            "config": self.config.model_dump(),
            "sources": {s: asdict(self._states[s]) for s in sorted(self._states)},
        }
        return zlib.compress(json.dumps(payload, separators=(",", ":")).encode())

    @classmethod
    def restore(cls, blob: bytes) -> "ReputationLedger":
        """Rebuild a ledger from :meth:`snapshot` bytes."""
        try:
            payload = json.loads(zlib.decompress(blob))
        except (zlib.error, ValueError) as exc:
            raise ValueError(f"not a twostream reputation snapshot: {exc}") from exc
        if payload.get("version") != 1:
            raise ValueError(f"unsupported snapshot version {payload.get('version')!r}")
        ledger = cls(ReputationConfig.model_validate(payload["config"]))
        ledger._states = {s: SourceState(**st) for s, st in payload["sources"].items()}
        return ledger


def replay(
    uploads: Iterable[Upload], config: ReputationConfig | None = None
) -> tuple[list[Outcome], ReputationLedger]:
    """Replay a finite set of uploads in ``(timestamp, image_id)`` order per source.

    Returns the responses in the order the uploads were given, and the final ledger.
    The result does not depend on the order of ``uploads``.
    """
    uploads = list(uploads)
    ledger = ReputationLedger(config)
    responses: list[Outcome | None] = [None] * len(uploads)
    order = sorted(range(len(uploads)), key=lambda k: uploads[k].order_key)
    for k in order:
        responses[k] = ledger.observe(uploads[k])
    return responses, ledger  # type: ignore[return-value]
