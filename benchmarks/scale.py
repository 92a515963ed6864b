"""The batch job at scale: N small JPEGs in tar shards (WebDataset layout, sidecars with image id,
source and timestamp) spread over S sources, tiny random models, on a fresh local Ray.

Prints and writes (``--report``) wall time per phase, images/s, peak memory per process kind
(RSS, and private memory: RSS without the object store's shared pages and mapped files, see
:class:`Sampler`), the peak of ``/dev/shm`` in use and the object store's spill; run it at 100k
and at 1M images and compare (targets: every kind's peak at 1M within 1.25x of its peak at 100k;
reputation and final phases under 15% of the wall).

    nice python benchmarks/scale.py --n 100000 --report out/scale-100k.json
    nice python benchmarks/scale.py --n 1000000 --report out/scale-1m.json   # over an hour here
    python benchmarks/scale.py --reduce-only --n 1000000   # the reputation reduce alone, events/s,
                                                           # and its speed over the sequential reference
    python benchmarks/scale.py --plan-only --n 1000000     # the driver's planning alone, peak RSS
    python benchmarks/scale.py --stages-only --n 2000      # phase 1's stages without Ray vs the plain loop
    python benchmarks/scale.py --n 20000 --plain --code /tmp/main   # another checkout's job, this sampler

Process kinds come from Ray's process titles, sampled from /proc every 0.5 s: ``driver`` (this
process), ``decode`` (read+decode tasks), ``stream`` (the high and low pool actors: Ray Data gives
both pools the same title, ``MapWorker(MapBatches(StreamStage))``, so their peaks are listed per
process), ``compare`` (the sink's write tasks: Algorithm 1 and the shards' rows), ``ids`` (the image-id phase's tasks), ``detector`` (the query detector's), ``reputation`` (the map, split and reduce tasks of phase 2), ``final``
(phase 3 tasks), ``gcs``, ``raylet``, ``ray`` (Ray's other daemons), ``ray-data`` (Ray Data's
helper actors: its stats actor, autoscaling coordinator and actor location tracker), ``other``
(idle Ray workers). The report also counts the worker processes Ray started. Only this process's
descendants count (the local Ray it starts), not other Ray instances. Every 30 s the sampler also notes each kind's private memory against the shards
committed so far; the report gives that timeline and the growth per 100 shards of each kind that
is one long-lived process (driver, GCS, raylet, Ray's daemons, Ray Data's actors) over the second
half of the scoring (a least-squares slope), the figure to extrapolate from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks.scale")
TINY = ["high.model=mobilenetv3_small_050", "high.weights=random", "low.model=cifar_resnet20",
        "low.weights=random", "thresholds.p1=0.0", "thresholds.p2=0.3"]
KINDS = {  # process title fragment -> kind, first match wins
    "jobs.score": "driver", "ReadWorkUnits": "decode", "read_decode": "decode", "StreamStage": "stream",
    "Write": "compare", "compare": "compare",  # the sink's write tasks (earlier: compare tasks)
    "_id_claims": "ids", "_id_conflicts": "ids", "_rewrite_losers": "ids",
    "_queries": "detector", "_detect_task": "detector",
    "_events": "reputation", "_split": "reputation", "_reduce": "reputation", "_finalize": "final",
    "_StatsActor": "ray-data", "_AutoscalingCoordinatorActor": "ray-data", "ActorLocationTracker": "ray-data",
    "raylet": "raylet", "gcs_server": "gcs", "dashboard": "ray", "log_monitor": "ray", "runtime_env": "ray",
}
LONG_LIVED = ("driver", "gcs", "raylet", "ray", "ray-data")  # kinds that are one process for the whole run


def write_shards(root: Path, n: int, sources: int, per_tar: int, seed: int = 0) -> None:
    """``n`` uploads in tars of ``per_tar``: 64 distinct 48x48 JPEGs (so verdicts vary), sources
    drawn from ``sources`` addresses, timestamps over a day."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for k in range(64):
        buf = io.BytesIO()
        tile = np.random.default_rng(k).integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(tile).resize((48, 48), Image.BILINEAR).save(buf, "JPEG", quality=85)
        blobs.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    src = rng.integers(0, sources, n)
    ts = np.round(rng.random(n) * 86400, 3)
    pick = rng.integers(0, len(blobs), n)
    for t, start in enumerate(range(0, n, per_tar)):
        with tarfile.open(root / f"shard-{t:06d}.tar", "w") as tar:
            for i in range(start, min(start + per_tar, n)):
                s = int(src[i])
                meta = json.dumps({"image_id": f"u{i:08d}", "source": f"10.{s >> 16}.{(s >> 8) & 255}.{s & 255}",
                                   "timestamp": float(ts[i])}).encode()
                for name, blob in ((f"u{i:08d}.jpg", blobs[pick[i]]), (f"u{i:08d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


class Sampler(threading.Thread):
    """Peak memory per process kind (and per stream actor process), from /proc every ``period`` s:
    ``rss`` (VmRSS) and ``private`` (RssAnon: the process's own heap and stacks). RSS also counts
    the pages of Ray's object store that a process has touched (RssShmem, shared by every process
    that reads the same blocks, and bounded by the store's size) and its mapped libraries
    (RssFile); ``private`` is what grows when a process holds on to memory. The shared memory in
    use on ``/dev/shm`` (the object store's arena; machine-wide) is sampled beside them."""

    def __init__(self, progress: Path | None = None, period: float = 0.5, timeline_period: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.period, self.timeline_period, self.progress = period, timeline_period, progress
        self.peak: dict[str, dict[str, int]] = {"rss": defaultdict(int), "private": defaultdict(int)}
        self.stream: dict[str, dict[int, int]] = {"rss": defaultdict(int), "private": defaultdict(int)}
        self.shm_peak = 0
        self.timeline: list[dict] = []  # {"s", "shards", "private_mb": {kind: MB}} every timeline_period
        self.cpu_ticks: dict[str, int] = defaultdict(int)  # CPU time per kind while sampled
        self._ticks_seen: dict[int, int] = {}  # per process: its CPU ticks at the last sample
        self._sampled = False
        self.own_cpu_s = 0.0  # this thread's CPU in the samples that count: not the driver's work
        self.stop = threading.Event()

    @staticmethod
    def ours() -> list[int]:
        """This process and its descendants: the local Ray it started (GCS, raylet, workers), not
        other Ray instances on the machine."""
        children: dict[int, list[int]] = defaultdict(list)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(pid))
        found, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def sample(self) -> dict[str, int]:
        """Update the peaks; returns each kind's largest private memory now."""
        me = os.getpid()
        now: dict[str, int] = defaultdict(int)
        for pid in self.ours():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status")
                          if line.startswith(("VmRSS:", "RssAnon:"))}
                sizes = {"rss": status["VmRSS"], "private": status["RssAnon"]}
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, KeyError):
                continue
            kind = "driver" if pid == me else next((k for frag, k in KINDS.items() if frag in cmd), "other")
            # CPU since the last sample goes to the kind the process has now (Ray reuses worker
            # processes for tasks of other kinds); a process already running at the first sample
            # counts from there.
            ticks = int(stat[11]) + int(stat[12])  # utime + stime
            if self._sampled:
                self.cpu_ticks[kind] += ticks - self._ticks_seen.get(pid, 0)
            self._ticks_seen[pid] = ticks
            now[kind] = max(now[kind], sizes["private"])
            for measure, size in sizes.items():
                self.peak[measure][kind] = max(self.peak[measure][kind], size)
                if kind == "stream":
                    self.stream[measure][pid] = max(self.stream[measure][pid], size)
        with contextlib.suppress(OSError):
            self.shm_peak = max(self.shm_peak, shutil.disk_usage("/dev/shm").used)
        self._sampled = True
        return now

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per kind while sampled (to the last sample: a process's time after it is
        lost if it ends between two samples). The sampler's own thread runs in this process,
        whose kind is ``driver``: its CPU (:attr:`own_cpu_s`, reading /proc for every process
        twice a second) is taken out of the driver's."""
        hz = os.sysconf("SC_CLK_TCK")
        seconds = {k: v / hz for k, v in self.cpu_ticks.items()}
        if "driver" in seconds:
            seconds["driver"] = max(0.0, seconds["driver"] - self.own_cpu_s)
        return {k: round(v, 1) for k, v in sorted(seconds.items()) if v}

    def committed(self) -> int:
        """Shards committed so far (their markers in the output's ``_progress/``)."""
        with contextlib.suppress(OSError):
            return sum(name.endswith(".done") for name in os.listdir(self.progress)) if self.progress else 0
        return 0

    def run(self) -> None:
        t0 = last = time.monotonic()
        while not self.stop.wait(self.period):
            counted, c0 = self._sampled, time.thread_time()
            now = self.sample()
            if counted:
                self.own_cpu_s += time.thread_time() - c0
            if time.monotonic() - last >= self.timeline_period:
                last = time.monotonic()
                self.timeline.append({"s": round(last - t0), "shards": self.committed(),
                                      "private_mb": {k: round(v / (1 << 20)) for k, v in sorted(now.items())}})

    def growth_per_100_shards(self) -> dict[str, float]:
        """The private memory growth per 100 shards of each kind that is one long-lived process
        (:data:`LONG_LIVED`), over the second half of the scoring (least-squares slope over the
        timeline's samples there). Ray reuses worker processes for tasks of every kind, so the
        worker kinds' samples jump between processes and have no slope to speak of."""
        total = max((p["shards"] for p in self.timeline), default=0)
        late = [p for p in self.timeline if total / 2 <= p["shards"] < total]
        if len({p["shards"] for p in late}) < 2:
            return {}
        x = np.array([p["shards"] for p in late], float)
        kinds = sorted(set.intersection(set(LONG_LIVED), *(set(p["private_mb"]) for p in late)))
        return {k: round(float(np.polyfit(x, [p["private_mb"][k] for p in late], 1)[0]) * 100, 1) for k in kinds}


def private_mb(fragment: bytes) -> float:
    """Private memory (RssAnon, MB) of the first process under this one (:meth:`Sampler.ours`)
    whose command line holds ``fragment``; 0 when there is none."""
    for pid in Sampler.ours():
        try:
            if fragment in open(f"/proc/{pid}/cmdline", "rb").read():
                line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("RssAnon:"))
                return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            continue
    return 0.0


def spilled() -> str:
    """The object store's spill and restore totals (Ray's memory summary, stats only)."""
    import ray
    from ray._private.internal_api import memory_summary

    lines = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True).splitlines()
    return "; ".join(line.strip() for line in lines if "pill" in line or "estor" in line) or "none"


def workers_started() -> int:
    """Worker processes the local Ray has started so far (one core-worker log each in its
    session's logs; the driver's log is apart)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return len(list(logs.glob("python-core-worker-*.log")))


def run_job(n: int, sources: int, per_tar: int, workdir: Path, overrides: list[str]) -> dict:
    import ray

    from jobs.ray_cluster import connect
    from jobs.score import run_job as job
    from twostream.core.config import load_config

    t0 = time.perf_counter()
    write_shards(workdir / "in", n, sources, per_tar)
    shutil.rmtree(workdir / "out", ignore_errors=True)  # an earlier run's output: a rerun would be refused
    log.info("wrote %d images in %.0fs", n, time.perf_counter() - t0)
    connect(num_cpus=os.cpu_count())
    sampler = Sampler(progress=workdir / "out" / "_progress")
    sampler.start()
    try:
        summary = job(load_config(None, TINY + overrides), str(workdir / "in"), str(workdir / "out"), progress=False)
        spill, started = spilled(), workers_started()
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
    wall = summary["wall_s"]
    mb = 1 << 20
    return {
        "images": summary["inputs"], "sources": summary["sources"], "blacklisted": summary["blacklisted_sources"],
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "reputation_and_final_share": round((wall["reputation"] + wall["final"]) / wall["total"], 4),
        "images_per_s_end_to_end": round(summary["inputs"] / wall["total"], 1),
        "images_per_s_scoring": round(summary["inputs"] / wall["scoring"], 1),
        "peak_rss_mb": {k: round(v / mb) for k, v in sorted(sampler.peak["rss"].items())},
        "peak_private_mb": {k: round(v / mb) for k, v in sorted(sampler.peak["private"].items())},
        "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stream_actor_peaks_mb": sorted(round(v / mb) for v in sampler.stream["rss"].values()),
        "stream_actor_private_peaks_mb": sorted(round(v / mb) for v in sampler.stream["private"].values()),
        "dev_shm_peak_mb": round(sampler.shm_peak / mb),
        "object_store_spill": spill,
        "worker_processes_started": started,
        "private_mb_per_100_shards": sampler.growth_per_100_shards(),
        "cpu_s": sampler.cpu_seconds(),
        "sampler_cpu_s": round(sampler.own_cpu_s, 1),  # this benchmark's own, left out of cpu_s
        "overrides": overrides,
        "timeline": sampler.timeline,
    }


def plain_loop(folder: Path, batch: int = 64) -> dict:
    """The images of ``folder``'s tars scored by ``Scorer.score_batch`` in this process, one torch
    thread, ``batch`` at a time: CPU seconds of the scoring alone (reading the tars apart)."""
    import torch

    from twostream.core.config import load_config
    from twostream.core.scoring import Scorer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    scorer = Scorer(load_config(None, TINY + ["high.threads=1"]))
    cpu, n, pending = 0.0, 0, []

    def score() -> float:
        t0 = time.process_time()
        scorer.score_batch(pending)
        return time.process_time() - t0

    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    pending.append(tar.extractfile(member).read())
                    if len(pending) == batch:
                        cpu, n, pending = cpu + score(), n + len(pending), []
    if pending:
        cpu, n = cpu + score(), n + len(pending)
    return {"images": n, "cpu_s": round(cpu, 1), "cpu_ms_per_image": round(cpu * 1e3 / n, 3)}


def cpu_per_image(job: dict, loop: dict) -> dict:
    """The job's CPU per image by kind, its total, its excess over the loop's, and outside the
    stream actors."""
    n = job["images"]
    per_kind = {k: round(v * 1e3 / n, 3) for k, v in job["cpu_s"].items()}
    total = sum(job["cpu_s"].values()) * 1e3 / n
    outside = total - job["cpu_s"].get("stream", 0.0) * 1e3 / n
    return {"job_ms_per_image_by_kind": per_kind, "job_ms_per_image": round(total, 3),
            "loop_ms_per_image": loop["cpu_ms_per_image"], "excess_ms_per_image": round(total - loop["cpu_ms_per_image"], 3),
            "outside_stream_actors_ms_per_image": round(outside, 3), "job_over_loop": round(total / loop["cpu_ms_per_image"], 3)}


def reduce_only(n: int, sources: int) -> dict:
    """The phase-2 reduce alone on ``n`` events of ``sources`` sources: events/s and peak RSS, then
    the sequential reference on the same events (:func:`reference_rate`)."""
    import pyarrow as pa

    from twostream.batch import reputation
    from twostream.core.config import ReputationConfig

    rng = np.random.default_rng(0)
    names = np.array([f"10.{s >> 16}.{(s >> 8) & 255}.{s & 255}" for s in range(sources)])
    events = pa.table({
        "source": names[rng.integers(0, sources, n)], "timestamp": np.round(rng.random(n) * 86400, 3),
        "image_id": pa.array(np.char.add("u", np.arange(n).astype(str))), "rejected": rng.random(n) < 0.3,
        "error": np.zeros(n, bool), "shard": (np.arange(n) // 1000).astype(np.int32),
        "row": (np.arange(n) % 1000).astype(np.int32),
    }, schema=reputation.EVENTS_SCHEMA)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM) to the current RSS
        handle.write("5")
    t0 = time.perf_counter()
    table, responses = reputation.reduce_partition(events, None, ReputationConfig())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    reputation.reduce_partition(events, table, ReputationConfig(), late="after")  # from a state
    with_state = time.perf_counter() - t0
    growth = (_status_kb("VmHWM") - before) / 1024
    return {"events": n, "sources": table.num_rows, "events_per_s": round(n / first),
            "events_per_s_with_state": round(n / with_state), "events_mb": round(events.nbytes / 2**20, 1),
            "peak_growth_mb": round(growth), "peak_growth_per_event_byte": round(growth * 2**20 / events.nbytes, 1),
            **reference_rate(events, responses, first)}


def reference_rate(events, responses, reduce_s: float) -> dict:
    """Algorithm 2's sequential reference (``core.reputation.replay``, one upload at a time) on the
    events the reduce took ``reduce_s`` over, in the same process: its events/s, the reduce's speed
    over it, and whether both gave every event the same (cc, blacklisted)."""
    from twostream.core.config import ReputationConfig
    from twostream.core.reputation import Upload, replay

    cols = events.to_pydict()
    uploads = [Upload(s, t, i, r, "adversarial" if r else "cat")
               for s, t, i, r in zip(cols["source"], cols["timestamp"], cols["image_id"], cols["rejected"])]
    t0 = time.perf_counter()
    outcomes, _ = replay(uploads, ReputationConfig())
    reference_s = time.perf_counter() - t0
    answers = responses.to_pydict()
    got = {(s, r): (c, b) for s, r, c, b in zip(answers["shard"], answers["row"], answers["cc"], answers["blacklisted"])}
    want = {(s, r): (o.cc, o.blacklisted) for s, r, o in zip(cols["shard"], cols["row"], outcomes)}
    return {"reference_events_per_s": round(len(uploads) / reference_s),
            "reduce_over_reference": round(reference_s / reduce_s, 1), "reduce_equals_reference": got == want}


def plan_only(n: int, sources: int, per_tar: int, workdir: Path) -> dict:
    """The job's planning alone, in this process as in the driver (list and spool every tar's
    entries, fingerprint, record, work units): wall time and peak RSS."""
    from jobs.score import run_job  # noqa: F401  (the driver's imports, counted in its baseline)
    from twostream.batch import outputs, resume
    from twostream.batch.planning import plan_input, work_units
    from twostream.core.config import load_config

    write_shards(workdir / "in", n, sources, per_tar)
    cfg = load_config(None, TINY)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM) to the current RSS
        handle.write("5")
    t0 = time.perf_counter()
    out = str(workdir / "out")
    plan = plan_input(str(workdir / "in"), cfg.job.files_per_shard, spool=outputs.entries_folder(out))
    resume.check_or_record(out, resume.fingerprint(plan, str(workdir / "in"), None, cfg), plan)
    units = [u.to_json() for u in work_units(plan.shards, cfg.job.rows_per_task)]
    return {"images": n, "objects": plan.rows, "work_units": len(units), "wall_s": round(time.perf_counter() - t0, 1),
            "rss_before_mb": round(before / 1024), "peak_rss_mb": round(_status_kb("VmHWM") / 1024)}


def stages_only(n: int, sources: int, per_tar: int, workdir: Path, overrides: list[str]) -> dict:
    """Phase 1's stages without Ray, in this process, one torch thread: every work unit read and
    decoded (``read_decode``), both streams (``StreamStage``), the comparator; CPU per image of
    each, beside the plain loop over the same images (what the job's per-row work costs before
    Ray's own; with ``--code``, another checkout's stages)."""
    import torch

    from twostream.batch import planning, stages
    from twostream.core.config import load_config
    from twostream.core.scoring import input_spec

    torch.set_num_threads(1)
    write_shards(workdir / "in", n, sources, per_tar)
    cfg = load_config(None, TINY + ["high.threads=1"] + overrides)
    specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
    actors = {kind: stages.StreamStage(cfg, kind) for kind in stages.KINDS}
    cpu: dict[str, float] = defaultdict(float)
    units = planning.work_units(planning.plan_input(str(workdir / "in"), cfg.job.files_per_shard).shards,
                                cfg.job.rows_per_task)
    for unit in units:
        t0 = time.process_time()
        blocks = list(stages.read_decode(unit, cfg, specs))
        cpu["read_decode"] += time.process_time() - t0
        for block in blocks:
            for kind in stages.KINDS:
                t0 = time.process_time()
                block = actors[kind](block)
                cpu[kind] += time.process_time() - t0
            t0 = time.process_time()
            stages.compare(block, cfg)
            cpu["compare"] += time.process_time() - t0
    per_image = {k: round(v * 1e3 / n, 3) for k, v in cpu.items()}
    loop = plain_loop(workdir / "in")
    total = sum(cpu.values()) * 1e3 / n
    return {"images": n, "stages_ms_per_image": per_image, "stages_total_ms_per_image": round(total, 3),
            "plain_loop": loop, "stages_over_loop": round(total / loop["cpu_ms_per_image"], 3)}


def _status_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="images (or events with --reduce-only)")
    parser.add_argument("--sources", type=int, default=100_000)
    parser.add_argument("--per-tar", type=int, default=1000, help="images per tar shard")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--report", type=Path, help="write the figures here (JSON)")
    parser.add_argument("--reduce-only", action="store_true", help="time the reputation reduce alone")
    parser.add_argument("--plan-only", action="store_true", help="the driver's planning alone: time, peak RSS")
    parser.add_argument("--stages-only", action="store_true",
                        help="phase 1's stages in this process without Ray, beside the plain loop: CPU per image")
    parser.add_argument("--plain", action="store_true", help="then the same images in a plain loop: CPU per image")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--code", type=Path, help="run the job (and the plain loop) from this checkout, e.g. main's "
                                                  "for a before/after pair in one window; this script measures")
    args = parser.parse_args()
    if args.code:  # first on this process's path and on its Ray workers' (they inherit PYTHONPATH)
        sys.path.insert(0, str(args.code.resolve()))
        os.environ["PYTHONPATH"] = str(args.code.resolve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.reduce_only:
        figures = reduce_only(args.n, args.sources)
    elif args.stages_only:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            figures = stages_only(args.n, args.sources, args.per_tar, args.workdir or Path(tmp), args.overrides)
    elif args.plan_only:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            figures = plan_only(args.n, args.sources, args.per_tar, args.workdir or Path(tmp))
    else:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            workdir = args.workdir or Path(tmp)
            figures = run_job(args.n, args.sources, args.per_tar, workdir, args.overrides)
            if args.plain:
                figures["plain_loop"] = plain_loop(workdir / "in")
                figures["cpu_per_image"] = cpu_per_image(figures, figures["plain_loop"])
    text = json.dumps(figures, indent=2)
    log.info("figures:\n%s", text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
