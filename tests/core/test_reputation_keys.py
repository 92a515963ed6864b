"""``reputation.group_by_prefix`` and ``reputation_key``: hand-worked addresses, hostile text, the
setting as configuration; ``observe.lua`` as package data; ``forget_default`` in the reference."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostream.core.config import ConfigError, PrefixGrouping, ReputationConfig, load_config
from twostream.core.reputation import OBSERVE_SCRIPT, ReputationLedger, Upload, reputation_key, reputation_keys

REPO = Path(__file__).resolve().parents[2]
DEFAULT = PrefixGrouping()  # ipv4 24, ipv6 64


@pytest.mark.parametrize(("source", "key"), [
    ("192.0.2.77", "192.0.2.0/24"),
    ("192.0.2.0", "192.0.2.0/24"),
    ("192.0.3.1", "192.0.3.0/24"),
    ("0.0.0.0", "0.0.0.0/24"),
    ("255.255.255.255", "255.255.255.0/24"),
    ("::ffff:192.0.2.77", "192.0.2.0/24"),  # IPv4-mapped IPv6 is the IPv4 address
    ("::ffff:c000:24d", "192.0.2.0/24"),  # the same, in hex
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # last address of the /64
    ("2001:db8:1:3::", "2001:db8:1:3::/64"),  # first address of the next /64
    ("2001:DB8:0:0::1", "2001:db8::/64"),  # case and zero runs: the canonical text
    ("fe80::1%eth0", "fe80::/64"),  # zone id dropped
    ("fe80::2%25", "fe80::/64"),
    ("::1", "::/64"),
    ("::", "::/64"),
])
def test_addresses_are_grouped_by_their_prefix(source, key):
    assert reputation_key(source, DEFAULT) == key
    assert reputation_key(source, None) == source  # off: every id its own key


@pytest.mark.parametrize("source", [
    "alice", "", " 192.0.2.1", "192.0.2.1 ", "192.0.2.1:8080", "[2001:db8::1]", "192.0.2", "192.0.2.256",
    "010.0.0.1", "192.0.2.1/24", "2001:db8::1/64", "fe80::1%", "2001:db8:::1", "1.2.3.4\x00", "\ud800",
    "caf\u00e9", "x" * 10_000, "１９２.０.２.１",
])
def test_anything_else_is_its_own_key(source):
    assert reputation_key(source, DEFAULT) == source


def test_other_prefix_lengths():
    grouping = PrefixGrouping(ipv4=16, ipv6=48)
    assert reputation_key("198.51.100.7", grouping) == "198.51.0.0/16"
    assert reputation_key("2001:db8:abcd:12::1", grouping) == "2001:db8:abcd::/48"
    assert reputation_key("198.51.100.7", PrefixGrouping(ipv4=32, ipv6=128)) == "198.51.100.7/32"
    assert reputation_key("198.51.100.7", PrefixGrouping(ipv4=0, ipv6=0)) == "0.0.0.0/0"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_hostile_text_never_raises(text):
    key = reputation_key(text, DEFAULT)
    assert key == text or key.count("/") == 1


def test_the_column_form_maps_each_entry():
    column = pa.chunked_array([["192.0.2.1", "alice", None], ["192.0.2.200", "::ffff:192.0.2.9"]])
    assert reputation_keys(column, DEFAULT).to_pylist() == [
        "192.0.2.0/24", "alice", None, "192.0.2.0/24", "192.0.2.0/24"]
    assert reputation_keys(column, None).to_pylist() == column.to_pylist()


def test_the_settings_are_configuration(tmp_path):
    assert ReputationConfig().group_by_prefix is None and ReputationConfig().forget_default is False
    path = tmp_path / "c.yaml"
    path.write_text("reputation:\n  group_by_prefix: {ipv4: 24, ipv6: 56}\n  forget_default: true\n")
    cfg = load_config(path).reputation
    assert cfg.group_by_prefix == PrefixGrouping(ipv4=24, ipv6=56) and cfg.forget_default is True
    for bad in ("group_by_prefix: {ipv4: 33}", "group_by_prefix: {ipv6: -1}", "group_by_prefix: {ipv5: 8}"):
        path.write_text(f"reputation:\n  {bad}\n")
        with pytest.raises(ConfigError, match="group_by_prefix"):
            load_config(path)


def test_forget_default_drops_a_source_back_at_the_default_standing():
    ledger = ReputationLedger(ReputationConfig(threshold=2, forget_default=True))
    answers = [ledger.observe(Upload("s", t, f"i{t}", rejected, "cat")) for t, rejected in
               enumerate([False, True, True, False, False, True])]
    assert [a.response for a in answers] == ["cat", "cat", "blocked", "blocked", "cat", "cat"]
    # after image 0 (CC 0) and image 4 (CC 0, released) the source has no entry; after image 5 it has one
    assert "s" in ledger and ledger.get("s").images == 1 and ledger.get("s").cc == 1
    ledger.observe(Upload("s", 6, "i6", False, "cat"))
    assert "s" not in ledger and len(ledger) == 0


def test_the_lua_script_is_package_data():
    assert OBSERVE_SCRIPT == (REPO / "twostream/core/reputation/observe.lua").read_text(encoding="utf-8")
    assert files("twostream.core.reputation").joinpath("observe.lua").is_file()
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["twostream"]
    assert any(fnmatch.fnmatch("core/reputation/observe.lua", p) for p in patterns)
