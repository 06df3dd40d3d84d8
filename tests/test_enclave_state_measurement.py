"""MRENCLAVE under construction (vepc.silicon.enclave_state.Measurement): an update that runs on a worker
thread (the EADD batch's) keeps the order of the hash input and is finished before any other use."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from vepc.silicon.enclave_state import Measurement


def slow(data: bytes, delay: float = 0.05):
    def fn(sha) -> None:
        time.sleep(delay)
        sha.update(data)
    return fn


def test_background_absorbs_keep_their_order_behind_a_slow_one():
    m = Measurement()
    m.absorb(slow(b"a"), background=True)
    m.absorb(lambda sha: sha.update(b"b"), background=True)   # must wait for "a"
    m.update(b"c")
    assert m.digest() == hashlib.sha256(b"abc").digest()


@pytest.mark.parametrize("use", ["update", "digest", "hexdigest", "copy"])
def test_every_use_waits_for_the_background_update(use):
    m = Measurement()
    m.absorb(slow(b"x"), background=True)
    getattr(m, use)(b"") if use == "update" else getattr(m, use)()
    assert not any(t.name == "eadd-measure" and t.is_alive() for t in threading.enumerate())
    assert m.copy().digest() == hashlib.sha256(b"x").digest()


def test_an_error_of_the_background_update_surfaces_at_the_next_use():
    m = Measurement()

    def fail(sha) -> None:
        raise ValueError("bad record")

    m.absorb(fail, background=True)
    with pytest.raises(ValueError, match="bad record"):
        m.digest()
    assert m.digest() == hashlib.sha256().digest()             # raised once, the hash untouched
