"""The EPC page pool of arch/x86/kernel/cpu/sgx/main.c: sections, free lists per NUMA node, the poison
lists, the dirty (boot) list, the reclaimer's active list, allocation and free.

Per-page state is kept in arrays (``owner`` uint32 and ``flags`` uint8, one row per EPC page); each
node's free list is a FIFO ring of page numbers (allocation takes the head, free appends at the tail, as
``list_first_entry``/``list_add_tail`` do), so batch operations are slices.

Allocation (reference §2.3, ``sgx_alloc_epc_page``)::

    for (;;):
        page = __sgx_alloc_epc_page()          # local node first, then round robin
        if ok: owner = owner; break
        if list_empty(active): return -ENOMEM  # no ksgxd wakeup on this path
        if !reclaim: page = -EBUSY; break
        if signal_pending(current): page = -ERESTARTSYS; break
        sgx_reclaim_pages()
    if sgx_should_reclaim(SGX_NR_LOW_PAGES): wake ksgxd

>>> # see tests/test_kernel_pool.py for the behaviour; the pool is built by Kernel.boot()
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, SGX_NR_LOW_PAGES
from vepc.events import EventKind, EventLog
from vepc.kernel.owners import OwnerKind, OwnerRegistry
from vepc.types import PhysAddr

__all__ = ["EpcPool", "KSection", "NumaNode", "PAGE_RECLAIMER_TRACKED", "PAGE_IS_FREE", "PAGE_POISON",
           "PAGE_DIRTY", "KERNEL_BYTES_PER_PAGE", "ERESTARTSYS"]

# sgx.h page flags (§2.1); POISON is ``sgx_epc_page.poison``; DIRTY marks sgx_dirty_page_list membership.
PAGE_RECLAIMER_TRACKED = 1 << 0
PAGE_IS_FREE = 1 << 1
PAGE_POISON = 1 << 2
PAGE_DIRTY = 1 << 3

#: owner (4) + flags (1) + one free-ring slot (4).
KERNEL_BYTES_PER_PAGE = 9

#: include/linux/errno.h: kernel-internal "restart the system call" (never seen by user space).
ERESTARTSYS = 512


@dataclass
class KSection:
    """``struct sgx_epc_section``: physical base, page count, first global page number, node."""

    id: int
    phys_addr: PhysAddr
    nr_pages: int
    first: int
    node: int

    @property
    def size(self) -> int:
        return self.nr_pages << PAGE_SHIFT


@dataclass
class NumaNode:
    """``struct sgx_numa_node``: FIFO free list (a ring), poison list, size."""

    id: int
    capacity: int = 0
    ring: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))
    head: int = 0
    tail: int = 0
    poison: list[int] = field(default_factory=list)
    size: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nr_free(self) -> int:
        return self.tail - self.head

    def push(self, page: int) -> None:
        self.ring[self.tail % self.capacity] = page
        self.tail += 1

    def pop(self) -> int:
        page = int(self.ring[self.head % self.capacity])
        self.head += 1
        return page

    def free_pages(self) -> np.ndarray:
        """The free list in order (head first)."""
        idx = np.arange(self.head, self.tail) % max(self.capacity, 1)
        return self.ring[idx]


class EpcPool:
    """EPC sections and page bookkeeping of one kernel (host or guest)."""

    def __init__(self, sections: list[KSection], owners: OwnerRegistry, events: EventLog) -> None:
        self.sections = sections
        self.nr_pages = sum(s.nr_pages for s in sections)
        self.owners = owners
        self.events = events
        self.owner = np.zeros(self.nr_pages, dtype=np.uint32)
        self.flags = np.zeros(self.nr_pages, dtype=np.uint8)
        self.nodes: dict[int, NumaNode] = {}
        for s in sections:
            node = self.nodes.setdefault(s.node, NumaNode(s.node))
            node.capacity += s.nr_pages
            node.size += s.size
        for node in self.nodes.values():
            node.ring = np.zeros(node.capacity, dtype=np.uint32)
        self.numa_mask = sorted(self.nodes)
        self._section_of = np.zeros(self.nr_pages, dtype=np.uint8) if len(sections) > 1 else None
        if self._section_of is not None:
            for s in sections:
                self._section_of[s.first:s.first + s.nr_pages] = s.id
        self._starts = [s.first for s in sections]
        self.dirty: list[int] = []
        #: sgx_active_page_list: pages the reclaimer may take, in list order.
        self.active: OrderedDict[int, None] = OrderedDict()
        self.reclaimer_lock = threading.RLock()
        self.nr_free = 0
        #: Set by the kernel: ``reclaim_pages()`` and ``wake_ksgxd()`` of the reclaimer, ``signal_pending()``.
        self.reclaim_pages = lambda: None
        self.wake_ksgxd = lambda: None
        self.signal_pending = lambda: False

    # -- addresses ------------------------------------------------------------------------------
    def section_of(self, page: int) -> KSection:
        if self._section_of is None:
            return self.sections[0]
        return self.sections[int(self._section_of[page])]

    def phys_addr(self, page: int) -> PhysAddr:
        """``sgx_get_epc_phys_addr``."""
        s = self.section_of(page)
        return PhysAddr(s.phys_addr + ((page - s.first) << PAGE_SHIFT))

    def page_of_phys(self, phys: int) -> int:
        """``sgx_paddr_to_page`` (the sgx_epc_address_space lookup): page number or -1."""
        for s in self.sections:
            if s.phys_addr <= phys < s.phys_addr + s.size:
                return s.first + ((phys - s.phys_addr) >> PAGE_SHIFT)
        return -1

    def node_of(self, page: int) -> int:
        return self.section_of(page).node

    # -- allocation ----------------------------------------------------------------------------
    def _next_node_in(self, nid: int) -> int:
        for n in self.numa_mask:
            if n > nid:
                return n
        return self.numa_mask[0]

    def _alloc_from_node(self, nid: int) -> int:
        node = self.nodes[nid]
        with node.lock:
            if node.head == node.tail:
                return -1
            page = node.pop()
            self.flags[page] = 0
            self.nr_free -= 1
            return page

    def _alloc_any(self, current_node: int) -> int:
        """``__sgx_alloc_epc_page``: local node first, then the other nodes with EPC in round robin."""
        nid_start = current_node if current_node in self.nodes else self._next_node_in(current_node)
        nid = nid_start
        while True:
            page = self._alloc_from_node(nid)
            if page >= 0:
                return page
            nid = self._next_node_in(nid)
            if nid == nid_start:
                return -1

    def should_reclaim(self, watermark: int) -> bool:
        """``sgx_should_reclaim``: free pages below the watermark and something to reclaim."""
        return self.nr_free < watermark and bool(self.active)

    def alloc(self, owner: object | None, reclaim: bool, node: int = 0) -> int:
        """``sgx_alloc_epc_page(owner, reclaim)``: a page number, or -ENOMEM / -EBUSY / -ERESTARTSYS."""
        oid = getattr(owner, "owner_id", 0) if owner is not None else 0
        while True:
            page = self._alloc_any(node)
            if page >= 0:
                self.owner[page] = oid
                self.events.emit(EventKind.EPC_ALLOC, owner=oid, page=page)
                break
            if not self.active:
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=-errno.ENOMEM)
                return -errno.ENOMEM
            if not reclaim:
                page = -errno.EBUSY
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=page)
                break
            if self.signal_pending():
                page = -ERESTARTSYS
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=page)
                break
            self.reclaim_pages()
        if self.should_reclaim(SGX_NR_LOW_PAGES):
            self.wake_ksgxd()
        return page

    def free(self, page: int) -> None:
        """``sgx_free_epc_page``: the caller made the page uninitialised; no EREMOVE here (RFC v2 03/26).

        A poisoned page goes to its node's poison list and never back to a free list (5.17+).
        """
        node = self.nodes[self.node_of(page)]
        oid = int(self.owner[page])
        with node.lock:
            self.owner[page] = 0
            if self.flags[page] & PAGE_POISON:
                node.poison.append(page)
                self.flags[page] = PAGE_POISON | PAGE_IS_FREE
                self.events.emit(EventKind.EPC_POISON, owner=oid, page=page)
                return
            node.push(page)
            self.flags[page] = PAGE_IS_FREE
            self.nr_free += 1
        self.events.emit(EventKind.EPC_FREE, owner=oid, page=page)

    def set_owner(self, page: int, owner: object | None) -> None:
        self.owner[page] = getattr(owner, "owner_id", 0) if owner is not None else 0

    # -- the reclaimer's list -------------------------------------------------------------------
    def mark_reclaimable(self, page: int) -> None:
        """``sgx_mark_page_reclaimable``: set TRACKED and add at the tail of the active list."""
        with self.reclaimer_lock:
            self.flags[page] |= PAGE_RECLAIMER_TRACKED
            self.active[page] = None

    def unmark_reclaimable(self, page: int) -> int:
        """``sgx_unmark_page_reclaimable``: -EBUSY while the reclaimer holds the page, else 0."""
        with self.reclaimer_lock:
            if self.flags[page] & PAGE_RECLAIMER_TRACKED:
                if page not in self.active:
                    return -errno.EBUSY
                del self.active[page]
                self.flags[page] &= 0xFF ^ PAGE_RECLAIMER_TRACKED
            return 0

    # -- counters derived from the arrays --------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Pages per owner kind, derived from ``owner`` and ``flags`` (one source of truth)."""
        kinds = self.owners.kinds_table()[self.owner]
        poisoned = (self.flags & PAGE_POISON) != 0
        dirty = (self.flags & PAGE_DIRTY) != 0
        free = ((self.flags & PAGE_IS_FREE) != 0) & ~poisoned
        out = {"total": self.nr_pages, "free": int(free.sum()), "poisoned": int(poisoned.sum()),
               "dirty": int(dirty.sum())}
        in_use = ~free & ~poisoned & ~dirty
        for kind in (OwnerKind.HOST_ENCLAVE, OwnerKind.VA, OwnerKind.VEPC, OwnerKind.ZOMBIE, OwnerKind.UNTRACKED):
            out[kind.name.lower()] = int((in_use & (kinds == kind)).sum())
        return out

    def node_free(self, nid: int) -> int:
        return self.nodes[nid].nr_free

    @property
    def nbytes_per_page(self) -> float:
        ring = sum(n.ring.nbytes for n in self.nodes.values())
        return (self.owner.nbytes + self.flags.nbytes + ring) / max(self.nr_pages, 1)
