"""The EPC reclaimer (main.c ``sgx_reclaim_pages``) and the enclave fault path that brings pages back
(encl.c ``sgx_vma_fault`` -> ``sgx_encl_load_page`` -> ``sgx_encl_eldu``): batches from the head of the
active list, ageing by the accessed bit, EBLOCK after zapping PTEs in every mm, EWB with the ETRACK and IPI
retries, the SECS following its last child, ELDU (SECS first) on fault."""

from __future__ import annotations

import errno
import signal

import pytest

from vepc.arch.constants import SGX_NR_TO_SCAN, SgxReturn
from vepc.events import EventKind
from vepc.kernel.encl import SGX_ENCL_PAGE_BEING_RECLAIMED
from vepc.kernel.mm import MAP_SHARED, VM_FAULT_NOPAGE

from test_kernel_enclave import PAGE, REG_RW, TCS, App, all_free, host, needs_einit, page_bytes, tcs_page


def filled_app(m, npages: int, size: int = 1 << 21, init: bool = False, debug: bool = False) -> App:
    """An enclave with ``npages`` distinct REG pages (and a TCS after them when ``init``)."""
    app = App(m)
    app.create(size=size, attributes=(0x6 if debug else 0x4))
    app.add(0, [page_bytes(i) for i in range(npages)], REG_RW, measure=False)
    if init:
        app.add(npages * PAGE, tcs_page(), TCS)
        app.init()
    return app


def ewb_events(m, since=0):
    return [e for e in m.events.since(since) if e.kind == EventKind.RECLAIM_EWB]


def eldu_events(m, since=0):
    return [e for e in m.events.since(since) if e.kind == EventKind.RECLAIM_ELDU]


def vepc_fill(m, npages: int):
    """A VMM process touching ``npages`` vEPC pages (faults, no scheduling point: ksgxd does not run)."""
    qemu = m.kernel.spawn("qemu")
    fd = qemu.open("/dev/sgx_vepc")
    addr = qemu.mmap(4 << 20, flags=MAP_SHARED, fd=fd)
    assert qemu.touch(addr, npages * PAGE)
    return qemu, addr


def test_batch_takes_sgx_nr_to_scan_pages_from_the_head_of_the_active_list():
    m = host()
    app = filled_app(m, 40)
    pool = m.kernel.pool
    head = list(pool.active)[:SGX_NR_TO_SCAN]
    free = pool.nr_free
    m.kernel.enclave_driver.reclaim_pages()
    assert pool.nr_free == free + SGX_NR_TO_SCAN
    assert [e.arg for e in ewb_events(m)] == [0] * SGX_NR_TO_SCAN
    assert not set(head) & set(pool.active)
    assert app.encl.swapped_pages() == SGX_NR_TO_SCAN
    # Each swapped page has a VA slot and its contents + PCMD in the backing store.
    for offset in range(0, SGX_NR_TO_SCAN * PAGE, PAGE):
        entry = app.entry(offset)
        assert entry.epc_page is None and entry.va_page is app.encl.va_pages[0]
    assert len(app.encl.backing) == SGX_NR_TO_SCAN + 1          # 16 contents pages + 1 PCMD page
    app.close()
    all_free(m)


def test_allocation_with_reclaim_when_epc_is_full_swaps_out_enclave_pages():
    m = host()                                                  # 256 EPC pages
    a = filled_app(m, 150)
    b = App(m, "b")
    b.create()
    qemu, _ = vepc_fill(m, m.kernel.pool.nr_free)
    assert m.kernel.pool.nr_free == 0
    since = len(m.events)
    b.add(0, [page_bytes(1000 + i) for i in range(4)])         # sgx_alloc_epc_page(reclaim=true)
    events = list(m.events.since(since))
    first_add = next(i for i, e in enumerate(events) if e.kind == EventKind.ENCL_ADD)
    direct = [e for e in events[:first_add] if e.kind == EventKind.RECLAIM_EWB]
    assert len(direct) == SGX_NR_TO_SCAN                       # one batch, before the first EADD
    assert all(e.owner == a.encl.owner_id and e.arg == 0 for e in direct)
    assert b.epc_contents(0x3000) == page_bytes(1003)
    qemu.exit()
    a.close()
    b.close()
    all_free(m)


def test_swapped_pages_fault_back_with_their_contents_intact():
    m = host()
    app = filled_app(m, 32)
    drv = m.kernel.enclave_driver
    drv.reclaim_pages()
    drv.reclaim_pages()
    assert app.encl.swapped_pages() == 32
    addr = app.mmap()
    for i in range(32):
        assert app.p.fault(addr + i * PAGE) == VM_FAULT_NOPAGE
        assert app.epc_contents(i * PAGE) == page_bytes(i)
    assert len(eldu_events(m)) == 32 and all(e.arg == 0 for e in eldu_events(m))
    assert app.encl.swapped_pages() == 0
    # ELDU truncated every backing page (contents and the emptied PCMD pages) and freed the VA slots.
    assert len(app.encl.backing) == 0
    assert app.encl.va_pages[0].slots == 0
    app.close()
    all_free(m)


def test_debug_enclave_pages_read_back_through_edbgrd_after_a_swap_round_trip():
    m = host()
    from vepc.arch.constants import Leaf
    if Leaf.EDBGRD not in m.processor.leaves:
        pytest.skip("ENCLS[EDBGRD] not available in this build of the silicon model")
    app = filled_app(m, 16, debug=True)
    m.kernel.enclave_driver.reclaim_pages()
    addr = app.mmap()
    vma = app.p.find_vma(addr)
    data = vma.vm_ops.access(vma, addr + 3 * PAGE + 8, 24)         # sgx_vma_access: reloads with ELDU
    assert data == page_bytes(3)[8:32]
    app.close()
    all_free(m)


def test_young_pages_are_aged_and_moved_to_the_tail_then_reclaimed_on_the_next_pass():
    m = host()
    app = filled_app(m, 4)
    addr = app.mmap()
    app.p.fault(addr + PAGE)                                   # accessed: young
    young = app.entry(PAGE).epc_page
    drv = m.kernel.enclave_driver
    drv.reclaim_pages()
    assert list(m.kernel.pool.active) == [young]              # skipped, back on the list
    assert app.entry(PAGE).epc_page == young
    assert app.p.translate(addr + PAGE) is not None            # still mapped
    assert not app.encl.young                                  # the accessed bit was cleared
    drv.reclaim_pages()
    assert app.entry(PAGE).epc_page is None
    assert app.p.translate(addr + PAGE) is None                # zapped before EBLOCK
    assert app.p.fault(addr + PAGE) == VM_FAULT_NOPAGE
    assert app.epc_contents(PAGE) == page_bytes(1)
    app.close()
    all_free(m)


def test_reclaim_zaps_the_pte_in_every_process_mapping_the_enclave():
    m = host()
    app = filled_app(m, 2)
    addr = app.mmap()
    app.p.fault(addr)
    child = app.p.fork("child")
    assert child.translate(addr) is not None
    drv = m.kernel.enclave_driver
    drv.reclaim_pages()                                        # ages page 0 (young in the parent)
    drv.reclaim_pages()
    assert app.entry(0).epc_page is None
    assert app.p.translate(addr) is None and child.translate(addr) is None
    assert child.fault(addr) == VM_FAULT_NOPAGE                # the child faults it back in
    assert child.translate(addr) == m.kernel.pool.phys_addr(app.entry(0).epc_page)
    child.exit()
    app.close()
    all_free(m)


def test_secs_stays_resident_while_the_enclave_is_not_initialized():
    m = host()
    app = filled_app(m, 8)
    m.kernel.enclave_driver.reclaim_pages()
    assert app.encl.swapped_pages() == 8 and app.encl.secs_child_cnt == 0
    assert app.encl.secs.epc_page is not None
    app.close()
    all_free(m)


def test_secs_is_written_out_after_its_last_child_and_reloaded_first_on_fault():
    m = host()
    needs_einit(m)
    app = filled_app(m, 7, init=True)                          # 7 REG + TCS = 8 children
    mrenclave = app.secs_state().mrenclave
    m.kernel.enclave_driver.reclaim_pages()
    ewbs = ewb_events(m)
    assert len(ewbs) == 9 and ewbs[-1].arg2 == 0               # the SECS last (address 0)
    assert app.encl.secs.epc_page is None and app.encl.secs_child_cnt == 0
    counts = m.kernel.pool.counts()
    assert (counts["host_enclave"], counts["va"]) == (0, 1)
    since = len(m.events)
    addr = app.mmap()
    assert app.p.fault(addr + 5 * PAGE) == VM_FAULT_NOPAGE
    eldus = eldu_events(m, since)
    assert [e.arg2 for e in eldus] == [0, app.base + 5 * PAGE]  # SECS first, then the page
    assert app.secs_state().mrenclave == mrenclave and app.secs_state().initialized
    assert app.epc_contents(5 * PAGE) == page_bytes(5)
    assert app.encl.secs_child_cnt == 1
    app.close()
    all_free(m)


def test_ewb_of_a_page_with_a_thread_inside_needs_etrack_then_the_ipi():
    m = host()
    needs_einit(m)
    app = filled_app(m, 2, init=True)
    lp = m.processor.lp(1)
    lp.eenter(app.silicon_index(2 * PAGE))
    since = len(m.events)
    m.kernel.enclave_driver.reclaim_pages()
    # EWB -> SGX_NOT_TRACKED; ETRACK; EWB -> SGX_NOT_TRACKED (the LP is still inside); IPI: AEX; EWB ok.
    aex = [e for e in m.events.since(since) if e.kind == EventKind.AEX]
    assert len(aex) == 1 and aex[0].arg == lp.id
    assert lp.inside is None
    assert all(e.arg == 0 for e in ewb_events(m, since))
    assert app.encl.swapped_pages() == 3 and app.encl.secs_child_cnt == 0          # TCS included
    app.close()
    all_free(m)


def test_ewb_without_a_thread_inside_succeeds_after_etrack_without_an_ipi():
    m = host()
    needs_einit(m)
    app = filled_app(m, 2, init=True)
    since = len(m.events)
    m.kernel.enclave_driver.reclaim_pages()
    assert not [e for e in m.events.since(since) if e.kind == EventKind.AEX]
    assert [e.arg for e in ewb_events(m, since)] == [0, 0, 0, 0]        # 2 REG, TCS, SECS
    assert app.encl.secs.epc_page is None
    app.close()
    all_free(m)


def test_pages_of_an_enclave_being_released_are_dropped_from_the_active_list():
    """kref_get_unless_zero fails: the reclaimer clears RECLAIMER_TRACKED and leaves the page to its owner."""
    m = host()
    app = filled_app(m, 2)
    encl = app.encl
    refcount = encl.refcount
    encl.refcount = 0                                          # release in progress
    page = next(iter(m.kernel.pool.active))
    m.kernel.enclave_driver.reclaim_pages()
    assert not m.kernel.pool.active
    assert not m.kernel.pool.flags[page] & 1
    assert app.encl.swapped_pages() == 0
    encl.refcount = refcount
    app.close()
    all_free(m)


def test_being_reclaimed_flag_is_clear_after_a_batch_and_overlaps_the_va_offset_bits():
    m = host()
    app = filled_app(m, 20)
    m.kernel.enclave_driver.reclaim_pages()
    for entry in app.encl.page_array.values():
        if entry.epc_page is not None:
            assert not entry.desc & SGX_ENCL_PAGE_BEING_RECLAIMED
    slots = sorted(e.desc & 0xFF8 for e in app.encl.page_array.values() if e.epc_page is None)
    assert slots == [i << 3 for i in range(SGX_NR_TO_SCAN)]     # slot offsets live in desc bits 11:3
    app.close()
    all_free(m)


def test_ksgxd_reclaims_up_to_the_high_watermark_at_a_scheduling_point():
    m = host()
    app = filled_app(m, 150)
    pool = m.kernel.pool
    qemu, _ = vepc_fill(m, pool.nr_free - 10)
    assert pool.nr_free == 10
    m.kernel.schedule()
    assert 64 <= pool.nr_free < 64 + SGX_NR_TO_SCAN
    qemu.exit()
    app.close()
    all_free(m)


def test_eldu_whose_allocation_is_ebusy_refaults_until_ksgxd_frees_a_page():
    """The ELDU allocation does not reclaim: -EBUSY -> VM_FAULT_NOPAGE; the access re-faults while ksgxd
    (woken by the failed allocation) frees pages."""
    m = host()
    a = filled_app(m, 200)                                     # the ioctl's scheduling point ran ksgxd
    m.kernel.enclave_driver.reclaim_pages()
    assert a.entry(0).epc_page is None
    qemu, _ = vepc_fill(m, m.kernel.pool.nr_free)
    assert m.kernel.pool.nr_free == 0 and m.kernel.pool.active
    addr = a.mmap()
    assert a.p.fault(addr) == VM_FAULT_NOPAGE
    assert a.epc_contents(0) == page_bytes(0)
    fails = [e for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL]
    assert fails and fails[0].arg == -errno.EBUSY
    qemu.exit()
    a.close()
    all_free(m)


def test_vepc_fault_with_epc_held_by_enclaves_retries_while_ksgxd_swaps_them_out():
    m = host()
    app = filled_app(m, 200)
    swapped = app.encl.swapped_pages()
    qemu, addr = vepc_fill(m, m.kernel.pool.nr_free)
    assert m.kernel.pool.nr_free == 0
    assert qemu.touch(addr + (2 << 20), 8 * PAGE)              # -EBUSY -> VM_FAULT_RETRY -> ksgxd
    assert app.encl.swapped_pages() > swapped
    qemu.exit()
    app.close()
    all_free(m)


def test_eldu_with_no_free_page_and_nothing_reclaimable_is_sigbus():
    """sgx_alloc_epc_page: no free page and an empty active list -> -ENOMEM (not -EBUSY) -> SIGBUS."""
    m = host()
    app = filled_app(m, 16)
    m.kernel.enclave_driver.reclaim_pages()
    qemu = m.kernel.spawn("qemu")
    fd = qemu.open("/dev/sgx_vepc")
    addr = qemu.mmap(1 << 20, flags=MAP_SHARED, fd=fd)
    assert qemu.touch(addr, m.kernel.pool.nr_free * PAGE)
    assert m.kernel.pool.nr_free == 0 and not m.kernel.pool.active
    hits = []
    app.p.sigaction(signal.SIGBUS, lambda s, a: hits.append(a))
    a = app.mmap()
    app.p.fault(a)
    assert hits == [a]
    fails = [e for e in m.events if e.kind == EventKind.EPC_ALLOC_FAIL]
    assert fails[-1].arg == -errno.ENOMEM
    qemu.exit()
    app.close()
    all_free(m)


def test_release_frees_resident_and_swapped_pages_va_pages_and_the_backing_store():
    m = host()
    ram_before = m.kernel.ram.in_use
    app = filled_app(m, 40)
    m.kernel.enclave_driver.reclaim_pages()
    assert len(app.encl.backing) > 0
    backing = app.encl.backing
    app.close()
    assert len(backing) == 0
    assert m.kernel.ram.in_use == ram_before
    all_free(m)


def test_sgx2_ioctl_on_a_swapped_page_loads_it_back_first():
    m = host()
    needs_einit(m)
    app = filled_app(m, 4, init=True)
    m.kernel.enclave_driver.reclaim_pages()
    assert app.encl.secs.epc_page is None
    from test_kernel_enclave import restrict
    ret, (_, _, _, result, count) = restrict(app, 0, PAGE, 0x1)
    assert (ret, result, count) == (0, 0, PAGE)
    assert app.entry(0).epc_page is not None and app.encl.secs.epc_page is not None
    assert app.m.processor.epcm.describe(app.silicon_index(0))["pr"] is True
    app.close()
    all_free(m)


def test_eldu_mac_failure_loses_the_page_and_faults_sigbus():
    """A corrupted backing page: ELDU answers SGX_MAC_COMPARE_FAIL, sgx_encl_eldu returns -EFAULT, the
    fault is SIGBUS (and the backing pages are truncated anyway, as upstream does)."""
    m = host()
    app = filled_app(m, 16)
    m.kernel.enclave_driver.reclaim_pages()
    pfn = app.encl.backing.pages[0]
    m.kernel.write_phys(pfn << 12, b"\x00\x01\x02")
    hits = []
    app.p.sigaction(signal.SIGBUS, lambda s, a: hits.append(a))
    addr = app.mmap()
    app.p.fault(addr)
    assert hits == [addr]
    assert [e.arg for e in eldu_events(m)] == [SgxReturn.SGX_MAC_COMPARE_FAIL]
    assert any("ELDU returned 9" in w for w in m.events.warnings())     # ENCLS_WARN
    assert 0 not in app.encl.backing.pages
    assert app.entry(0).epc_page is None
    app.close()
    assert m.kernel.pool.counts()["free"] == m.kernel.pool.nr_pages
