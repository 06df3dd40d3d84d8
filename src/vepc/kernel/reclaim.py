"""ksgxd (main.c): boot-time sanitisation of all EPC and the reclaimer loop.

``sanitize`` runs ``__sgx_sanitize_pages`` twice over ``sgx_dirty_page_list`` (the second pass for SECS
pages whose children blocked EREMOVE in the first). With the batch paths on (``batch_enabled``) a pass
EREMOVEs a chunk of pages at a time through the CPU's ``eremove_batch`` and frees them with
``free_batch``; the effects, their order and the event totals are those of the page-by-page loop, also
when an EREMOVE faults into the host midway (a guest whose EPC cannot be backed).

``run`` is the kthread body, executed at the model's scheduling points: while
``sgx_should_reclaim(SGX_NR_HIGH_PAGES)``, reclaim a batch. The batch itself, ``reclaim_pages``
(``sgx_reclaim_pages``), lives with the enclave driver in :mod:`vepc.kernel.encl`.

>>> # see tests/test_kernel_boot.py and tests/test_kernel_reclaim.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import SGX_NR_HIGH_PAGES
from vepc.events import EventKind
from vepc.kernel.cpu import eremove_batch
from vepc.kernel.epc_pool import PAGE_DIRTY, PAGE_POISON, batch_enabled

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["Ksgxd"]

#: A ksgxd run that cannot bring free pages up to the high watermark stops after this many batches.
MAX_BATCHES_PER_RUN = 1 << 20
#: Pages per sanitisation chunk: bounds the temporary arrays of a terabyte boot.
SANITIZE_CHUNK = 1 << 15


class Ksgxd:
    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.pool = kernel.pool
        self.woken = False
        self.pool.wake_ksgxd = self.wake
        self.pool.reclaim_pages = self.reclaim_pages
        self.running = False

    # -- sanitisation --------------------------------------------------------------------------
    def _sanitize_pass(self, dirty, pass_no: int) -> list[int]:
        """``__sgx_sanitize_pages``: poisoned pages to the poison list, EREMOVE the rest; keep failures."""
        if batch_enabled(self.kernel, len(dirty)):
            return self._sanitize_pass_batch(dirty, pass_no)
        left: list[int] = []
        freed = 0
        if isinstance(dirty, np.ndarray):
            dirty = dirty.tolist()
        for page in dirty:
            freed += self._sanitize_page(page, left)
        self.kernel.events.emit(EventKind.EPC_SANITIZE, count=freed, arg=pass_no, arg2=len(left))
        return left

    def _sanitize_page(self, page: int, left: list[int]) -> int:
        """One page of ``__sgx_sanitize_pages``: a poisoned page goes to the poison list (never a free
        list); otherwise EREMOVE, then free it, or keep it on ``left``. Returns 1 if EREMOVE freed it."""
        pool = self.pool
        pool.flags[page] &= 0xFF ^ PAGE_DIRTY
        if pool.flags[page] & PAGE_POISON:
            pool.free(page)
            return 0
        if self.kernel.eremove(page) == 0:
            pool.free(page)
            return 1
        pool.flags[page] |= PAGE_DIRTY
        left.append(page)
        return 0

    def _sanitize_pass_batch(self, dirty, pass_no: int) -> list[int]:
        """The same pass, a chunk of the dirty list at a time."""
        left: list[int] = []
        freed = 0
        n = len(dirty)
        for lo in range(0, n, SANITIZE_CHUNK):
            hi = min(n, lo + SANITIZE_CHUNK)
            if isinstance(dirty, range):
                chunk = range(dirty.start + lo * dirty.step, dirty.start + hi * dirty.step, dirty.step)
            else:
                chunk = np.asarray(dirty[lo:hi], dtype=np.int64)
            freed += self._sanitize_chunk(chunk, left)
        self.kernel.events.emit(EventKind.EPC_SANITIZE, count=freed, arg=pass_no, arg2=len(left))
        return left

    def _sanitize_chunk(self, chunk, left: list[int]) -> int:
        """Sanitise the pages of ``chunk`` in order; append failures to ``left``; return pages freed.

        Per page the loop clears DIRTY, frees a poisoned page (to the poison list), else EREMOVEs it and
        frees it or puts DIRTY back. Here runs of pages are EREMOVEd by the CPU's batch and their
        bookkeeping applied together; a page the batch cannot take goes alone through ``kernel.eremove``
        after everything before it is done, so an exception (a guest's EPT fault that KVM cannot
        satisfy) leaves exactly the state the page-by-page loop leaves."""
        pool = self.pool
        contiguous = isinstance(chunk, range) and chunk.step == 1
        pages = np.arange(chunk.start, chunk.stop, dtype=np.int64) if contiguous else chunk
        flags_view = pool.flags[chunk.start:chunk.stop] if contiguous else pool.flags[pages]
        poisoned = (flags_view & PAGE_POISON) != 0
        cand_pos = np.flatnonzero(~poisoned) if poisoned.any() else None
        cand = pages if cand_pos is None else pages[cand_pos]
        addrs = pool.phys_addr_batch(cand)
        n = len(pages)
        freed = 0
        pos = 0                     # pages[:pos] are done
        ci = 0                      # cand[:ci] are done

        def apply(end: int, rets: np.ndarray) -> int:
            """Bookkeeping of pages[pos:end], whose candidates got EREMOVE results ``rets``."""
            if end <= pos:
                return 0
            seg = range(chunk.start + pos, chunk.start + end) if contiguous else pages[pos:end]
            pool.flags[slice(seg.start, seg.stop) if contiguous else seg] &= 0xFF ^ PAGE_DIRTY
            if cand_pos is None:
                ok = rets == 0
            else:
                ok = np.ones(end - pos, dtype=bool)           # poisoned pages are freed (poison list)
                ok[~poisoned[pos:end]] = rets == 0
            if ok.all():
                pool.free_batch(seg)
            else:
                segp = pages[pos:end]
                pool.free_batch(segp[ok])
                failed = segp[~ok]
                pool.flags[failed] |= PAGE_DIRTY
                left.extend(failed.tolist())
            return int(np.count_nonzero(rets == 0))

        while ci < len(cand):
            rets = eremove_batch(self.kernel.cpu, addrs[ci:])
            if len(rets):
                end = (ci + len(rets)) if cand_pos is None else int(cand_pos[ci + len(rets) - 1]) + 1
                freed += apply(end, rets)
                pos = end
                ci += len(rets)
            if ci < len(cand):
                # The batch stopped before cand[ci]: pages up to it first, then that page alone.
                at = ci if cand_pos is None else int(cand_pos[ci])
                freed += apply(at, np.zeros(0, dtype=np.int64))
                pos = at
                freed += self._sanitize_page(int(cand[ci]), left)
                pos += 1
                ci += 1
        freed += apply(n, np.zeros(0, dtype=np.int64))          # trailing poisoned pages
        return freed

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
                if stalled > 2 * (self.pool.nr_reclaimable() // 16 + 1):
                    break
            self.woken = False
        finally:
            self.running = False

    def reclaim_pages(self) -> None:
        """``sgx_reclaim_pages_global``: one batch of the enclave driver's ``sgx_reclaim_pages`` (it owns the
        enclave page structures); with the EPC cgroup, one round over the root's subtree."""
        if self.pool.cgroups is not None:
            self.pool.cgroups.reclaim_pages_global()
            return
        drv = self.kernel.enclave_driver
        if drv is not None:
            drv.reclaim_pages()
