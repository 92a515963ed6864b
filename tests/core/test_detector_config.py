"""The ``detector:`` config section: QueryDetectorConfig's defaults and checks, errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from twostream.core.config import ConfigError, load_config
from twostream.core.query_detector import QueryDetectorConfig


def test_defaults_are_the_library_defaults_and_on():
    section = load_config().detector
    assert section.enabled is True and section.store == "redis"
    assert section.query_config() == QueryDetectorConfig()


def test_every_rule_field_reaches_the_detector(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  enabled: false\n  store: memory\n  min_matches: 5\n  max_age_s: null\n"
                    "  max_entries: 1000\n  seed: 7\n  min_texture_ratio: 0.8\n")
    section = load_config(path, ["detector.max_linf=12"]).detector
    assert (section.enabled, section.store) == (False, "memory")
    expected = dataclasses.replace(QueryDetectorConfig(), min_matches=5, max_age_s=None, max_entries=1000,
                                   seed=7, min_texture_ratio=0.8, max_linf=12)
    assert section.query_config() == expected
    fields = {f.name for f in dataclasses.fields(QueryDetectorConfig)}
    assert fields == set(type(section).model_fields) - {"enabled", "store"}


@pytest.mark.parametrize("override, named", [
    ("detector.min_matches=0", "min_matches=0"),
    ("detector.max_candidates=3", "max_candidates=3"),  # fewer than min_matches
    ("detector.index_windows=600", "index_windows=600"),  # more than windows
    ("detector.max_age_s=0", "max_age_s=0"),
    ("detector.max_entries=0", "max_entries=0"),
    ("detector.store=disk", "detector.store"),
    ("detector.enabled=maybe", "detector.enabled"),
    ("detector.min_matches=true", "detector.min_matches"),  # a bool is not a number
    ("detector.window=8", "detector.window"),  # unknown field
])
def test_bad_values_name_the_field(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "detector" in str(err.value) and named in str(err.value)
