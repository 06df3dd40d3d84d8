"""PteTable (kernel/pte.py): frames beyond what an entry holds are refused; batch stores count entries."""

from __future__ import annotations

import numpy as np
import pytest

from vepc.kernel.epc_pool import EpcPool, KSection
from vepc.kernel.owners import OwnerRegistry
from vepc.events import EventLog
from vepc.kernel.pte import MAX_PFN, PteTable
from vepc.types import PhysAddr


def test_a_frame_beyond_max_pfn_is_refused_by_batch_and_single_stores():
    t = PteTable(100, 8)
    with pytest.raises(OverflowError, match="beyond the page table"):
        t.set_range(100, np.array([1, MAX_PFN + 1], dtype=np.int64))
    with pytest.raises(OverflowError):
        t[101] = MAX_PFN + 1
    t.set_range(100, np.array([MAX_PFN, 7], dtype=np.int64))
    assert t.get(100) == MAX_PFN and t.get(101) == 7 and len(t) == 2


def test_set_range_counts_overwritten_entries_unless_told_they_are_fresh():
    t = PteTable(0, 8)
    t.set_range(0, np.array([5, 6], dtype=np.int64))
    t.set_range(1, np.array([9, 10], dtype=np.int64))                  # entry 1 overwritten
    assert len(t) == 3 and t.get(1) == 9
    t.set_range(4, np.array([1, 2], dtype=np.int64), fresh=True, fits=True)
    assert len(t) == 5


def test_the_pool_knows_whether_its_frames_fit_a_pte():
    def pool(phys: int) -> EpcPool:
        return EpcPool([KSection(0, PhysAddr(phys), 16, 0, 0)], OwnerRegistry(), EventLog())

    assert pool(0x80000000).pfns_fit_pte
    assert pool((MAX_PFN - 15) << 12).pfns_fit_pte
    assert not pool((MAX_PFN - 14) << 12).pfns_fit_pte


def test_a_lookup_below_beyond_or_before_any_entry_is_absent_not_an_error():
    t = PteTable(base_vpn=100, nr_pages=4)
    assert t.get(101) is None and t.get(101, -1) == -1 and 101 not in t      # no array yet
    t[101] = 5
    assert t.get(101) == 5 and 101 in t
    assert t.get(99) is None and t.get(104) is None and t.get(10**6, -1) == -1   # below and beyond
    assert 99 not in t and 104 not in t and len(t) == 1
