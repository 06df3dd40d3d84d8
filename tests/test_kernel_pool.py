"""The EPC pool of main.c: per-node FIFO free lists, local node first, round robin, -ENOMEM/-EBUSY/
-ERESTARTSYS, watermarks, free without EREMOVE, poison."""

from __future__ import annotations

import errno

from vepc.arch.constants import SGX_NR_LOW_PAGES
from vepc.events import EventKind
from vepc.kernel.epc_pool import ERESTARTSYS, PAGE_POISON
from vepc.kernel.owners import OwnerKind
from vepc.machine import Machine


class Owner:
    owner_kind = OwnerKind.HOST_ENCLAVE


def machine(epc=("1M@0", "1M@1")):
    m = Machine.build(epc=list(epc))
    o = Owner()
    m.kernel.owners.register(o)
    return m, m.kernel.pool, o


def test_allocation_takes_the_head_of_the_local_node_in_fifo_order():
    m, pool, o = machine()
    a = pool.alloc(o, False, node=1)
    b = pool.alloc(o, False, node=1)
    assert pool.node_of(a) == 1 and b == a + 1                 # boot freed pages in order
    pool.free(a)
    rest = [pool.alloc(o, False, node=1) for _ in range(255)]
    assert rest[-1] == a                                       # freed page went to the tail


def test_allocation_falls_back_round_robin_when_the_local_node_is_empty():
    m, pool, o = machine()
    pages = [pool.alloc(o, False, node=0) for _ in range(257)]
    assert all(pool.node_of(p) == 0 for p in pages[:256]) and pool.node_of(pages[256]) == 1


def test_allocation_from_a_node_without_epc_starts_at_the_next_node():
    m, pool, o = machine(("1M@0", "1M@2"))
    assert pool.node_of(pool.alloc(o, False, node=1)) == 2
    assert pool.node_of(pool.alloc(o, False, node=3)) == 0


def test_exhaustion_with_empty_active_list_is_enomem_even_with_reclaim():
    m, pool, o = machine(("1M@0",))
    for _ in range(256):
        assert pool.alloc(o, False) >= 0
    assert pool.alloc(o, False) == -errno.ENOMEM
    assert pool.alloc(o, True) == -errno.ENOMEM


def test_exhaustion_with_reclaimable_pages_is_ebusy_without_reclaim():
    m, pool, o = machine(("1M@0",))
    pages = [pool.alloc(o, False) for _ in range(256)]
    pool.mark_reclaimable(pages[0])
    assert pool.alloc(o, False) == -errno.EBUSY


def test_reclaiming_allocation_with_a_signal_pending_is_erestartsys():
    m, pool, o = machine(("1M@0",))
    pages = [pool.alloc(o, False) for _ in range(256)]
    pool.mark_reclaimable(pages[0])
    pool.signal_pending = lambda: True
    assert pool.alloc(o, True) == -ERESTARTSYS


def test_allocation_below_low_watermark_wakes_ksgxd_only_with_reclaimable_pages():
    m, pool, o = machine(("1M@0",))
    for _ in range(256 - SGX_NR_LOW_PAGES):
        pool.alloc(o, False)
    assert m.events.count(EventKind.RECLAIMER_WAKE) == 0       # nothing on the active list
    p = pool.alloc(o, False)
    pool.mark_reclaimable(p)
    pool.alloc(o, False)
    assert m.events.count(EventKind.RECLAIMER_WAKE) == 1


def test_free_does_not_run_eremove():
    m, pool, o = machine(("1M@0",))
    p = pool.alloc(o, False)
    n = len(m.events)
    pool.free(p)
    assert [e.kind for e in m.events.since(n)] == [EventKind.EPC_FREE]


def test_poisoned_page_goes_to_the_poison_list_never_a_free_list():
    m, pool, o = machine(("1M@0",))
    p = pool.alloc(o, False)
    pool.flags[p] |= PAGE_POISON
    before = pool.nr_free
    pool.free(p)
    assert pool.nr_free == before and p in pool.nodes[0].poison
    assert p not in pool.nodes[0].free_pages()
    assert pool.counts()["poisoned"] == 1


def test_unmark_reclaimable_is_ebusy_while_the_reclaimer_holds_the_page():
    m, pool, o = machine(("1M@0",))
    p = pool.alloc(o, False)
    pool.mark_reclaimable(p)
    del pool.active[p]                                         # taken by the reclaimer (list_del_init)
    assert pool.unmark_reclaimable(p) == -errno.EBUSY


def test_counts_derive_every_page_state():
    m, pool, o = machine(("1M@0",))
    for _ in range(3):
        pool.alloc(o, False)
    c = pool.counts()
    assert c["free"] == 253 and c["host_enclave"] == 3 and c["total"] == 256


def test_bookkeeping_stays_within_budget_per_page():
    """EPCM (10 bytes) + kernel arrays (9 bytes) per EPC page (goal: <= 24)."""
    m, pool, o = machine(("16M@0",))
    epcm = m.processor.epcm.nbytes / m.processor.epcm.nr_pages
    assert epcm == 10 and pool.nbytes_per_page == 9


def test_a_range_of_pages_converts_and_eremoves_as_the_array_of_them_within_and_across_sections():
    """The release's fast path hands runs of pages down as ranges (slices): addresses and EREMOVE results
    equal those of the same pages as an array, also for a run that crosses into the next section."""
    import numpy as np

    from vepc.kernel.cpu import eremove_batch

    m, pool, o = machine()
    for pages in (range(3, 40), range(250, 262), range(0, 512)):
        arr = np.arange(pages.start, pages.stop)
        got = pool.phys_addr_batch(pages)
        assert list(got) == pool.phys_addr_batch(arr).tolist()
        assert isinstance(got, range) == (pool.section_of(pages.start) is pool.section_of(pages.stop - 1))
        assert eremove_batch(m.kernel.cpu, got).tolist() == eremove_batch(m.kernel.cpu, pool.phys_addr_batch(arr)).tolist()
    assert m.processor.epc_index_range(range(pool.phys_addr(0), pool.phys_addr(0) + 8192, 4096)) == range(0, 2)
    assert m.processor.epc_index_range(range(pool.phys_addr(0) + 1, pool.phys_addr(0) + 8193, 4096)) is None


def test_free_ring_keeps_fifo_order_with_the_boot_run_unwritten():
    """NumaNode keeps the boot's in-order run as (first, length) until a push breaks it: any sequence of
    pushes, pops and takes gives the pages a plain FIFO would, and booting writes no ring memory."""
    import random
    from collections import deque

    import numpy as np

    from vepc.kernel.epc_pool import NumaNode

    m, pool, o = machine(epc=("1M@0",))
    node = pool.nodes[0]
    assert node.run_len == node.capacity == 256 and not node.ring.any()      # boot: nothing written
    for seed in range(30):
        rng = random.Random(seed)
        cap = rng.randint(4, 40)
        nd = NumaNode(0, capacity=cap, ring=np.zeros(cap, dtype=np.uint32))
        ref: deque[int] = deque()
        start = rng.randint(0, 50)
        k = rng.randint(0, cap)
        nd.push_many(np.arange(start, start + k))
        ref.extend(range(start, start + k))
        for _ in range(60):
            op = rng.random()
            if op < 0.3 and ref:
                assert nd.pop() == ref.popleft()
            elif op < 0.5 and ref:
                j = rng.randint(1, len(ref))
                assert nd.take(j).tolist() == [ref.popleft() for _ in range(j)]
            elif op < 0.7 and len(ref) < cap:
                p = rng.randint(0, 99)
                nd.push(p)
                ref.append(p)
            elif len(ref) < cap:
                j = rng.randint(1, cap - len(ref))
                first = rng.choice([ref[-1] + 1 if ref else 0, rng.randint(0, 99)])
                pages = np.arange(first, first + j) if rng.random() < 0.6 else np.array(rng.sample(range(100), j))
                nd.push_many(pages)
                ref.extend(pages.tolist())
            assert nd.free_pages().tolist() == list(ref) and nd.nr_free == len(ref)
