"""The EPC reclaimer: ``sgx_reclaim_pages`` and its helpers (arch/x86/kernel/cpu/sgx/main.c).

One batch takes up to ``SGX_NR_TO_SCAN`` (16) pages from the head of the active list:

1. Keep a page only if its enclave is not being released (``kref_get_unless_zero``); otherwise clear
   ``SGX_EPC_PAGE_RECLAIMER_TRACKED`` -- the owner is freeing it.
2. ``sgx_reclaimer_age``: a page whose PTE is young in any mm has its accessed bit cleared and goes back
   to the tail of the active list. Otherwise its backing pages are pinned and it is marked
   ``SGX_ENCL_PAGE_BEING_RECLAIMED``.
3. ``sgx_reclaimer_block``: zap the page's PTEs in every mm of the enclave, then EBLOCK.
4. ``sgx_reclaimer_write``: EWB into a VA slot -- on SGX_NOT_TRACKED, ETRACK and retry; still
   SGX_NOT_TRACKED, IPI the CPUs of the enclave's mms (every logical processor inside the enclave takes an
   AEX) and retry. When the last child has gone and the enclave is initialized, the SECS is written out
   too (backing index ``PFN_DOWN(size)``). The page is then freed (EWB left it invalid: no EREMOVE).

>>> # see tests/test_kernel_reclaim.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vepc.arch.constants import PAGE_SHIFT, SGX_NR_LOW_PAGES, SGX_NR_TO_SCAN, SgxReturn, encls_failed
from vepc.events import EventKind
from vepc.kernel import encls
from vepc.kernel.encl import (
    PAGE_MASK, SGX_ENCL_INITIALIZED, SGX_ENCL_PAGE_BEING_RECLAIMED, EnclPage, SgxBacking,
)
from vepc.kernel.epc_pool import PAGE_RECLAIMER_TRACKED

if TYPE_CHECKING:
    from vepc.kernel.encl import Encl, EnclaveDriver

__all__ = ["sgx_reclaim_pages", "sgx_reclaim_direct", "sgx_encl_ewb", "sgx_ipi_encl"]


def sgx_reclaimer_age(drv: "EnclaveDriver", epc_page: int) -> bool:
    """``sgx_reclaimer_age``: False (young) as soon as one mm had the page's accessed bit set (cleared now)."""
    page = drv.owner_of[epc_page]
    for mm in page.encl.live_mms():
        if drv.test_and_clear_young(mm, page):
            return False
    return True


def sgx_reclaimer_block(drv: "EnclaveDriver", epc_page: int) -> None:
    """``sgx_reclaimer_block``: no new TLB entries for the page: zap its PTEs everywhere, then EBLOCK."""
    page = drv.owner_of[epc_page]
    encl = page.encl
    drv.zap_enclave_ptes(encl, page.desc & PAGE_MASK)
    with encl.lock:
        ret = encls.eblock(drv.cpu, drv.epc_addr(epc_page))
        if encls_failed(ret):
            drv.encls_warn(ret, "EBLOCK")


def _ewb(drv: "EnclaveDriver", epc_page: int, va_slot: int, backing: SgxBacking) -> int:
    """``__sgx_encl_ewb``: PAGEINFO {0, backing contents, PCMD slot, 0}."""
    pi = drv.write_pageinfo(0, backing.contents << PAGE_SHIFT, (backing.pcmd << PAGE_SHIFT) + backing.pcmd_offset, 0)
    return encls.ewb(drv.cpu, pi, drv.epc_addr(epc_page), va_slot)


def sgx_ipi_encl(drv: "EnclaveDriver", encl: "Encl") -> int:
    """``on_each_cpu_mask(sgx_encl_ewb_cpumask(encl), sgx_ipi_cb, NULL, 1)``: the (empty) IPI interrupts
    every CPU running one of the enclave's mms; those executing inside the enclave take an AEX, which
    flushes their enclave TLB entries. Returns how many logical processors left the enclave."""
    encl.live_mms()
    if encl.secs.epc_page is None:
        return 0
    kick = getattr(drv.cpu, "kick_enclave_threads", None)
    if kick is None:
        return 0
    return kick(drv.epc_addr(encl.secs.epc_page))


def sgx_encl_ewb(drv: "EnclaveDriver", epc_page: int, backing: SgxBacking) -> int:
    """``sgx_encl_ewb``: EWB, then ETRACK + EWB, then IPI + EWB. Returns the final EWB result."""
    encl_page = drv.owner_of[epc_page]
    encl = encl_page.encl
    encl_page.desc &= ~SGX_ENCL_PAGE_BEING_RECLAIMED
    va_page = encl.va_pages[0]
    va_offset = va_page.alloc_slot()
    va_slot = drv.epc_addr(va_page.epc_page) + va_offset
    if va_page.full():
        encl.va_pages.remove(va_page)                       # list_move_tail
        encl.va_pages.append(va_page)
    ret = _ewb(drv, epc_page, va_slot, backing)
    if ret == SgxReturn.SGX_NOT_TRACKED:
        ret = encls.etrack(drv.cpu, drv.epc_addr(encl.secs.epc_page))
        if ret and encls_failed(ret):
            drv.encls_warn(ret, "ETRACK")
        ret = _ewb(drv, epc_page, va_slot, backing)
        if ret == SgxReturn.SGX_NOT_TRACKED:
            # Slow path: kick the CPUs out of the enclave; the mask is taken after ETRACK.
            sgx_ipi_encl(drv, encl)
            ret = _ewb(drv, epc_page, va_slot, backing)
    drv.events.emit(EventKind.RECLAIM_EWB, owner=encl.owner_id, page=epc_page, arg=ret, arg2=encl_page.desc & PAGE_MASK)
    if ret:
        if encls_failed(ret):
            drv.encls_warn(ret, "EWB")
        va_page.free_slot(va_offset)
    else:
        encl_page.desc |= va_offset
        encl_page.va_page = va_page
    return ret


def sgx_reclaimer_write(drv: "EnclaveDriver", epc_page: int, backing: SgxBacking) -> None:
    """``sgx_reclaimer_write``: write the page out; the SECS follows its last child once initialized."""
    encl_page = drv.owner_of[epc_page]
    encl = encl_page.encl
    with encl.lock:
        sgx_encl_ewb(drv, epc_page, backing)
        encl_page.epc_page = None
        encl.secs_child_cnt -= 1
        if not encl.secs_child_cnt and encl.test(SGX_ENCL_INITIALIZED):
            secs_backing = drv.get_backing(encl, encl.size >> PAGE_SHIFT)
            if isinstance(secs_backing, int):
                return
            secs_page = encl.secs.epc_page
            sgx_encl_ewb(drv, secs_page, secs_backing)
            drv.encl_free_epc_page(secs_page)
            encl.secs.epc_page = None


def sgx_reclaim_pages(drv: "EnclaveDriver", lru=None) -> int:
    """``sgx_reclaim_pages``: one batch from the head of the active list (the EPC cgroup series: of the
    LRU ``lru``, default the root's, which is the active list). Returns how many pages it took for
    reclaim (the series' return value; mainline returns nothing)."""
    pool = drv.pool
    if lru is None:
        lru = pool.active
    chunk: list[int | None] = []
    with pool.reclaimer_lock:
        for _ in range(SGX_NR_TO_SCAN):
            if not lru:
                break
            epc_page, _ = lru.popitem(last=False)           # list_del_init: TRACKED stays set
            encl_page = drv.owner_of.get(epc_page)
            if encl_page is not None and encl_page.encl.kref_get_unless_zero():
                chunk.append(epc_page)
            else:
                # The owner is freeing the page; no need to put it back on the list.
                pool.flags[epc_page] &= 0xFF ^ PAGE_RECLAIMER_TRACKED
    backing: dict[int, SgxBacking] = {}
    for i, epc_page in enumerate(chunk):
        encl_page: EnclPage = drv.owner_of[epc_page]
        encl = encl_page.encl
        if sgx_reclaimer_age(drv, epc_page):
            page_index = (encl_page.desc - encl.base) >> PAGE_SHIFT
            with encl.lock:
                b = drv.get_backing(encl, page_index)
                if not isinstance(b, int):
                    backing[i] = b
                    encl_page.desc |= SGX_ENCL_PAGE_BEING_RECLAIMED
                    continue
        # skip: back to the tail of the list, drop the enclave reference.
        with pool.reclaimer_lock:
            lru[epc_page] = None
        encl.kref_put()
        chunk[i] = None
    taken = len(chunk)
    for epc_page in chunk:
        if epc_page is not None:
            sgx_reclaimer_block(drv, epc_page)
    for i, epc_page in enumerate(chunk):
        if epc_page is None:
            continue
        encl = drv.owner_of[epc_page].encl
        sgx_reclaimer_write(drv, epc_page, backing[i])
        encl.kref_put()
        pool.flags[epc_page] &= 0xFF ^ PAGE_RECLAIMER_TRACKED
        drv.free_epc_page(epc_page)
    return taken


def sgx_reclaim_direct(drv: "EnclaveDriver") -> None:
    """``sgx_reclaim_direct``: reclaim one batch when free pages are below the low watermark. With the
    EPC cgroup the current cgroup reclaims first when near its limit (``sgx_cgroup_reclaim_direct``), then
    the global check reclaims from the root's subtree."""
    cgs = drv.pool.cgroups
    if cgs is not None:
        cgs.reclaim_direct()
        if drv.pool.should_reclaim(SGX_NR_LOW_PAGES):
            cgs.reclaim_pages_global()
        return
    if drv.pool.should_reclaim(SGX_NR_LOW_PAGES):
        sgx_reclaim_pages(drv)
