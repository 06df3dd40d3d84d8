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


@pytest.fixture(params=["compiled", "hashlib"])
def hash_backend(request, monkeypatch) -> str:
    """MRENCLAVE's SHA-256 for the enclaves made in the test: the compiled helper (skipped where it
    cannot be built) or hashlib (the pure-Python batch path)."""
    from vepc.silicon import enclave_state, native_measure

    if request.param == "compiled":
        if native_measure.helper() is None:
            pytest.skip(f"compiled hash unavailable: {native_measure.status()}")
    else:
        import hashlib

        monkeypatch.setattr(enclave_state, "new_sha256", hashlib.sha256)
    return request.param
