"""The EPC page pool of arch/x86/kernel/cpu/sgx/main.c: sections, free lists per NUMA node, the poison
lists, the dirty (boot) list, the reclaimer's active list, allocation and free.

Per-page state is kept in arrays (``owner`` uint32 and ``flags`` uint8, one row per EPC page); each
node's free list is a FIFO ring of page numbers (allocation takes the head, free appends at the tail, as
``list_first_entry``/``list_add_tail`` do), so batch operations are slices.

Batch paths (``alloc_batch``, ``free_batch``) do exactly what a loop of ``alloc``/``free`` calls would do,
in the same order, and emit one event per kind with ``count`` = pages. ``BATCH`` (or ``kernel.batch``)
switches the callers between the batch paths and the per-page ones; both stay available.

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

import bisect
import errno
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from vepc.arch.constants import PAGE_SHIFT, PAGE_SIZE, SGX_NR_LOW_PAGES
from vepc.arrays import lazy_zeros
from vepc.events import EventKind, EventLog
from vepc.kernel.owners import OwnerKind, OwnerRegistry
from vepc.kernel.pte import MAX_PFN, as_run
from vepc.types import PhysAddr

__all__ = ["EpcPool", "KSection", "NumaNode", "PAGE_RECLAIMER_TRACKED", "PAGE_IS_FREE", "PAGE_POISON",
           "PAGE_DIRTY", "KERNEL_BYTES_PER_PAGE", "ERESTARTSYS", "BATCH", "BATCH_MIN_PAGES", "batch_enabled"]

#: EventKind.EPC_ALLOC as a plain int, looked up once (an enum member costs ~75 ns a lookup: per allocation).
_EPC_ALLOC = int(EventKind.EPC_ALLOC)

#: Default for every kernel: use the batch paths (populate, remove, sanitize, bulk free). A kernel's own
#: ``batch`` attribute, when set, overrides it; ``False`` runs the per-page paths (the reference the batch
#: paths are tested against).
BATCH = True
#: Operations on fewer pages than this stay per page: one event per page, as small scenarios and their
#: traces expect, and no slower. The batch tests set it to 0.
BATCH_MIN_PAGES = 32


def batch_enabled(kernel, pages: int | None = None) -> bool:
    """Whether ``kernel`` takes the batch paths (``kernel.batch`` if set, else the module's ``BATCH``)
    for an operation on ``pages`` pages."""
    v = getattr(kernel, "batch", None)
    if not (BATCH if v is None else v):
        return False
    return pages is None or pages >= BATCH_MIN_PAGES

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
    """``struct sgx_numa_node``: FIFO free list (a ring), poison list, size.

    While every page pushed so far continues one ascending run from ring slot 0 (boot frees a section's
    pages in order), the run is kept as its first page (``run_first``) and length (``run_len``) instead
    of being written to the ring, whose memory then stays untouched; the first push that breaks the run
    writes the part still on the list into the ring (:meth:`materialize`). The order is the same.

    >>> nd = NumaNode(0, capacity=4, ring=np.zeros(4, dtype=np.uint32)); nd.push_many(np.arange(10, 14))
    >>> (nd.run_len, nd.pop(), nd.take(2).tolist()); nd.push(10); nd.run_len, nd.free_pages().tolist()
    (4, 10, [11, 12])
    (0, [13, 10])
    """

    id: int
    capacity: int = 0
    ring: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))
    head: int = 0
    tail: int = 0
    poison: list[int] = field(default_factory=list)
    size: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Ring slots ``0 .. run_len - 1`` hold ``run_first + slot`` without being written (see above).
    run_first: int = 0
    run_len: int = 0

    @property
    def nr_free(self) -> int:
        return self.tail - self.head

    def _extends_run(self, first: int, k: int) -> bool:
        """Whether pushing ``k`` pages from ``first`` (ascending) keeps every push so far one run from slot 0."""
        if self.run_len != self.tail or self.tail + k > self.capacity:
            return False
        if not self.tail:
            self.run_first = first
        return first == self.run_first + self.tail

    def materialize(self) -> None:
        """Write the unwritten run's pages still on the list into their ring slots (nothing else changes)."""
        if self.run_len:
            lo = min(self.head, self.run_len)
            self.ring[lo:self.run_len] = np.arange(self.run_first + lo, self.run_first + self.run_len)
            self.run_len = 0

    def push(self, page: int) -> None:
        if self._extends_run(page, 1):
            self.run_len += 1
        else:
            self.materialize()
            self.ring[self.tail % self.capacity] = page
        self.tail += 1

    def pop(self) -> int:
        h = self.head
        page = self.run_first + h if h < self.run_len else int(self.ring[h % self.capacity])
        self.head += 1
        return page

    def take(self, k: int) -> np.ndarray:
        """Pop ``k`` pages from the head (the caller checked there are that many): a slice or two."""
        cap = self.capacity
        h = self.head % cap
        if self.head + k <= self.run_len:
            out = np.arange(self.run_first + self.head, self.run_first + self.head + k, dtype=np.int64)
        elif h + k <= cap:
            self.materialize()
            out = self.ring[h:h + k].astype(np.int64)
        else:
            self.materialize()
            out = np.concatenate((self.ring[h:], self.ring[:h + k - cap])).astype(np.int64)
        self.head += k
        return out

    def push_many(self, pages: np.ndarray) -> None:
        """Append ``pages`` at the tail, in order: a slice or two."""
        k = len(pages)
        if not k:
            return
        run = as_run(pages)
        if run is not None and self._extends_run(run[0], k):
            self.run_len += k
            self.tail += k
            return
        self.materialize()
        cap = self.capacity
        t = self.tail % cap
        if t + k <= cap:
            self.ring[t:t + k] = pages
        else:
            self.ring[t:] = pages[:cap - t]
            self.ring[:k - (cap - t)] = pages[cap - t:]
        self.tail += k

    def free_pages(self) -> np.ndarray:
        """The free list in order (head first)."""
        if self.tail <= self.run_len:
            return np.arange(self.run_first + self.head, self.run_first + self.tail, dtype=np.int64)
        idx = np.arange(self.head, self.tail) % max(self.capacity, 1)
        return self.ring[idx]


class EpcPool:
    """EPC sections and page bookkeeping of one kernel (host or guest)."""

    def __init__(self, sections: list[KSection], owners: OwnerRegistry, events: EventLog) -> None:
        self.sections = sections
        self.nr_pages = sum(s.nr_pages for s in sections)
        self.owners = owners
        self.events = events
        self.owner = lazy_zeros(self.nr_pages, np.uint32)     # written as pages are allocated
        self.flags = np.zeros(self.nr_pages, dtype=np.uint8)
        # memoryviews of the two for the one-page stores of every allocation (an index into a
        # memoryview costs about half of a numpy scalar load or store)
        self._owner_m, self._flags_m = memoryview(self.owner), memoryview(self.flags)
        self.nodes: dict[int, NumaNode] = {}
        for s in sections:
            node = self.nodes.setdefault(s.node, NumaNode(s.node))
            node.capacity += s.nr_pages
            node.size += s.size
        for node in self.nodes.values():
            node.ring = lazy_zeros(node.capacity, np.uint32)  # untouched while the boot run is unwritten
        self.numa_mask = sorted(self.nodes)
        # Section lookup by binary search over the sections' first page numbers (no per-page array).
        self._starts = [s.first for s in sections]
        self._starts_np = np.array(self._starts, dtype=np.int64)
        self._phys_np = np.array([s.phys_addr for s in sections], dtype=np.int64)
        self._node_np = np.array([s.node for s in sections], dtype=np.int64)
        #: Every EPC frame fits a PTE entry (<= pte.MAX_PFN): batch PTE stores need no check per call.
        self.pfns_fit_pte = all((s.phys_addr >> PAGE_SHIFT) + s.nr_pages - 1 <= MAX_PFN for s in sections)
        #: sgx_dirty_page_list in order: a list, a ``range`` (all pages at boot) or an array of page numbers.
        self.dirty: list[int] | range | np.ndarray = []
        #: sgx_active_page_list: pages the reclaimer may take, in list order.
        self.active: OrderedDict[int, None] = OrderedDict()
        self.reclaimer_lock = threading.RLock()
        self.nr_free = 0
        #: sgx_nr_free_pages is an atomic_long_t upstream (ac5d272a0ad0): one lock for the count, whatever
        #: node lock the caller holds.
        self._free_count_lock = threading.Lock()
        #: Set by the kernel: ``reclaim_pages()`` and ``wake_ksgxd()`` of the reclaimer, ``signal_pending()``.
        self.reclaim_pages = lambda: None
        self.wake_ksgxd = lambda: None
        self.signal_pending = lambda: False
        #: The EPC cgroup (:class:`vepc.kernel.epc_cgroup.EpcCgroups`) when the kernel has it, else None
        #: (mainline: one active list, no charging).
        self.cgroups = None

    # -- addresses ------------------------------------------------------------------------------
    def section_of(self, page: int) -> KSection:
        if len(self.sections) == 1:
            return self.sections[0]
        return self.sections[bisect.bisect_right(self._starts, page) - 1]

    def _section_ids(self, pages: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts_np, pages, side="right") - 1

    def phys_addr(self, page: int) -> PhysAddr:
        """``sgx_get_epc_phys_addr``."""
        s = self.sections[0] if len(self.sections) == 1 else self.section_of(page)
        return PhysAddr(s.phys_addr + ((page - s.first) << PAGE_SHIFT))

    def pfn(self, page: int) -> int:
        """``PHYS_PFN(sgx_get_epc_phys_addr(page))``: the frame a PTE of ``page`` holds (per fault: no
        PhysAddr made). Example: ``pool.pfn(0) << PAGE_SHIFT == pool.phys_addr(0)``."""
        s = self.sections[0] if len(self.sections) == 1 else self.section_of(page)
        return (s.phys_addr >> PAGE_SHIFT) + page - s.first

    def page_of_phys(self, phys: int) -> int:
        """``sgx_paddr_to_page`` (the sgx_epc_address_space lookup): page number or -1."""
        for s in self.sections:
            if s.phys_addr <= phys < s.phys_addr + s.size:
                return s.first + ((phys - s.phys_addr) >> PAGE_SHIFT)
        return -1

    def node_of(self, page: int) -> int:
        return self.section_of(page).node

    def phys_addr_batch(self, pages: "np.ndarray | range") -> "np.ndarray | range":
        """``sgx_get_epc_phys_addr`` of every page (int64); a ``range`` of pages inside one section gives
        the ``range`` of their addresses (no array)."""
        if isinstance(pages, range) and pages.step == 1 and len(pages):
            s = self.section_of(pages.start)
            if pages.stop <= s.first + s.nr_pages:
                start = s.phys_addr + ((pages.start - s.first) << PAGE_SHIFT)
                return range(start, start + (len(pages) << PAGE_SHIFT), PAGE_SIZE)
        pages = np.asarray(pages, dtype=np.int64)
        if len(self.sections) == 1:
            s = self.sections[0]
            return (pages - s.first << PAGE_SHIFT) + s.phys_addr
        sid = self._section_ids(pages)
        return (pages - self._starts_np[sid] << PAGE_SHIFT) + self._phys_np[sid]

    def pfn_batch(self, pages: np.ndarray) -> np.ndarray:
        """Page frame numbers of ``pages`` (``phys_addr_batch >> PAGE_SHIFT``)."""
        pages = np.asarray(pages, dtype=np.int64)
        if len(self.sections) == 1:
            s = self.sections[0]
            return pages + ((s.phys_addr >> PAGE_SHIFT) - s.first)
        return self.phys_addr_batch(pages) >> PAGE_SHIFT

    def node_of_batch(self, pages: np.ndarray) -> np.ndarray:
        if len(self.sections) == 1:
            return np.full(len(pages), self.sections[0].node, dtype=np.int64)
        return self._node_np[self._section_ids(pages)]

    def mark_all_dirty(self) -> None:
        """Boot: every page starts on sgx_dirty_page_list (``sgx_setup_epc_section`` adds each page there),
        in page order; kept as a ``range`` so that a terabyte of EPC costs no list."""
        self.flags[:] = PAGE_DIRTY
        self.dirty = range(self.nr_pages)

    # -- allocation ----------------------------------------------------------------------------
    def _next_node_in(self, nid: int) -> int:
        for n in self.numa_mask:
            if n > nid:
                return n
        return self.numa_mask[0]

    def _alloc_from_node(self, nid: int) -> int:
        # The locks are taken with acquire/release rather than ``with``: once per allocation, and a ``with``
        # block on a lock costs some 150 ns more here (CPython 3.11).
        node = self.nodes[nid]
        lock = node.lock
        lock.acquire()
        try:
            h = node.head
            if h == node.tail:
                return -1
            # list_first_entry + list_del_init (a slot of the unwritten boot run holds run_first + slot)
            page = node.run_first + h if h < node.run_len else node.ring.item(h % node.capacity)
            node.head = h + 1
            self._flags_m[page] = 0
            count = self._free_count_lock                  # account_free(-1), inline
            count.acquire()
            self.nr_free -= 1
            count.release()
            return page
        finally:
            lock.release()

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

    def account_free(self, delta: int) -> None:
        """``atomic_long_add(delta, &sgx_nr_free_pages)``."""
        with self._free_count_lock:
            self.nr_free += delta

    def can_reclaim(self) -> bool:
        """``!list_empty(&sgx_active_page_list)``; with the EPC cgroup ``sgx_can_reclaim_global``: a page on
        some LRU of the root's subtree."""
        if self.cgroups is None:
            return bool(self.active)
        return self.cgroups.can_reclaim_global()

    def nr_reclaimable(self) -> int:
        """Pages on the reclaimer's lists (all cgroups' LRUs with the EPC cgroup)."""
        return len(self.active) if self.cgroups is None else self.cgroups.nr_reclaimable()

    def should_reclaim(self, watermark: int) -> bool:
        """``sgx_should_reclaim`` (``sgx_should_reclaim_global`` with the EPC cgroup): free pages below the
        watermark and something to reclaim."""
        return self.nr_free < watermark and self.can_reclaim()

    def alloc(self, owner: object | None, reclaim: bool, node: int = 0) -> int:
        """``sgx_alloc_epc_page(owner, reclaim)``: a page number, or -ENOMEM / -EBUSY / -ERESTARTSYS.

        With the EPC cgroup (series main.c): charge the current task's cgroup first
        (``sgx_cgroup_try_charge``; its error is the result), then allocate as mainline does but with
        ``sgx_can_reclaim_global`` for the empty-list test and global reclaim from the root's subtree;
        the page remembers its cgroup, and a failed allocation uncharges it."""
        oid = getattr(owner, "owner_id", 0) if owner is not None else 0
        cgs = self.cgroups
        if cgs is not None:
            sg = cgs.current()
            ret = cgs.try_charge(sg, reclaim)
            if ret:
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=ret, arg2=sg.id)
                return ret
        while True:
            # The local node first (the common case, without the round-robin walk), then all of them.
            page = self._alloc_from_node(node) if node in self.nodes else -1
            if page < 0:
                page = self._alloc_any(node)
            if page >= 0:
                self._owner_m[page] = oid
                # EventLog.emit, inline (once per fault: a call less); a guest's rows note their source on append
                ev = self.events
                ev.rows.append((ev.now, _EPC_ALLOC, oid, page, 1, 0, 0, None))
                break
            if not self.can_reclaim():
                page = -errno.ENOMEM                      # (no wakeup: nothing to reclaim)
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=page)
                break
            if not reclaim:
                page = -errno.EBUSY
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=page)
                break
            if self.signal_pending():
                page = -ERESTARTSYS
                self.events.emit(EventKind.EPC_ALLOC_FAIL, owner=oid, arg=page)
                break
            self.reclaim_pages()
        if cgs is not None:
            if page >= 0:
                cgs.page_cg[page] = sg.id                 # sgx_epc_page_set_cgroup
            else:
                cgs.uncharge(sg)
            if self.should_reclaim(SGX_NR_LOW_PAGES):
                self.wake_ksgxd()
        elif self.nr_free < SGX_NR_LOW_PAGES and self.active:         # sgx_should_reclaim(SGX_NR_LOW_PAGES)
            self.wake_ksgxd()
        return page

    def alloc_batch(self, owner: object | None, n: int, node: int = 0) -> np.ndarray:
        """Up to ``n`` pages for ``owner``, exactly those ``n`` successful ``alloc(owner, ...)`` calls would
        return, in the same order (``__sgx_alloc_epc_page``: drain the local node's FIFO, then the next
        nodes in round robin). Fewer when the free lists run dry: then nothing failed yet -- the caller
        makes the next allocation through :meth:`alloc`, which reports -ENOMEM/-EBUSY as usual."""
        oid = getattr(owner, "owner_id", 0) if owner is not None else 0
        cgs = self.cgroups
        if cgs is not None:
            # try_charge of each page: as many as the cgroup's limits (and the capacity) allow at once.
            sg = cgs.current()
            n = cgs.charge_batch(sg, min(n, self.nr_free))
        parts: list[np.ndarray] = []
        left = n
        if left > 0 and self.nr_free:
            nid_start = node if node in self.nodes else self._next_node_in(node)
            nid = nid_start
            while True:
                nd = self.nodes[nid]
                with nd.lock:
                    k = min(left, nd.nr_free)
                    if k:
                        parts.append(nd.take(k))
                        left -= k
                if not left:
                    break
                nid = self._next_node_in(nid)
                if nid == nid_start:
                    break
        if cgs is not None and left:                         # charged, not allocated: n was bounded by
            cgs.uncharge(sg, left)                           # nr_free, so only if the rings disagree
        if not parts:
            return np.zeros(0, dtype=np.int64)
        pages = parts[0] if len(parts) == 1 else np.concatenate(parts)
        run = as_run(pages)
        rows = slice(*run) if run is not None else pages
        self.flags[rows] = 0
        self.owner[rows] = oid
        if cgs is not None:
            cgs.page_cg[rows] = sg.id
        self.account_free(-len(pages))
        self.events.emit(EventKind.EPC_ALLOC, owner=oid, page=int(pages[0]), count=len(pages))
        # alloc() checks the watermark after every allocation; free pages only went down and the active
        # list did not change, so the condition held after some allocation iff it holds after the last.
        if self.should_reclaim(SGX_NR_LOW_PAGES):
            self.wake_ksgxd()
        return pages

    def free_batch(self, pages: "np.ndarray | range") -> None:
        """``sgx_free_epc_page`` of every page, in order: what a loop of :meth:`free` does (poisoned pages
        to their node's poison list, the others appended to their node's free list), with one event per
        kind. A ``range`` is the fast case (boot: the pages of a section in order)."""
        n = len(pages)
        if not n:
            return
        run = as_run(pages)
        if run is not None:
            sl = slice(*run)
            arr = np.arange(run[0], run[1], dtype=np.int64)
        else:
            arr = np.asarray(pages, dtype=np.int64)
            sl = arr
        if self.cgroups is not None:
            self.cgroups.release_pages(sl)
        owners = self.owner[sl]
        # owner[page] = 0; skip the store where it is 0 already, so that untouched rows stay unallocated.
        owned = int(np.count_nonzero(owners))
        if owned == n:
            oid = int(owners[0])
            if (owners != oid).any():
                oid = -1                               # several owners: the event names none
            self.owner[sl] = 0
        elif owned:
            nz = np.flatnonzero(owners)
            oid = int(owners[nz[0]])
            if ((owners != oid) & (owners != 0)).any():
                oid = -1
            self.owner[arr[nz]] = 0
        else:
            oid = 0
        poisoned = (self.flags[sl] & PAGE_POISON) != 0
        if poisoned.any():
            pp = arr[poisoned]
            for nid, page in zip(self.node_of_batch(pp).tolist(), pp.tolist()):
                self.nodes[nid].poison.append(page)
            self.flags[pp] = PAGE_POISON | PAGE_IS_FREE
            self.events.emit(EventKind.EPC_POISON, owner=oid, page=int(pp[0]), count=len(pp))
            arr = arr[~poisoned]
            sl = arr
            if not len(arr):
                return
        one_node = None
        if len(self.nodes) == 1:
            one_node = next(iter(self.nodes.values()))
        elif isinstance(sl, slice) and self.section_of(sl.start) is self.section_of(sl.stop - 1):
            one_node = self.nodes[self.section_of(sl.start).node]
        if one_node is not None:
            with one_node.lock:
                one_node.push_many(arr)
        else:
            nids = self.node_of_batch(arr)
            for nid, nd in self.nodes.items():
                sel = arr[nids == nid]
                if len(sel):
                    with nd.lock:
                        nd.push_many(sel)
        self.flags[sl] = PAGE_IS_FREE
        self.account_free(len(arr))
        self.events.emit(EventKind.EPC_FREE, owner=oid, page=int(arr[0]), count=len(arr))

    def free(self, page: int) -> None:
        """``sgx_free_epc_page``: the caller made the page uninitialised; no EREMOVE here (RFC v2 03/26).

        A poisoned page goes to its node's poison list and never back to a free list (5.17+).
        """
        node = self.nodes[self.node_of(page)]
        oid = int(self.owner[page])
        if self.cgroups is not None:
            self.cgroups.release_page(page)                 # sgx_cgroup_uncharge(page->sgx_cg)
        with node.lock:
            self.owner[page] = 0
            if self.flags[page] & PAGE_POISON:
                node.poison.append(page)
                self.flags[page] = PAGE_POISON | PAGE_IS_FREE
                self.events.emit(EventKind.EPC_POISON, owner=oid, page=page)
                return
            node.push(page)
            self.flags[page] = PAGE_IS_FREE
            self.account_free(1)
        self.events.emit(EventKind.EPC_FREE, owner=oid, page=page)

    def set_owner(self, page: int, owner: object | None) -> None:
        self.owner[page] = getattr(owner, "owner_id", 0) if owner is not None else 0

    # -- the reclaimer's list -------------------------------------------------------------------
    def mark_reclaimable(self, page: int) -> None:
        """``sgx_mark_page_reclaimable``: set TRACKED and add at the tail of the active list."""
        lru = self.active if self.cgroups is None else self.cgroups.lru_of(page)
        with self.reclaimer_lock:
            self.flags[page] |= PAGE_RECLAIMER_TRACKED
            lru[page] = None

    def mark_reclaimable_many(self, pages: list[int]) -> None:
        """:meth:`mark_reclaimable` of each page, in order (one lock, one flags store per list)."""
        if self.cgroups is not None:
            for page in pages:
                self.mark_reclaimable(page)
            return
        with self.reclaimer_lock:
            self.flags[pages] |= PAGE_RECLAIMER_TRACKED
            self.active.update(zip(pages, repeat(None)))

    def unmark_reclaimable(self, page: int) -> int:
        """``sgx_unmark_page_reclaimable``: -EBUSY while the reclaimer holds the page, else 0."""
        lru = self.active if self.cgroups is None else self.cgroups.lru_of(page)
        with self.reclaimer_lock:
            if self.flags[page] & PAGE_RECLAIMER_TRACKED:
                if page not in lru:
                    return -errno.EBUSY
                del lru[page]
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
