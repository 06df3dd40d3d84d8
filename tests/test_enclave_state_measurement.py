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
    ran: list[bool] = []
    job = slow(b"x")
    m.absorb(lambda sha: (job(sha), ran.append(True)), background=True)
    getattr(m, use)(b"") if use == "update" else getattr(m, use)()
    assert ran == [True] and not m.busy
    assert m.copy().digest() == hashlib.sha256(b"x").digest()


def test_an_error_of_the_background_update_surfaces_at_the_next_use():
    m = Measurement()

    def fail(sha) -> None:
        raise ValueError("bad record")

    m.absorb(fail, background=True)
    with pytest.raises(ValueError, match="bad record"):
        m.digest()
    assert m.digest() == hashlib.sha256().digest()             # raised once, the hash untouched


def test_updates_queued_behind_a_failed_one_are_dropped_and_the_error_raised_once():
    m = Measurement()

    def fail(sha) -> None:
        raise ValueError("bad record")

    m.absorb(slow(b"a"), background=True)
    m.absorb(fail, background=True)
    m.absorb(lambda sha: sha.update(b"b"), background=True)
    with pytest.raises(ValueError, match="bad record"):
        m.wait()
    assert not m.busy and m.digest() == hashlib.sha256(b"a").digest()


def test_one_worker_thread_serves_every_measurement_and_is_kept():
    """A thread start costs 150-400 us on the 2-core machine: the worker is started once, not per batch."""
    a, b = Measurement(), Measurement()
    names: list[int] = []
    a.absorb(lambda sha: names.append(threading.get_ident()), background=True)
    a.wait()
    b.absorb(lambda sha: names.append(threading.get_ident()), background=True)
    b.wait()
    assert len(names) == 2 and names[0] == names[1] != threading.get_ident()


def test_a_failing_record_build_in_the_eadd_batch_raises_instead_of_hanging(monkeypatch):
    """The worker and the storing thread wait on each other's chunks; a failure on either side releases
    the other and surfaces from the batch (the hashlib path: the compiled hash builds no records)."""
    import numpy as np

    from vepc.silicon import enclave_state

    monkeypatch.setattr(enclave_state, "new_sha256", hashlib.sha256)

    from vepc.arch.constants import PageType
    from vepc.arch.structs import Secs
    from vepc.baremetal import BareMetal
    from vepc.silicon import EpcSection, Processor, ProcessorConfig
    from vepc.silicon.leaves import build_batch
    from vepc.types import PhysAddr

    bm = BareMetal(Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 4 << 20),))))
    assert bm.ecreate(Secs(size=1 << 22, base=1 << 22, ssa_frame_size=1, attributes=4, xfrm=3), bm.epc(0)) == 0
    monkeypatch.setattr(build_batch, "_CHUNK", 4)
    real = build_batch._records

    def records(pages, offsets, *a):
        if int(offsets[0]) == 296 * 4096:               # the last chunk, whichever thread builds it
            raise ValueError("record build failed")
        return real(pages, offsets, *a)

    monkeypatch.setattr(build_batch, "_records", records)
    n = 300                                              # >= PARALLEL_PAGES: the worker path
    raised: list[BaseException] = []

    def batch() -> None:
        try:
            build_batch.eadd_batch(bm.cpu.lp(0), 0, np.arange(1, n + 1), np.arange(n) * 4096,
                                   (PageType.REG << 8) | 3, bytes(n * 4096))
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=batch, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the batch hangs"
    assert raised and isinstance(raised[0], ValueError) and "record build failed" in str(raised[0])
