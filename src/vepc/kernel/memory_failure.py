"""Memory failure (machine check) on EPC: ``arch_memory_failure`` and ``arch_is_platform_page`` of
arch/x86/kernel/cpu/sgx/main.c (Tony Luck's series, 5.17; reference linux-sgx.md §1b).

mm/memory-failure.c calls ``arch_memory_failure(pfn, flags)`` for an error in memory that has no
``struct page`` -- which includes, but is not limited to, the EPC:

1. the pfn is looked up in ``sgx_epc_address_space`` (``sgx_paddr_to_page``); not EPC → ``-ENXIO``;
2. ``MF_ACTION_REQUIRED`` (the poison was consumed synchronously): SIGBUS to the current task -- the
   hardware already left the enclave and will not re-enter one with a memory error;
3. under the node lock: an already poisoned page needs nothing more; otherwise ``page->poison = 1``;
4. a free page (``SGX_EPC_PAGE_IS_FREE``) moves from the node's free list to its poison list;
5. a page in use is taken off the reclaimer's list (``sgx_unmark_page_reclaimable``) and left where it
   is: ``sgx_free_epc_page`` diverts it to the poison list when its user gives it back (a vepc page: at
   release, after EREMOVE). There is no vEPC-specific handling upstream (no vMCE to the guest).

The node free list of the model is a FIFO ring (:class:`vepc.kernel.epc_pool.NumaNode`): the page is cut
out of the ring in place and the pages behind it move up one slot, so the others keep their order (what
``list_move`` does to a linked list), and the free counts drop by one -- the model keeps
``sgx_nr_free_pages`` equal to the free-list lengths (an invariant of :mod:`vepc.kernel.invariants`).

>>> from vepc.machine import Machine
>>> k = Machine.build(epc=["1M@0"]).kernel
>>> arch_memory_failure(k, 0x1000, 0), arch_memory_failure(k, k.pool.phys_addr(7) >> 12, 0), k.pool.nr_free
(-6, 0, 255)
"""

from __future__ import annotations

import errno
import signal
from typing import TYPE_CHECKING

import numpy as np

from vepc.arch.constants import PAGE_SHIFT
from vepc.events import EventKind
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_POISON, NumaNode

if TYPE_CHECKING:
    from vepc.kernel.kernel import Kernel

__all__ = ["arch_memory_failure", "arch_is_platform_page", "MF_COUNT_INCREASED", "MF_ACTION_REQUIRED",
           "MF_MUST_KILL", "MF_SOFT_OFFLINE", "MF_SW_SIMULATED"]

# include/linux/mm.h, enum mf_flags.
MF_COUNT_INCREASED = 1 << 0
MF_ACTION_REQUIRED = 1 << 1
MF_MUST_KILL = 1 << 2
MF_SOFT_OFFLINE = 1 << 3
MF_SW_SIMULATED = 1 << 5


def arch_is_platform_page(kernel: "Kernel", paddr: int) -> bool:
    """``arch_is_platform_page``: whether ``paddr`` lies in an EPC section (``sgx_epc_address_space``)."""
    return kernel.pool is not None and kernel.pool.page_of_phys(paddr) >= 0


def _ring_remove(node: NumaNode, page: int) -> bool:
    """Cut ``page`` out of the node's FIFO free ring, keeping the order of the others. Caller holds
    ``node.lock``. False if the page is not on the ring."""
    cap = node.capacity
    n = node.nr_free
    if not n:
        return False
    node.materialize()
    pos = (node.head + np.arange(n, dtype=np.int64)) % cap
    hit = np.flatnonzero(node.ring[pos] == page)
    if not len(hit):
        return False
    i = int(hit[0])
    # Pages behind the hole move up one slot (toward the head); the tail shrinks by one.
    node.ring[pos[i:n - 1]] = node.ring[pos[i + 1:n]]
    node.tail -= 1
    return True


def arch_memory_failure(kernel: "Kernel", pfn: int, flags: int) -> int:
    """``arch_memory_failure(pfn, flags)`` on ``kernel``'s EPC: 0, or ``-ENXIO`` when ``pfn`` is not EPC."""
    pool = kernel.pool
    page = pool.page_of_phys(pfn << PAGE_SHIFT) if pool is not None else -1
    # Other address ranges without a struct page reach this hook too.
    if page < 0:
        return -errno.ENXIO
    # Poison consumed synchronously: the task that touched it learns why its enclave broke.
    if flags & MF_ACTION_REQUIRED and kernel.current is not None and kernel.current.alive:
        kernel.current.deliver_signal(signal.SIGBUS, pfn << PAGE_SHIFT)
    node = pool.nodes[pool.node_of(page)]
    with node.lock:
        if pool.flags[page] & PAGE_POISON:
            return 0                                   # already poisoned: nothing more to do
        pool.flags[page] |= PAGE_POISON
        moved = bool(pool.flags[page] & PAGE_IS_FREE)
        if moved:
            # list_move(&page->list, &node->sgx_poison_page_list)
            if _ring_remove(node, page):
                pool.account_free(-1)
            node.poison.append(page)
    if moved:
        kernel.printk(f"sgx: memory failure at pfn {pfn:#x}: free EPC page {page} quarantined")
        kernel.events.emit(EventKind.EPC_POISON, page=page, arg=flags)
        return 0
    # In use: off the reclaimer's list; sgx_free_epc_page quarantines it when its user lets go. (Upstream
    # calls this under node->lock; no model path takes the reclaimer lock inside a node lock, so taking it
    # right after is equivalent and keeps one lock order.) A page the reclaimer holds right now (-EBUSY)
    # is freed by the reclaimer, to the poison list.
    pool.unmark_reclaimable(page)
    kernel.printk(f"sgx: memory failure at pfn {pfn:#x}: EPC page {page} in use, quarantined when freed")
    return 0
