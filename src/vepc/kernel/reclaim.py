"""ksgxd (main.c): boot-time sanitisation of all EPC and the reclaimer loop.

``sanitize`` runs ``__sgx_sanitize_pages`` twice over ``sgx_dirty_page_list`` (the second pass for SECS
pages whose children blocked EREMOVE in the first). ``run`` is the kthread body, executed at the model's
scheduling points: while ``sgx_should_reclaim(SGX_NR_HIGH_PAGES)``, reclaim a batch. The batch itself,
``reclaim_pages`` (``sgx_reclaim_pages``), lives with the enclave driver in :mod:`vepc.kernel.encl`.

>>> # see tests/test_kernel_boot.py and tests/test_kernel_reclaim.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vepc.arch.constants import SGX_NR_HIGH_PAGES
from vepc.events import EventKind
from vepc.kernel.epc_pool import PAGE_DIRTY, PAGE_POISON

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["Ksgxd"]

#: A ksgxd run that cannot bring free pages up to the high watermark stops after this many batches.
MAX_BATCHES_PER_RUN = 1 << 20


class Ksgxd:
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.pool = kernel.pool
        self.woken = False
        self.pool.wake_ksgxd = self.wake
        self.pool.reclaim_pages = self.reclaim_pages
        self.running = False

    # -- sanitisation --------------------------------------------------------------------------
    def _sanitize_pass(self, dirty: list[int], pass_no: int) -> list[int]:
        """``__sgx_sanitize_pages``: poisoned pages to the poison list, EREMOVE the rest; keep failures."""
        pool = self.pool
        left: list[int] = []
        freed = 0
        for page in dirty:
            pool.flags[page] &= 0xFF ^ PAGE_DIRTY
            if pool.flags[page] & PAGE_POISON:
                pool.free(page)          # a poisoned page goes to the poison list, never a free list
                continue
            if self.kernel.eremove(page) == 0:
                pool.free(page)
                freed += 1
            else:
                pool.flags[page] |= PAGE_DIRTY
                left.append(page)
        self.kernel.events.emit(EventKind.EPC_SANITIZE, count=freed, arg=pass_no, arg2=len(left))
        return left

    def sanitize(self) -> None:
        """ksgxd start: two passes; the second handles SECS pages whose children blocked the first."""
        left = self._sanitize_pass(self.pool.dirty, 1)
        left = self._sanitize_pass(left, 2)
        self.pool.dirty = left
        if left:
            self.kernel.warn_once("sanitize", f"WARNING: ksgxd: {len(left)} EPC pages left unsanitized")

    # -- reclaim -------------------------------------------------------------------------------
    def wake(self) -> None:
        """``wake_up(&ksgxd_waitq)``."""
        if not self.woken:
            self.woken = True
            self.kernel.events.emit(EventKind.RECLAIMER_WAKE)

    def run(self) -> None:
        """The kthread loop body: reclaim while free pages are below the high watermark."""
        if self.running:
            return
        self.running = True
        try:
            batches = stalled = 0
            while self.pool.should_reclaim(SGX_NR_HIGH_PAGES) and batches < MAX_BATCHES_PER_RUN:
                before = self.pool.nr_free
                self.reclaim_pages()
                batches += 1
                # A batch that only aged pages frees nothing; upstream keeps looping. The model stops once
                # two full passes over the active list freed nothing (pages that stay young forever).
                stalled = 0 if self.pool.nr_free > before else stalled + 1
                if stalled > 2 * (len(self.pool.active) // 16 + 1):
                    break
            self.woken = False
        finally:
            self.running = False

    def reclaim_pages(self) -> None:
        """``sgx_reclaim_pages``: provided by the enclave driver (it owns the enclave page structures)."""
        drv = self.kernel.enclave_driver
        if drv is not None:
            drv.reclaim_pages()
