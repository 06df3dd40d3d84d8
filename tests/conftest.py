"""Shared fixtures: the external test vectors (read in place) and small machines."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared/vectors beside the repository (read in place, never copied).
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


@pytest.fixture
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"test vectors not found at {VECTORS}")
    return VECTORS
