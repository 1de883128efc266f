"""The ``cache`` fixture: an empty model cache per test (wheel helpers for pull tests are in _wheels.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache in tmp_path (EDGEDEC_CACHE); no pip options from the environment."""
    monkeypatch.setenv("EDGEDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEDEC_PIP_ARGS", raising=False)
    return tmp_path / "cache"
