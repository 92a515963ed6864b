"""Shared fixtures: where the offline assets are, and skipping cleanly without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TWOSTREAM_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """``../shared/assets`` (or $TWOSTREAM_ASSETS); tests using it skip when it is absent."""
    if not ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {ASSETS} (set TWOSTREAM_ASSETS)")
    return ASSETS
