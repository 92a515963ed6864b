"""Upload-log audit on Ray: ``python -m jobs.audit --log URI --images URI [--scores URI] --output URI``.

Submit with ``ray job submit --working-dir . -- python -m jobs.audit ...``. Same arguments and
outputs as ``twostream audit`` (docs/audit.md). The log pass and the Algorithm-2 replay are
streaming and run in the driver (the replay is sequential per source by definition, SPEC 3), in
memory bounded by the block size and ``--partitions`` as for ``twostream audit``;
what Ray adds is the scoring of images the log names that no ``--scores`` row covers: they are
split into chunks, each scored by a Ray task with its own :class:`twostream.core.scoring.Scorer`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import ray

from jobs.ray_cluster import connect
from twostream.audit.catalogue import ScoreFn, scorer_score_fn
from twostream.audit.flags import add_audit_args, audit_section, print_summary
from twostream.audit.logread import AuditError
from twostream.audit.run import run_audit
from twostream.core.config import ConfigError, TwoStreamConfig, add_config_args, config_from_args
from twostream.core.results import ScoredBatch

log = logging.getLogger("twostream.jobs.audit")


def _score_chunk(cfg_json: str, uris: list[str], ids: list[str]) -> ScoredBatch:
    from twostream.core.scoring import Scorer

    config = TwoStreamConfig.model_validate_json(cfg_json)
    return scorer_score_fn(Scorer(config), chunk=config.high.batch_size,
                           max_bytes=config.limits.max_bytes)(uris, ids)


def ray_score_fn(config: TwoStreamConfig, chunk: int = 256, num_cpus: float = 1.0) -> ScoreFn:
    """A ``score_fn`` for :func:`twostream.audit.run.run_audit` that scores chunks in Ray tasks."""
    task = ray.remote(num_cpus=num_cpus, num_gpus=config.high.num_gpus)(_score_chunk)
    cfg_json = config.model_dump_json()

    def score(uris: list[str], ids: list[str]) -> ScoredBatch:
        refs = [task.remote(cfg_json, uris[a:a + chunk], ids[a:a + chunk]) for a in range(0, len(uris), chunk)]
        log.info("scoring %d images in %d Ray tasks", len(uris), len(refs))
        return ScoredBatch.concat(ray.get(refs))  # in submission order, so rows line up with ids

    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.audit", description=__doc__.splitlines()[0])
    add_audit_args(parser)
    parser.add_argument("--chunk", type=int, default=256, help="images per Ray scoring task")
    add_config_args(parser, "audit.top=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args, audit_section(args))
        started = connect(log_to_driver=True)
        try:
            result = run_audit(args.log, args.output, images_uri=args.images, scores_uri=args.scores,
                               config=config, score_fn=ray_score_fn(config, args.chunk))
        finally:
            if started:
                ray.shutdown()
    except (AuditError, ConfigError) as exc:
        print(f"jobs.audit: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
