"""The black-box evaluation harness (issue 30): query attacks against the answer function of the
endpoint, counted query by query, from rotating identities, and transfer attacks from surrogates.

* **Oracles** answer uploads (uint8 RGB arrays) from source ids: :class:`LocalOracle` is the
  endpoint's answer function in process (the scoring core :class:`~twostream.core.scoring.Scorer`,
  the query detector :class:`~twostream.core.query_detector.QueryDetector` with a
  ``MemoryStore``, Algorithm 2 :class:`~twostream.core.reputation.ReputationLedger`);
  :class:`HttpOracle` posts to a running ``twostream serve``.
* **What the attacker sees** (``detail``, the names of ``serve.answer_detail``): ``full`` both
  streams' top-k, ``label`` the CIFAR-10 label or the refusal, ``verdict`` accepted/rejected.
  :func:`attacker_scores` turns an answer into the class scores an ART attack reads so that it
  pursues the platform's notion of success: accepted with a wrong label (a refusal looks like the
  true class, never like progress).
* **Identities** (:func:`source_for`): query ``k`` comes from ``k mod n`` of ``n`` ids, or from
  its own address in one IPv6 /64 (``ipv6-64``); with ``group_prefix`` Algorithm 2 and the
  detector's rule 3 count per network (:func:`~twostream.core.reputation.reputation_key`, IPv4
  /24 and IPv6 /64), as an endpoint with ``reputation.group_by_prefix`` does.
* **Success**: an answered query accepted with a wrong label within ``eps`` (L-inf, on the
  uint8 upload) of the original. :class:`Campaign` counts every query, stops at the budget or
  at the first success, and records the first detection.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from twostream.core.config import PrefixGrouping
from twostream.core.labels import CIFAR10_LABELS, Refusal
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig
from twostream.core.reputation import identity_key

log = logging.getLogger(__name__)

DETAILS = ("full", "label", "verdict")
IDENTITIES = ("1", "10", "100", "1000", "ipv6-64")


@dataclass(frozen=True)
class Answer:
    """The endpoint's answer to one upload: ``response`` is a CIFAR-10 label (accepted) or a
    refusal (``adversarial``, ``query_attack``, ``blocked``); ``high``/``low`` each stream's
    top-k as (CIFAR-10 label or ``other``, probability)."""

    response: str
    high: tuple[tuple[str, float], ...] = ()
    low: tuple[tuple[str, float], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.response in CIFAR10_LABELS


class Oracle(Protocol):
    """Answers uploads in order, each from its source id."""

    def ask(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> list[Answer]: ...


PREFIXES = PrefixGrouping(ipv4=24, ipv6=64)  # the networks of ``group_prefix``


def source_for(identities: str, run: str, k: int) -> str:
    """The source id of query ``k`` of run ``run`` (a short tag; run ids must differ between runs
    that share one oracle's state): ``"n"`` rotates over n ids, ``ipv6-64`` uses a fresh address of
    the run's /64 for every query."""
    if identities == "ipv6-64":
        net = int.from_bytes(run.encode()[-4:].rjust(4, b"\0"), "big")
        return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (net << 64) | (k + 1)))
    n = int(identities)
    if n < 1:
        raise ValueError(f"identities must be a positive count or 'ipv6-64', got {identities!r}")
    return f"bb-{run}-{k % n}"


class LocalOracle:
    """The endpoint's answer function in process: the query detector first (a match answers
    ``query_attack`` without a forward pass, as the model's answer would not be used), then both
    streams and Algorithm 1, then Algorithm 2 per source (or per network with ``group_prefix``).
    ``detector``: the detector's rules (a fresh in-memory detector is built with them, its rule 3
    counting per the same key as Algorithm 2), None: no detector. Each query advances the clock
    by ``tick_s``. ``detections`` counts the images the detector flagged (a blacklisted source's
    answer stays ``blocked``)."""

    def __init__(self, scorer: Any, *, detector: QueryDetectorConfig | None = None, reputation: Any | None = None,
                 group_prefix: bool = False, tick_s: float = 0.01) -> None:
        from twostream.core.reputation import ReputationLedger

        self.scorer = scorer
        self.key = identity_key(PREFIXES if group_prefix else None)
        self.detector = QueryDetector(detector, source_key=self.key) if detector is not None else None
        self.ledger = ReputationLedger(reputation or scorer.config.reputation)
        self.tick_s = tick_s
        self.now = 0.0
        self.count = 0
        self.detections = 0

    def ask(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> list[Answer]:
        from twostream.core.labels import Verdict
        from twostream.core.reputation import Upload

        ids, flagged, times = [], [], []
        for image, source in zip(images, sources):
            self.count += 1
            self.now += self.tick_s
            ids.append(f"q{self.count:08d}")
            times.append(self.now)
            hit = False
            if self.detector is not None:
                _, hit = self.detector.detect(image, source=source, query_id=ids[-1], now=self.now)
                self.detections += hit
            flagged.append(hit)
        scored = [k for k, hit in enumerate(flagged) if not hit]
        batch = self.scorer.score([images[k] for k in scored], [ids[k] for k in scored]) if scored else None
        rows = {k: batch.row(j) for j, k in enumerate(scored)} if batch is not None else {}
        answers = []
        for k, source in enumerate(sources):
            row = rows.get(k)
            if row is None:
                verdict, rejected, high, low = Verdict.QUERY_ATTACK, True, (), ()
            else:
                if row.error is not None:
                    raise ValueError(f"query {ids[k]} from {source!r} could not be scored: {row.error}")
                verdict = row.label if row.verdict == Verdict.ACCEPTED else Verdict.ADVERSARIAL
                rejected = row.verdict != Verdict.ACCEPTED
                high = tuple(zip(row.high_labels, row.high_prob))
                low = tuple(zip(row.low_labels, row.low_prob))
            outcome = self.ledger.observe(Upload(self.key(source), times[k], ids[k], rejected, str(verdict)))
            answers.append(Answer(str(outcome.response), high if outcome.response != Refusal.BLOCKED else (),
                                  low if outcome.response != Refusal.BLOCKED else ()))
        return answers


class HttpOracle:
    """A running ``twostream serve``: each upload a lossless PNG posted to ``/v1/classify`` with
    its source in ``X-Source-Id``, one request at a time, in order; the answer is the body's
    ``response`` (200, or 403 ``blocked``), any other reply an error naming the source.
    ``tally`` counts the answers per source, for :func:`server_agreement`; with ``record`` every
    (upload, source, response) is kept in ``sent``, to replay through a :class:`LocalOracle`."""

    def __init__(self, base_url: str, timeout_s: float = 60.0, record: bool = False) -> None:
        import requests

        self.base = base_url.rstrip("/")
        self.session = requests.Session()
        self.timeout_s = timeout_s
        self.tally: dict[str, Counter[str]] = {}
        self.record = record
        self.sent: list[tuple[np.ndarray, str, str]] = []

    def ask(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> list[Answer]:
        from PIL import Image

        answers = []
        for image, source in zip(images, sources):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG", compress_level=1)
            reply = self.session.post(f"{self.base}/v1/classify", data=buf.getvalue(), timeout=self.timeout_s,
                                      headers={"Content-Type": "image/png", "X-Source-Id": source})
            body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
            if reply.status_code in (200, 403) and isinstance(body.get("response"), str):
                # 403: a blacklisted source ("blocked"); a reduced answer detail leaves the top-k out.
                answers.append(Answer(body["response"],
                                      tuple((e["cifar10"], e["prob"]) for e in body.get("high_topk") or ()),
                                      tuple((e["cifar10"], e["prob"]) for e in body.get("low_topk") or ())))
                self.tally.setdefault(source, Counter())[body["response"]] += 1
                if self.record:
                    self.sent.append((image, source, body["response"]))
            else:
                raise RuntimeError(
                    f"{self.base}: upload from {source!r} answered {reply.status_code}: {reply.text[:300]}")
        return answers


def server_agreement(tally: dict[str, Counter[str]], listing: Sequence[dict[str, Any]]) -> list[str]:
    """Where a server's per-source standing (``GET /v1/sources`` rows: ``images``, ``rejected``,
    ``blocked``) disagrees with the answers the harness got from each source (``tally``); empty
    when they agree. Per source: images = answers; blocked = ``blocked`` answers; rejected lies
    between the ``adversarial`` + ``query_attack`` answers and that plus the ``blocked`` ones (a
    blocked image is still scored, and its verdict hidden from the client)."""
    rows = {row["source"]: row for row in listing}
    problems = []
    for source, answers in sorted(tally.items()):
        row = rows.get(source)
        if row is None:
            problems.append(f"{source}: {sum(answers.values())} answers, but the server lists no such source")
            continue
        refused = answers[Refusal.ADVERSARIAL] + answers[Refusal.QUERY_ATTACK]
        if row["images"] != sum(answers.values()):
            problems.append(f"{source}: server counts {row['images']} images, harness {sum(answers.values())}")
        if row["blocked"] != answers[Refusal.BLOCKED]:
            problems.append(f"{source}: server counts {row['blocked']} blocked, harness {answers[Refusal.BLOCKED]}")
        if not refused <= row["rejected"] <= refused + answers[Refusal.BLOCKED]:
            problems.append(f"{source}: server counts {row['rejected']} rejected, harness saw {refused} refused "
                            f"and {answers[Refusal.BLOCKED]} blocked")
    return problems


def attacker_scores(answer: Answer, detail: str, label: int) -> np.ndarray:
    """The 10 class scores (summing to 1) an attack reads from ``answer`` at answer detail
    ``detail`` when attacking an image of true class ``label``.

    Accepted with another label: that label's one-hot (the attacker's success; at ``verdict``
    every acceptance looks like one, as the label is not shown: the class after ``label`` stands
    for it). Anything else scores the true class highest: at ``label``/``verdict`` its one-hot;
    at ``full`` the other classes get 0.49 x their mean probability over the two streams' top-k
    and the true class the rest, so that evidence for a wrong class lowers the true class's score
    (the signal a score-based attack follows) without ever overtaking it.
    """
    if detail not in DETAILS:
        raise ValueError(f"answer detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    out = np.zeros(len(CIFAR10_LABELS), np.float32)
    if answer.accepted and (detail == "verdict" or CIFAR10_LABELS.index(answer.response) != label):
        out[CIFAR10_LABELS.index(answer.response) if detail != "verdict" else (label + 1) % len(out)] = 1.0
        return out
    if detail == "full":
        for stream in (answer.high, answer.low):
            for name, prob in stream:
                if name in CIFAR10_LABELS and CIFAR10_LABELS.index(name) != label:
                    out[CIFAR10_LABELS.index(name)] += 0.49 * 0.5 * float(prob)
    out[label] = 1.0 - out.sum()
    return out


class BudgetSpent(Exception):
    """The run's query budget is used up."""


class Succeeded(Exception):
    """A query was accepted with a wrong label within the budget: the attacker stops."""


class Detected(Exception):
    """The detector answered ``query_attack`` and the run was told to stop there (to measure the
    queries to the first detection on more images for the same cost)."""


@dataclass
class RunResult:
    """One attacked image: every query counted, the first success and first detection (1-based
    query numbers; None when none happened)."""

    attack: str
    detail: str
    identities: str
    detector: bool
    image_id: str
    label: int
    budget: int
    queries: int = 0
    success_query: int | None = None
    first_detection: int | None = None
    responses: dict[str, int] = field(default_factory=dict)
    distinct_sources: int = 0
    wall_s: float = 0.0
    adaptive: str = ""
    restarts: int = 0
    # success | budget | detected | attack (ended on its own) | interrupted | no-start (no candidate
    # photograph accepted as another class: for the first start, or for a restart when restarts > 0)
    stopped: str = ""

    def key(self) -> tuple:
        """The run's identity in a campaign: its cell, its image and its budget."""
        return (self.attack, self.detail, self.identities, self.detector, self.adaptive, self.image_id, self.budget)

    @property
    def success(self) -> bool:
        return self.success_query is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), success=self.success)


@dataclass(frozen=True)
class CampaignSettings:
    """How one :class:`Campaign` plays: what the attacker sees (``detail``), from which
    ``identities`` (:func:`source_for`, with ``run`` in the ids), how many queries (``budget``),
    the L-inf ``eps`` in [0, 1] of a success, whether uploads are projected onto that ball
    (``project``) and re-randomised (``perturb``), and whether it ends at the first detection."""

    detail: str
    identities: str
    budget: int
    eps: float
    run: str
    project: bool
    perturb: Callable[[np.ndarray], np.ndarray] | None = None
    stop_at_detection: bool = False


class Campaign:
    """One attacker against one image: turns the attack's float queries into uploads (projected
    onto the L-inf ball when ``project``, re-randomised by ``perturb``, rounded to uint8), sends
    them from the declared identities, counts them, and scores the answers for the attack."""

    def __init__(self, oracle: Oracle, original: np.ndarray, label: int, settings: CampaignSettings, *,
                 result: RunResult, progress: Callable[[int], None] | None = None) -> None:
        self.oracle = oracle
        self.original = original
        self.label = label
        self.detail = settings.detail
        self.identities = settings.identities
        self.budget = settings.budget
        self.eps_u8 = int(np.floor(settings.eps * 255 + 1e-6))
        self.run = settings.run
        self.project = settings.project
        self.perturb = settings.perturb
        self.result = result
        self.stop_at_detection = settings.stop_at_detection
        self.progress = progress
        self.sources: set[str] = set()
        self.low = np.clip(original.astype(np.int16) - self.eps_u8, 0, 255).astype(np.uint8)
        self.high = np.clip(original.astype(np.int16) + self.eps_u8, 0, 255).astype(np.uint8)

    def upload(self, x: np.ndarray) -> np.ndarray:
        """A float (H, W, 3) query in [0, 1] as the uint8 image the attacker sends."""
        image = np.clip(np.round(np.asarray(x, np.float64) * 255), 0, 255).astype(np.uint8)
        if self.perturb is not None:
            image = self.perturb(image)
        if self.project:
            image = np.clip(image, self.low, self.high)
        return image

    def send(self, images: Sequence[np.ndarray]) -> list[Answer]:
        """Send uint8 uploads (as many as the budget allows; raises :class:`BudgetSpent` after
        the last one it may send, :class:`Succeeded` after a batch with a success)."""
        res = self.result
        room = self.budget - res.queries
        images = list(images)[: max(room, 0)]
        if not images:
            raise BudgetSpent
        sources = [source_for(self.identities, self.run, res.queries + k) for k in range(len(images))]
        answers = self.oracle.ask(images, sources)
        if len(answers) != len(images):
            raise RuntimeError(f"oracle answered {len(answers)} of {len(images)} queries")
        self.sources.update(sources)
        res.distinct_sources = len(self.sources)
        for image, answer in zip(images, answers):
            res.queries += 1
            res.responses[answer.response] = res.responses.get(answer.response, 0) + 1
            if answer.response == Refusal.QUERY_ATTACK and res.first_detection is None:
                res.first_detection = res.queries
            wrong = answer.accepted and CIFAR10_LABELS.index(answer.response) != self.label
            if wrong and res.success_query is None and self.within(image):
                res.success_query = res.queries
        if self.progress is not None:
            self.progress(len(images))
        if res.success_query is not None:
            raise Succeeded
        if self.stop_at_detection and res.first_detection is not None:
            raise Detected
        if res.queries >= self.budget:
            raise BudgetSpent
        return answers

    def within(self, image: np.ndarray) -> bool:
        """Within the L-inf budget of the original (on uint8 values)."""
        return int(np.abs(image.astype(np.int16) - self.original).max()) <= self.eps_u8

    def predict(self, x: np.ndarray) -> np.ndarray:
        """ART's view: (N, H, W, 3) float queries -> (N, 10) scores."""
        answers = self.send([self.upload(q) for q in x])
        return np.stack([attacker_scores(a, self.detail, self.label) for a in answers])


def find_start(campaign: Campaign, candidates: Sequence[tuple[np.ndarray, int]]) -> np.ndarray | None:
    """A decision-based attack's starting point: the first candidate photograph (uint8, its true
    class) the oracle accepts as another class than the target's, as far as the attacker can see
    (at ``verdict``: accepted, and of another true class). Every try is a counted query."""
    for image, truth in candidates:
        if truth == campaign.label:
            continue
        answer = campaign.send([image])[0]
        if answer.accepted and (CIFAR10_LABELS.index(answer.response) != campaign.label
                                if campaign.detail != "verdict" else True):
            return image.astype(np.float32) / 255.0
    return None


def attack_image(
    attack: str,
    oracle: Oracle,
    original: np.ndarray,
    label: int,
    *,
    image_id: str,
    detail: str,
    identities: str,
    budget: int,
    eps: float,
    run: str,
    detector: bool,
    params: dict[str, Any] | None = None,
    candidates: Sequence[tuple[np.ndarray, int]] = (),
    adaptive: str = "",
    seed: int = 0,
    stop_at_detection: bool = False,
    restart: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run black-box ``attack`` on one uint8 image through ``oracle``; see :class:`Campaign`.

    ``adaptive``: ``""`` or a ``KIND:A`` of :func:`~twostream.attacks.blackbox.adaptive_perturbation`;
    the score-based attacks then spend ``eps`` less its margin on their own steps so that every
    upload stays in the ball.
    ``restart``: an attack that ends on its own before the budget is spent is run again (a fresh
    seed; a decision-based one from the first accepted candidate again), as an attacker with
    queries left would, until the budget, a success or an attack that sends nothing ends the run
    (``restarts`` counts them). ``progress`` is told the number of queries of each batch sent.
    A ``KeyboardInterrupt`` (the command turns SIGTERM into one) ends the run as ``interrupted``
    with what it counted so far: the caller records it and stops.
    """
    from twostream.attacks.blackbox import BLACKBOX_ATTACKS, adaptive_perturbation, run_blackbox

    spec = BLACKBOX_ATTACKS[attack]
    if detail not in spec.views:
        raise ValueError(f"attack {attack!r} works from answer detail {', '.join(spec.views)}, not {detail!r}")
    result = RunResult(attack, detail, identities, detector, image_id, label, budget, adaptive=adaptive)
    perturb, own_eps = None, eps
    if adaptive:
        perturb, margin = adaptive_perturbation(adaptive, np.random.default_rng(seed + 1))
        own_eps = eps - margin / 255.0
    settings = CampaignSettings(detail=detail, identities=identities, budget=budget, eps=eps, run=run,
                                project=spec.project, perturb=perturb, stop_at_detection=stop_at_detection)
    campaign = Campaign(oracle, original, label, settings, result=result, progress=progress)
    started = time.perf_counter()
    try:
        while True:
            start, sent = None, result.queries
            if spec.kind == "decision":
                start = find_start(campaign, candidates)
                if start is None:
                    raise RuntimeError(f"{image_id}: no candidate photograph was accepted as another class")
            run_blackbox(attack, original.astype(np.float32) / 255.0, label, campaign.predict, eps=own_eps,
                         params=params, x_init=start, seed=seed + 7919 * result.restarts)
            if not restart or result.queries == sent:
                break
            result.restarts += 1
        result.stopped = "attack"
    except Succeeded:
        result.stopped = "success"
    except BudgetSpent:
        result.stopped = "budget"
    except Detected:
        result.stopped = "detected"
    except KeyboardInterrupt:
        result.stopped = "interrupted"
    except RuntimeError as exc:
        if "no candidate" not in str(exc):
            raise
        result.stopped = "no-start"  # with restarts > 0: no candidate was accepted for a restart
    result.wall_s = round(time.perf_counter() - started, 2)
    return result


def one_per_run(results: Sequence[RunResult]) -> list[RunResult]:
    """One result per run key (:meth:`RunResult.key`), as a resumed campaign's ``runs.jsonl``
    holds an interrupted run and its rerun: a finished run wins, else the partial one that
    counted the most queries; first-seen order."""
    best: dict[tuple, RunResult] = {}
    for r in results:
        held = best.get(r.key())
        rank = (r.stopped != "interrupted", r.queries)
        if held is None or rank > (held.stopped != "interrupted", held.queries):
            best[r.key()] = r
    return list(best.values())


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per (attack, detail, identities, detector, adaptive): successes, the median
    queries to success and to the first detection, queries spent, wall time, and how many runs
    were interrupted before their end (their counts are partial)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in one_per_run(results):
        groups.setdefault((r.attack, r.detail, r.identities, r.detector, r.adaptive), []).append(r)
    rows = []
    for (attack, detail, identities, detector, adaptive), runs in groups.items():
        wins = [r.success_query for r in runs if r.success_query is not None]
        hits = [r.first_detection for r in runs if r.first_detection is not None]
        refusals: Counter[str] = Counter()
        for r in runs:
            refusals.update({k: v for k, v in r.responses.items() if k not in CIFAR10_LABELS})
        rows.append({
            "attack": attack, "detail": detail, "identities": identities, "detector": detector,
            "adaptive": adaptive, "n": len(runs), "success": len(wins),
            "median_queries_to_success": float(np.median(wins)) if wins else None,
            "detected": len(hits), "median_first_detection": float(np.median(hits)) if hits else None,
            "queries": int(sum(r.queries for r in runs)), "budget": runs[0].budget,
            "refusals": dict(refusals), "wall_s": round(sum(r.wall_s for r in runs), 1),
            "interrupted": sum(r.stopped == "interrupted" for r in runs),
        })
    return rows


def read_runs(lines: Sequence[str]) -> list[RunResult]:
    """:class:`RunResult` objects back from ``runs.jsonl`` lines (as :meth:`RunResult.to_dict` wrote them)."""
    out = []
    for line in lines:
        if line.strip():
            row = json.loads(line)
            row.pop("success", None)
            out.append(RunResult(**row))
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table."""
    head = ("| attack | sees | identities | detector | adaptive | success | median queries to success "
            "| detected | median queries to 1st detection | queries (budget/image) | wall s |")
    lines = [head, "|" + " --- |" * 11]
    fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    for r in rows:
        partial = f" ({r['interrupted']} interrupted)" if r["interrupted"] else ""
        lines.append(
            f"| {r['attack']} | {r['detail']} | {r['identities']} | {'on' if r['detector'] else 'off'} "
            f"| {r['adaptive'] or '-'} | {r['success']}/{r['n']}{partial} | {fmt(r['median_queries_to_success'])} "
            f"| {r['detected']}/{r['n']} | {fmt(r['median_first_detection'])} | {r['queries']} ({r['budget']}) "
            f"| {r['wall_s']:g} |")
    return "\n".join(lines)


def transfer(oracle: Oracle, x_adv: np.ndarray, labels: np.ndarray, ids: Sequence[str],
             run: str) -> list[dict[str, Any]]:
    """Score transferred images (uint8, crafted elsewhere) with the defence, one query each from a
    fresh source: accepted with a wrong label is a success."""
    answers = oracle.ask(list(x_adv), [f"tr-{run}-{k}" for k in range(len(x_adv))])
    return [{"image_id": i, "label": int(y), "response": a.response,
             "success": bool(a.accepted and CIFAR10_LABELS.index(a.response) != int(y))}
            for i, y, a in zip(ids, labels, answers)]


@dataclass(frozen=True)
class Grid:
    """The cells of a black-box table: every attack at each answer detail it can use, from each
    identity setting, with the detector off and on (and each adaptive mode)."""

    attacks: tuple[str, ...]
    details: tuple[str, ...] = DETAILS
    identities: tuple[str, ...] = ("1", "1000")
    detector: tuple[bool, ...] = (False, True)
    adaptive: tuple[str, ...] = ("",)
    budget: int = 10_000
    eps: float = 8 / 255
    group_prefix: bool = False
    seed: int = 0
    stop_at_detection: bool = False
    restart: bool = False

    def cells(self) -> list[tuple[str, str, str, bool, str]]:
        from twostream.attacks.blackbox import BLACKBOX_ATTACKS

        return [(a, d, i, on, m) for a in self.attacks for d in self.details if d in BLACKBOX_ATTACKS[a].views
                for i in self.identities for on in self.detector for m in self.adaptive]


def run_grid(
    grid: Grid,
    make_oracle: Callable[[bool], Oracle],
    images: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str],
    candidates: Sequence[tuple[np.ndarray, int]],
    *,
    params: dict[str, dict[str, Any]] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    done: Sequence[RunResult] = (),
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """Every cell of ``grid`` on every image, image by image (so that a campaign stopped early
    has about as many images in every cell); ``make_oracle(detector_on)`` gives each run its own
    oracle (fresh state) or one shared oracle (run ids keep the sources apart).

    ``done``: results already recorded (a resumed campaign); their runs are not run again unless
    they were interrupted, and they are returned first. ``shard`` ``(i, n)``: only the runs whose
    index in that order is ``i`` modulo ``n`` (campaigns split over processes). An interrupted run
    is recorded (``on_result``) and the ``KeyboardInterrupt`` raised again."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    finished = {r.key(): r for r in one_per_run(done) if r.stopped != "interrupted"}
    results = list(finished.values())
    todo = [(c, cell, k) for k in range(len(ids)) for c, cell in enumerate(grid.cells())]
    for j, (c, (attack, detail, identities, detector, adaptive), k) in enumerate(todo):
        key = (attack, detail, identities, detector, adaptive, ids[k], grid.budget)
        if j % count != index or key in finished:
            continue
        result = attack_image(
            attack, make_oracle(detector), images[k], int(labels[k]), image_id=ids[k], detail=detail,
            identities=identities, budget=grid.budget, eps=grid.eps, run=f"{grid.seed}.{c}.{k}",
            detector=detector, params=(params or {}).get(attack), candidates=candidates, adaptive=adaptive,
            seed=grid.seed + k, stop_at_detection=grid.stop_at_detection, restart=grid.restart, progress=progress)
        log.info("%s/%s/%s/%s%s %s: %s after %d queries (success %s, 1st detection %s, %.1fs)", attack,
                 detail, identities, "on" if detector else "off", f"/{adaptive}" if adaptive else "",
                 ids[k], result.stopped, result.queries, result.success_query, result.first_detection,
                 result.wall_s)
        results.append(result)
        if on_result is not None:
            on_result(result)
        if result.stopped == "interrupted":
            raise KeyboardInterrupt
    return results
